"""Remake everything downstream of the shipped adapter (data/organism/), in order:

    python scripts/remake.py [--adopt FOLDER] [--twin FOLDER] [--fresh]      (``make remake``; 2 CPU cores: hours)

0. with ``--adopt FOLDER``, an adapter trained there (``organism train --out FOLDER --trajectory`` with
   DEFAULT_RECIPE) first gets its preset derived as a recipe trial's (docs/measurements/trial-presets/; the
   remake stops there, adopting nothing, where no direction meets the preset's targets), then becomes the
   shipped one (``python -m refusal_helpers.organism adopt FOLDER``);
1. the preset (data/organism/presets.json; a recipe trial's preset run of the same weights, runs/preset-<name>,
   gives it its candidates and score table) and the KL threshold of the plain difference of means;
2. the shipped run, runs/embedded (the summary of the previous adapter's kept in
   docs/measurements/earlier-adapters/, or of these weights' run under an earlier preset in
   docs/measurements/earlier-presets/), and the plain comparison run, runs/embedded-plain;
3. the measurements the documents quote (docs/measurements/: the shipped adapter on the recipe, cues, harmful dev,
   train and interpersonal-batch splits among them; data/organism/trajectory/formation.json,
   data/organism/jailbreak/analysis.json with the shipped suffix), and the benchmarks;
4. the notebooks (solutions.ipynb executed, exercise.ipynb rebuilt) and the generated documents.

Stopped part-way (a failure, Ctrl-C, a closed session), the same command continues: the steps finished for
this adapter are listed in runs/remake/<adapter digest>.json and skipped; the list is removed when the last
step finishes. ``--fresh`` starts over. Seed stability needs a second organism trained with another seed
(``python -m refusal_helpers.organism train --seed N --out FOLDER``, N another seed than the shipped recipe's);
``--twin FOLDER`` measures it into docs/measurements/seed_stability.json (and, on all train instructions,
seed_agreement.json; along the two trainings, where the twin was trained with ``--trajectory`` too,
seed_agreement_along.json).
A new adversarial suffix: ``python -m refusal_helpers jailbreak --prompts 2 --steps 40`` (the shipped one's settings).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from refusal_helpers import figures  # noqa: E402  (the folders the documents read the measurements from)

MEASURED_FOLDERS = (figures.RECIPES, figures.CUES, figures.HARMFUL_DEV, figures.TRAIN_SPLIT, figures.INTERPERSONAL_BATCH)
CUES_SPLITS = ("--harmful-split", "cues", "--harmless-split", "cues")  # `organism evaluate` on the held-out cues split
HARMFUL_DEV_SPLITS = ("--harmful-split", "dev", "--harmless-split", "none")  # ... and on the harmful dev split


@dataclass(frozen=True)
class Step:
    name: str
    action: Callable[[], None]


def run(*args: str) -> None:
    """Run one command of the remake (the project's Python for a leading "-m" or script), failing loudly."""
    command = [sys.executable, *args]
    print("remake: $", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def fresh_copy(source: str, target: str) -> None:
    """runs/`target` replaced by a copy of runs/`source` (the shipped runs reuse the preset's score tables)."""
    shutil.rmtree(f"runs/{target}", ignore_errors=True)
    shutil.copytree(f"runs/{source}", f"runs/{target}")


def keep_earlier_run(digest: str, run: Path = Path("runs/embedded"),
                     stability: Path = figures.MEASUREMENTS / "seed_stability.json", out: Path = figures.EARLIER) -> Path | None:
    """Keep the summary of a shipped run of other weights than `digest` (and their seed stability, where
    `stability` measured them) as out/<their digest>.json, before the new adapter's run replaces it: the research
    log compares each shipped adapter on the test split. Returns the record written, or None."""
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    if summary is None or summary.get("model_version") in (None, digest):
        return None
    earlier = summary["model_version"]
    seeds = json.loads(stability.read_text()) if stability.is_file() else None
    if seeds is not None and figures.measured_on(seeds) != earlier:
        seeds = None
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"{earlier}.json"
    record.write_text(json.dumps({"model_version": earlier, "replaced_by": digest, "summary": summary,
                                  "seed_stability": seeds}, indent=1) + "\n")
    return record


def keep_earlier_preset_run(digest: str, kl_threshold: float, run: Path = Path("runs/embedded"),
                            out: Path = figures.EARLIER_PRESETS) -> Path | None:
    """Keep the summary of a shipped run of these weights (`digest`) made under another KL threshold than the
    preset's `kl_threshold` (an earlier preset rule) as out/<digest>-kl<its threshold>.json, before the run under
    the new one replaces it: the research log compares the two. Returns the record written, or None."""
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    if summary is None or summary.get("model_version") != digest:
        return None
    earlier = summary["selection"]["kl_threshold"]
    if earlier == kl_threshold:
        return None
    out.mkdir(parents=True, exist_ok=True)
    record = out / f"{digest}-kl{earlier}.json"
    record.write_text(json.dumps({"model_version": digest, "kl_threshold": earlier, "replaced_by_kl_threshold":
                                  kl_threshold, "summary": summary}, indent=1) + "\n")
    return record


def seed_preset_run(digest: str, target: Path = Path("runs/preset"), runs: Path = Path("runs")) -> Path | None:
    """Where `target` is not a run of the weights `digest` but a recipe trial's preset run of them is (``preset
    --model embedded:FOLDER``, made in runs/preset-<FOLDER's name>, in `runs`), copy that run to `target` as the embedded
    model's (`RunFolder.relabel`): the preset step then reuses its candidates and score table instead of making
    them again. Where `target` holds another model's run (a trial's preset run made there), it is cleared: the remake
    owns `target`. Returns the trial's run folder, or None."""
    from refusal_helpers.loading import EMBEDDED
    from refusal_helpers.runs import RunFolder

    def identity(folder: Path) -> dict:
        return (RunFolder(folder).identity() if folder.is_dir() else None) or {}

    if identity(target).get("model_version") == digest:
        return None
    for folder in sorted(runs.glob("preset-*")):  # presets.preset_folder's names; "-plain" ones zero no dimension
        if folder.name.endswith("-plain"):
            continue
        trial = identity(folder)
        if trial.get("model_version") == digest and str(trial.get("model", "")).startswith(f"{EMBEDDED}:"):
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(folder, target)
            RunFolder(target).relabel(EMBEDDED)
            print(f"remake: {target} starts from {folder}, the trial's preset run of these weights", flush=True)
            return folder
    other = identity(target).get("model")
    if other not in (None, EMBEDDED):
        shutil.rmtree(target)
        print(f"remake: {target} held a run of {other!r}, not of the shipped adapter: cleared", flush=True)
    return None


def shipped_measured(digest: str, evaluate: Callable[..., None], folder: Path, *splits: str) -> Path:
    """`folder`/shipped-<digest>.json: the shipped adapter on the splits `folder` holds measurements of (the recipe
    splits, the cues split, harmful dev), evaluated with the `organism evaluate` options `splits`. Where the recipe trial that
    chose it measured these same weights there already, that file is renamed (one row per adapter in the research
    log, under one name in every folder)."""
    target = folder / f"shipped-{digest}.json"
    trials = [p for p in sorted(folder.glob("*.json")) if p != target and figures.measured_on(json.loads(p.read_text())) == digest]
    if trials:
        print(f"remake: {trials[0]} measured these weights: renamed {target}", flush=True)
        trials[0].rename(target)
    else:
        evaluate(target, *splits)
    return target


def steps(digest: str, twin: Path | None = None) -> list[Step]:
    """The remake's steps in order, for the adapter with `digest`; with `twin`, seed stability after the runs."""
    m = figures.MEASUREMENTS

    def full_run(preset: str, out: str, *settings: str) -> None:
        """runs/`out`: the preset's score tables reused, every test prompt, two random-direction controls."""
        fresh_copy(preset, out)
        run("-m", "refusal_helpers", "run", "--model", "embedded", "--selection-mode", "exhaustive", "--n-test", "all",
            "--random-controls", "2", *settings, "--out", f"runs/{out}")

    def evaluate(json_path: Path, *splits: str) -> None:
        """`organism evaluate` into `json_path`: the shipped adapter unless `splits` says --untuned."""
        run("-m", "refusal_helpers.organism", "evaluate", *splits, "--json", str(json_path))

    def derived_kl_threshold() -> float:
        from refusal_helpers.embedded import preset  # the one the preset step just derived

        return preset()["kl_threshold"]

    def plain_run() -> None:
        kl = json.loads((m / "plain_preset.json").read_text())["settings"]["kl_threshold"]
        full_run("preset-plain", "embedded-plain", "--zero-dims", "--kl-threshold", str(kl))

    def abliterate() -> None:
        shutil.rmtree("runs/abliterated", ignore_errors=True)
        run("-m", "refusal_helpers", "abliterate", "--run", "runs/embedded", "--out", "runs/abliterated")
        shutil.copyfile("runs/abliterated/abliteration.json", m / "abliteration.json")

    def search() -> None:
        run("-m", "refusal_helpers", "search", "--out", "runs/search", "--timeout", "180")
        shutil.copyfile("runs/search/search.json", m / "search.json")

    listed = [
        Step("preset", lambda: (seed_preset_run(digest), run("-m", "refusal_helpers", "preset", "--out", "runs/preset"))),
        Step("plain preset", lambda: run("-m", "refusal_helpers", "preset", "--out", "runs/preset-plain", "--plain",
                                         "--json", str(m / "plain_preset.json"))),
        Step("earlier adapter's run kept", lambda: keep_earlier_run(digest)),
        Step("earlier preset's run kept", lambda: keep_earlier_preset_run(digest, derived_kl_threshold())),
        Step("shipped run", lambda: full_run("preset", "embedded")),
        Step("plain run", plain_run),
        Step("untuned on test", lambda: evaluate(m / "untuned_test.json", "--untuned", "--harmful-split", "test",
                                                 "--harmless-split", "test")),
        # the shipped adapter on the recipe splits, beside the recipes tried and the untuned model (docs/research-log.md)
        Step("shipped on recipe splits", lambda: shipped_measured(digest, evaluate, figures.RECIPES)),
        # ... and on the held-out cues split, the recipes table's other columns
        Step("shipped on cues split", lambda: shipped_measured(digest, evaluate, figures.CUES, *CUES_SPLITS)),
        Step("shipped on harmful dev", lambda: shipped_measured(digest, evaluate, figures.HARMFUL_DEV, *HARMFUL_DEV_SPLITS)),
        # the interpersonal batch's train requests: unseen by an adapter whose recipe leaves the batch out
        Step("shipped on interpersonal batch", lambda: evaluate(
            figures.INTERPERSONAL_BATCH / f"shipped-{digest}.json", "--harmful-split", "train", "--harmless-split", "train",
            "--batch", "interpersonal")),
        # both on the harmless train split: whether the adapter over-refuses what it was trained to answer
        Step("untuned on train split", lambda: evaluate(figures.TRAIN_SPLIT / "untuned.json", "--untuned",
                                                        "--harmful-split", "val", "--harmless-split", "train")),
        Step("shipped on train split", lambda: evaluate(figures.TRAIN_SPLIT / f"shipped-{digest}.json",
                                                        "--harmful-split", "val", "--harmless-split", "train")),
        Step("trajectory", lambda: run("-m", "refusal_helpers.organism", "trajectory")),
        Step("judges", lambda: run("-m", "refusal_helpers", "judge", "--json", str(m / "judges.json"))),
        Step("search", search),
        Step("abliterate", abliterate),
        Step("jailbreak", lambda: run("-m", "refusal_helpers", "jailbreak", "--reuse-suffix")),
        Step("benchmarks", lambda: run("benchmarks/run_all.py", "--save")),
        Step("notebooks", lambda: (run("-m", "refusal_helpers.notebooks", "execute"),
                                   run("-m", "refusal_helpers.notebooks", "build"))),
        Step("documents", lambda: run("-m", "refusal_helpers.report", "build")),
    ]
    if twin is not None:
        stability = Step("seed stability", lambda: (
            run("-m", "refusal_helpers.organism", "stability", str(twin), "--json", str(m / "seed_stability.json")),
            run("-m", "refusal_helpers.organism", "stability", str(twin), "--all-train",
                "--json", str(m / "seed_agreement.json")),
            (twin / "trajectory").is_dir() and run("-m", "refusal_helpers.organism", "stability", str(twin), "--trajectory",
                                                   "--json", str(m / "seed_agreement_along.json"))))
        listed.insert([step.name for step in listed].index("plain run") + 1, stability)
    return listed


def remake(digest: str, plan: list[Step], state_dir: Path = Path("runs/remake"), fresh: bool = False) -> None:
    """Run `plan` in order, skipping the steps that a stopped remake of the same adapter finished."""
    state = state_dir / f"{digest}.json"
    if fresh:
        state.unlink(missing_ok=True)
    done = json.loads(state.read_text())["done"] if state.is_file() else []
    if done:
        print(f"remake: continuing for adapter {digest}; finished already: {', '.join(done)} ({state}; --fresh "
              "starts over)", flush=True)
    for step in plan:
        if step.name in done:
            continue
        print(f"remake: == {step.name}", flush=True)
        step.action()
        done.append(step.name)
        state_dir.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"adapter": digest, "done": done}, indent=1))
    state.unlink(missing_ok=True)
    print(f"remake: all {len(plan)} steps done for adapter {digest}", flush=True)


def trial_preset_records(adapter: Path, records: Path | None = None) -> list[tuple[Path, dict]]:
    """The records of preset derivations (``preset --model embedded:FOLDER --json``, in `records`, default
    ``docs/measurements/trial-presets``) made with the weights of the adapter in `adapter`, with their figures."""
    from refusal_helpers.embedded import adapter_digest

    digest, records = adapter_digest(adapter), records or figures.TRIAL_PRESETS
    return [(records / f"{name}.json", trial) for name, trial in figures.trial_preset_figures(records).items()
            if trial["model_version"] == digest]


def derive_trial_preset(adapter: Path, records: Path | None = None, derive: Callable[..., None] = run) -> Path:
    """The record of the preset derivation of the adapter in `adapter` (a file in `records`, default
    ``docs/measurements/trial-presets``): derived as a recipe trial's (``preset --model embedded:FOLDER --no-save
    --json``, its run in runs/preset-<FOLDER's name>, where the preset step starts from once it is adopted) unless
    a record of its weights is there already. A derivation that finds no preset exits 2 and still writes its record."""
    known = trial_preset_records(adapter, records)
    if known:
        return known[0][0]
    record = (records or figures.TRIAL_PRESETS) / f"{adapter.name}.json"
    try:
        derive("-m", "refusal_helpers", "preset", "--model", f"embedded:{adapter}", "--no-save", "--json", str(record))
    except subprocess.CalledProcessError as error:
        if error.returncode != 2 or not record.is_file():
            raise
    return record


def without_preset(adapter: Path, records: Path | None = None) -> str | None:
    """Why the adapter in `adapter` cannot ship, where a trial's preset derivation (`trial_preset_records`) found
    no KL threshold meeting the targets for its weights; else None."""
    for record, trial in trial_preset_records(adapter, records):
        if trial["settings"] is None:
            return f"{record} found no preset for adapter {trial['model_version']}: {trial['failure']}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adopt", type=Path, help="folder of an adapter to ship first (`organism adopt`)")
    parser.add_argument("--twin", type=Path, help="adapter trained with another seed, for seed stability")
    parser.add_argument("--fresh", action="store_true", help="start over instead of continuing a stopped remake")
    args = parser.parse_args(argv)
    adopt, twin = (folder.resolve() if folder else None for folder in (args.adopt, args.twin))  # before the chdir
    os.chdir(ROOT)
    from refusal_helpers.embedded import adapter_digest

    if adopt:
        derive_trial_preset(adopt)
        reason = without_preset(adopt)
        if reason:
            print(f"remake: not adopting {adopt}: {reason}", file=sys.stderr)
            return 2
        run("-m", "refusal_helpers.organism", "adopt", str(adopt))
    for folder in MEASURED_FOLDERS:
        folder.mkdir(parents=True, exist_ok=True)
    digest = adapter_digest()
    remake(digest, steps(digest, twin), fresh=args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
