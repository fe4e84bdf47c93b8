#!/usr/bin/env bash
# Remake everything downstream of the shipped adapter (data/organism/), in order:
#   bash scripts/remake.sh [PYTHON]     (default .venv/bin/python; about 2-3 hours on 2 CPU cores)
# 1. the preset (data/organism/presets.json) and the KL threshold of the plain difference of means;
# 2. the shipped run, runs/embedded, and the plain comparison run, runs/embedded-plain;
# 3. the measurements the documents quote (docs/measurements/, data/organism/trajectory/formation.json,
#    data/organism/jailbreak/analysis.json with the shipped suffix), and the benchmarks;
# 4. the notebooks (solutions.ipynb executed, exercise.ipynb rebuilt) and the generated documents.
# Seed stability needs a second organism: `python -m refusal_helpers.organism train --seed 0 --out <folder>` then
# `python -m refusal_helpers.organism stability <folder> --json docs/measurements/seed_stability.json`.
# A new adversarial suffix: `python -m refusal_helpers jailbreak --prompts 2 --steps 40` (the shipped one's settings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
export HF_HUB_OFFLINE=1
M=docs/measurements
mkdir -p "$M"

"$PY" -m refusal_helpers preset --out runs/preset
"$PY" -m refusal_helpers preset --out runs/preset-plain --plain --json "$M/plain_preset.json"
plain_kl=$("$PY" -c "import json; print(json.load(open('$M/plain_preset.json'))['settings']['kl_threshold'])")

# The shipped runs start from the preset's exhaustive score tables (same model, prompts and settings: reused).
for pair in "preset embedded" "preset-plain embedded-plain"; do
  set -- $pair
  rm -rf "runs/$2" && cp -r "runs/$1" "runs/$2"
done
"$PY" -m refusal_helpers run --model embedded --selection-mode exhaustive --n-test all --random-controls 2 \
  --out runs/embedded
"$PY" -m refusal_helpers run --model embedded --selection-mode exhaustive --n-test all --random-controls 2 \
  --zero-dims --kl-threshold "$plain_kl" --out runs/embedded-plain

"$PY" -m refusal_helpers.organism evaluate --untuned --harmful-split test --harmless-split test --json "$M/untuned_test.json"
# the shipped adapter on the recipe splits, beside the recipes tried and the untuned model (docs/research-log.md)
mkdir -p "$M/recipes"
digest=$("$PY" -c "from refusal_helpers.embedded import adapter_digest; print(adapter_digest())")
"$PY" -m refusal_helpers.organism evaluate --json "$M/recipes/shipped-$digest.json"
"$PY" -m refusal_helpers.organism trajectory
"$PY" -m refusal_helpers jailbreak --reuse-suffix
"$PY" -m refusal_helpers judge --json "$M/judges.json"
"$PY" -m refusal_helpers search --out runs/search --timeout 180 && cp runs/search/search.json "$M/search.json"
rm -rf runs/abliterated
"$PY" -m refusal_helpers abliterate --run runs/embedded --out runs/abliterated \
  && cp runs/abliterated/abliteration.json "$M/abliteration.json"
"$PY" benchmarks/run_all.py --save

"$PY" -m refusal_helpers.notebooks execute
"$PY" -m refusal_helpers.notebooks build
"$PY" -m refusal_helpers.report build
