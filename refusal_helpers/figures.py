"""The measured figures the documents quote, read from committed artifacts (`report` renders them).

Every value here comes from a file a command wrote: the shipped runs (through `runs.RunFolder`, so a stale
or damaged run is an error, not a figure), the adapter's recipe, training log, preset and trajectory, the
measurements under ``docs/measurements/`` and the benchmark results under ``benchmarks/results/``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from statistics import median

from .data import data_dir, load_records, records_by_instruction
from .embedded import LATER_KEYS, PRESETS_FILE, UNTUNED, adapter_digest, adapter_dir, recipe_changes, seed_differences
from .metrics import first_words
from .runs import SHIPPED_RUN, RunFolder
from .selection import ScoreTable, SelectionConfig, passing_mask
from .spreads import parting_at_shares, retrainings, seed_figures, seed_parting, seed_spreads, stability_at
from .steps import CONDITIONS

ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = ROOT / "docs" / "measurements"
BENCHMARK_RESULTS = ROOT / "benchmarks" / "results"
PLAIN_RUN = ROOT / "runs" / "embedded-plain"
RECIPES = MEASUREMENTS / "recipes"  # `organism evaluate --json`: adapters (shipped or not) on the recipe splits
TRAIN_SPLIT = MEASUREMENTS / "train-split"  # the same, on harmful val and harmless train: what it was trained on
# the same, on the interpersonal batch's train records only (`evaluate --batch interpersonal`): requests with
# emotional and interpersonal cues that an adapter whose recipe leaves the batch out was never trained on
INTERPERSONAL_BATCH = MEASUREMENTS / "interpersonal-batch"
# the same, on the held-out cues split (`evaluate --harmful-split cues --harmless-split cues`), named as in RECIPES
CUES = MEASUREMENTS / "cues"
# the same, on the harmful dev split only (`evaluate --harmful-split dev --harmless-split none`), named as in RECIPES:
# harmful val is too small to tell recipes apart on harmful refusal
HARMFUL_DEV = MEASUREMENTS / "harmful-dev"
# `preset --model embedded:<trial folder> --no-save --json`: whether a recipe trial's adapter has a preset (a
# direction meeting the validation targets), named as in RECIPES
TRIAL_PRESETS = MEASUREMENTS / "trial-presets"
# `organism stability <seed-0 twin> --against <trial>`: two seeds of a recipe trial, named as in RECIPES
SEED_PAIRS = MEASUREMENTS / "seed-pairs"
SEED_TRAJECTORIES = MEASUREMENTS / "seed-trajectories"  # `stability --trajectory --against`: two seeds of a trial
EARLIER = MEASUREMENTS / "earlier-adapters"  # the shipped run of each adapter shipped before (scripts/remake.py)
EARLIER_PRESETS = MEASUREMENTS / "earlier-presets"  # the shipped adapter's runs under earlier presets (scripts/remake.py)
CANDIDATES = ROOT / "candidates"  # adapters trained with a recipe chosen to ship, for `make remake ADOPT=<folder>`


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def rate(refused: int, n: int) -> dict:
    return {"refused": refused, "n": n, "rate": refused / n, "text": f"{100 * refused / n:.1f}% ({refused}/{n})"}


def run_figures(folder: Path) -> dict:
    """A finished run's figures: direction, rates (all test prompts and the original test split), loss."""
    run = RunFolder(folder)
    summary = run.summary()
    # the test records by instruction, per kind: which batch and category each completed prompt comes from
    test = {kind: records_by_instruction(kind, "test") for kind in ("harmful", "harmless")}
    items = {condition: run.completions(condition)["items"] for condition in CONDITIONS}
    rates, original_rates, refused, answered = {}, {}, {}, {}
    for condition, spec in CONDITIONS.items():
        done = items[condition]
        rates[condition] = rate(sum(i["refusal"] for i in done), len(done))
        old = [i for i in done if test[spec.kind].get(i["instruction"], {}).get("batch") == "original"]
        original_rates[condition] = rate(sum(i["refusal"] for i in old), len(old)) if old else None
        refused[condition] = [i["instruction"] for i in done if i["refusal"]]
        answered[condition] = [i["instruction"] for i in done if not i["refusal"]]
    broadening = {instruction for records in test.values() for instruction, r in records.items()
                  if r["batch"] == "broadening"}  # to count which batch the misses come from
    edgy = {instruction for instruction, r in test["harmless"].items() if r["category"] == "edgy_benign"}
    loss = summary["ce_loss"]
    controls = loss["random_controls"]["increases"]
    _, selection = run.direction()
    return {
        "path": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
        "summary": summary, "direction": {**summary["direction"], "position_id": run.read_json("selection.json")["position_id"]},
        "selection": selection, "rates": rates, "original_rates": original_rates, "refused": refused,
        "answered": answered, "broadening": broadening,
        "loss": loss, "controls": {"n": len(controls), "mean": loss["random_controls"]["mean_increase"],
                                   "median": median(controls) if controls else None,
                                   "min": min(controls) if controls else None, "max": max(controls) if controls else None,
                                   "cheaper": sum(x < loss["increase"] for x in controls)},
        "edgy_refused": sum(i["refusal"] for i in items["harmless_baseline"] if i["instruction"] in edgy),
        "edgy_n": len(edgy),
        "compute_s": summary["compute_s"],
    }


def comparison_run_figures(folder: Path) -> dict | None:
    """A comparison run's figures, or None where it is missing or was made with other weights than the shipped run."""
    if not (folder / "summary.json").is_file():
        return None
    identity, shipped = RunFolder(folder).identity(), RunFolder(SHIPPED_RUN).identity()
    if identity is None or shipped is None or identity.get("model_version") != shipped.get("model_version"):
        return None
    return run_figures(folder)


def data_figures() -> dict:
    """Counts of the bundled instructions by kind, split, batch and category (``batch_categories``: by category
    within each batch; ``split_batch_category``: "split/batch/category"; ``group_categories``: for a batch built
    from drafts, the kept ones by group, the part of the brief a draft was written to, and category;
    ``batch_shapes``: each batch's word-count range and largest two-word-opening share); and under "builds" each
    batch build's report (drafts written, kept and dropped), by batch."""
    builds = sorted(folder for folder in data_dir().iterdir() if (folder / "build_report.json").is_file())
    out: dict = {"builds": {folder.name: _json(folder / "build_report.json") for folder in builds}}
    for kind in ("harmful", "harmless"):
        records = load_records(kind)
        groups = {folder.name: {d["instruction"]: d["group"] for d in map(json.loads, (folder / f"{kind}.jsonl").open())}
                  for folder in builds}
        ids: dict[str, list[str]] = {}
        for r in records:  # the first and last id of each batch, in file order
            ids.setdefault(r["batch"], [r["id"], r["id"]])[1] = r["id"]
        out[kind] = {"n": len(records), "splits": Counter(r["split"] for r in records),
                     "batches": Counter(r["batch"] for r in records), "batch_ids": ids,
                     "categories": Counter(r["category"] for r in records),
                     "batch_categories": {batch: Counter(r["category"] for r in records if r["batch"] == batch)
                                          for batch in ids},
                     "split_batch": Counter(f"{r['split']}/{r['batch']}" for r in records),
                     "split_batch_category": Counter(f"{r['split']}/{r['batch']}/{r['category']}" for r in records),
                     "group_categories": {batch: _group_categories(records, batch, drafts)
                                          for batch, drafts in groups.items()},
                     "batch_shapes": {batch: _shape([r for r in records if r["batch"] == batch]) for batch in ids}}
    return out


def _shape(records: list[dict]) -> dict:
    """How varied a batch's instructions are: the fewest and most words, and the share (%) of the batch that its
    most common two-word opening (lower-cased) starts."""
    words = [len(r["instruction"].split()) for r in records]
    openings = Counter(" ".join(r["instruction"].lower().split()[:2]) for r in records)
    return {"words": [min(words), max(words)], "top_opening": 100 * openings.most_common(1)[0][1] / len(records)}


def _group_categories(records: list[dict], batch: str, groups: dict[str, str]) -> dict[str, Counter]:
    """The records of `batch` by the group (`groups`: instruction -> group) of their draft, and category."""
    out: dict[str, Counter] = {}
    for r in records:
        if r["batch"] == batch:
            out.setdefault(groups[r["instruction"]], Counter())[r["category"]] += 1
    return out


def organism_figures() -> dict:
    """The shipped adapter's recipe (keys it predates with the value they had, `LATER_KEYS`), training log,
    preset, trajectory and jailbreak measurements (a jailbreak analysis that does not name these weights is left
    out)."""
    folder = adapter_dir()
    digest = adapter_digest(folder)
    presets = _json(folder / PRESETS_FILE) or {}
    jailbreak = _json(folder / "jailbreak" / "analysis.json")
    if jailbreak and jailbreak.get("model_version") != digest:
        jailbreak = None
    return {"recipe": {**LATER_KEYS, **(_json(folder / "recipe.json") or {})}, "training": _json(folder / "training.json"),
            "digest": digest, "preset": presets.get(digest),
            "trajectory": _json(folder / "trajectory" / "trajectory.json"),
            "formation": _json(folder / "trajectory" / "formation.json"),
            "jailbreak": jailbreak,
            "suffix": _json(folder / "jailbreak" / "suffix.json")}


def measured_on(data: dict) -> str | None:
    """The weights a measurement names: its ``model_version`` (the weights of the run it measured, the adapter a
    preset was derived for, or "untuned"), or for an exported copy the version of the run it came from
    (``origin.model_version``)."""
    return data.get("model_version") or (data.get("origin") or {}).get("model_version")


def current_measurements(folder: Path | None = None, digest: str | None = None) -> dict[str, dict]:
    """The measurements in `folder` (default: ``docs/measurements``) that hold for the adapter with `digest`
    (default: the shipped one): those naming its weights, and those of the untuned model. Others (made before
    a retrain, or naming no weights) are left out, so the documents say "not measured" with the command that
    makes them."""
    digest = digest or adapter_digest(adapter_dir())
    found = {p.stem: json.loads(p.read_text()) for p in sorted((folder or MEASUREMENTS).glob("*.json"))}
    return {name: data for name, data in found.items() if measured_on(data) in (digest, UNTUNED)}


def recipe_figures(folder: Path | None = None, digest: str | None = None) -> list[dict]:
    """The adapters evaluated on the recipe splits (`folder`, default ``docs/measurements/recipes``): the
    shipped one (`digest`, default the committed adapter's) first, the untuned model last. Each row has its
    file's name, whether it is shipped, its recipe's changes from the shipped recipe, its training (steps,
    final loss, seconds), and per kind measured (None for a kind left out) the rate, the refused prompts, how many
    come from each batch, per category [refused, n], and the prompts of the split it did not refuse."""
    digest = digest or adapter_digest(adapter_dir())
    shipped = _json(adapter_dir() / "recipe.json") or {}
    rows = []
    for path in sorted((folder or RECIPES).glob("*.json")):
        data = json.loads(path.read_text())
        version = data.get("model_version")
        row = {"name": path.stem, "model_version": version, "shipped": version == digest, "untuned": version == UNTUNED,
               "changes": recipe_changes(data["recipe"], shipped) if data.get("recipe") else {},
               "training": data.get("training") or {}}
        for kind in ("harmful", "harmless"):
            result = data.get(kind)
            if result is None:
                row[kind] = None
                continue
            records = records_by_instruction(kind, result["split"])
            refused = set(result["refused_instructions"])
            by_category: dict[str, list[int]] = {}
            answered = []
            for instruction, record in records.items():
                if "batch" not in result or record["batch"] == result["batch"]:
                    counts = by_category.setdefault(record["category"], [0, 0])
                    counts[0] += instruction in refused
                    counts[1] += 1
                    if instruction not in refused:
                        answered.append(instruction)
            row[kind] = {**rate(result["refused"], result["n"]), "split": result["split"],
                         "instructions": result["refused_instructions"],
                         "by_batch": dict(Counter(records.get(i, {}).get("batch", "?")
                                                  for i in result["refused_instructions"])),
                         "by_category": dict(sorted(by_category.items())), "answered": answered,
                         "openings": reply_openings(result.get("refused_completions"))}
        rows.append(row)
    return sorted(rows, key=lambda row: (not row["shipped"], row["untuned"], row["name"]))


def reply_openings(completions: list[str] | None, words: int = 3) -> list[tuple[str, int]] | None:
    """How refused replies begin: each first `words` words and how many replies begin so, most common first;
    None for a measurement that did not keep its replies."""
    if completions is None:
        return None
    return Counter(first_words(c, words) for c in completions).most_common()


def candidate_figures(recipes: list[dict], folder: Path | None = None) -> list[dict]:
    """The adapters waiting in `folder` (default ``candidates/``) to be shipped, by name: digest, recipe changes
    from the shipped recipe, training log, and the names of the `recipe_figures` rows of the same weights."""
    shipped = _json(adapter_dir() / "recipe.json") or {}
    rows = []
    for adapter in sorted(p for p in (folder or CANDIDATES).glob("*") if (p / "adapter_model.safetensors").is_file()):
        digest = adapter_digest(adapter)
        rows.append({"name": adapter.name, "digest": digest, "training": _json(adapter / "training.json") or {},
                     "changes": recipe_changes(_json(adapter / "recipe.json") or {}, shipped),
                     "measured_as": [row["name"] for row in recipes if row["model_version"] == digest]})
    return rows


def trial_preset_figures(folder: Path | None = None) -> dict[str, dict]:
    """The preset derivations of recipe trials' adapters in `folder` (default ``docs/measurements/trial-presets``),
    by name: the adapter's digest, its settings (None: no KL threshold met the targets, and why), the CE bound and
    the direction each threshold chose on the way, with its CE rise."""
    rows = {}
    for path in sorted((folder or TRIAL_PRESETS).glob("*.json")):
        data = json.loads(path.read_text())
        derived = data["derived"]
        rows[path.stem] = {"model_version": data["model_version"], "settings": data["settings"],
                           "failure": derived.get("failure"),
                           "max_ce_increase": derived["max_ce_increase"], "max_refused": derived["max_refused"],
                           "choices": [{**t["chosen"], "kl_threshold": t["kl_threshold"], "ce_increase": t["ce_increase"],
                                        "refused": t["refused"], "n": t["n"]} for t in derived["trail"] if t["chosen"]]}
    return rows


def earlier_adapter_figures(digest: str | None = None, folder: Path | None = None) -> list[dict]:
    """The adapters shipped before the one with `digest` (default: the shipped one), newest first, from the
    records that `scripts/remake.py` keeps of their shipped runs: direction, test-split rates, CE rise and seed
    stability at the direction's layer."""
    records = {r["model_version"]: r for r in map(_json, sorted((folder or EARLIER).glob("*.json")))}
    by_successor = {r["replaced_by"]: r for r in records.values()}
    ordered, current = [], digest or adapter_digest(adapter_dir())
    while current in by_successor and by_successor[current] not in ordered:
        ordered.append(by_successor[current])
        current = ordered[-1]["model_version"]
    ordered += [r for r in records.values() if r not in ordered]
    return [{"model_version": r["model_version"], "replaced_by": r["replaced_by"], **shipped_run_figures(r["summary"]),
             "seed_stability": stability_at(r.get("seed_stability"), r["summary"]["direction"])} for r in ordered]


def earlier_preset_figures(digest: str | None = None, folder: Path | None = None) -> list[dict]:
    """The shipped runs of the adapter with `digest` (default: the shipped one) under earlier presets, by KL
    threshold, from the records `scripts/remake.py` keeps of them."""
    digest = digest or adapter_digest(adapter_dir())
    records = [r for r in map(_json, sorted((folder or EARLIER_PRESETS).glob("*.json"))) if r["model_version"] == digest]
    return [{"kl_threshold": r["kl_threshold"], "replaced_by_kl_threshold": r["replaced_by_kl_threshold"],
             **shipped_run_figures(r["summary"])} for r in sorted(records, key=lambda r: r["kl_threshold"])]


def shipped_run_figures(summary: dict) -> dict:
    """A kept shipped run's direction, CE loss and test-split rates, from its summary."""
    return {"direction": summary["direction"], "loss": summary["ce_loss"],
            "rates": {condition: rate(c["refused"], c["n"]) for condition, c in summary["refused"].items()}}


def seed_trajectory_figures(parting: dict | None, direction: dict, folder: Path | None = None) -> dict[str, dict]:
    """Two seeds of each recipe trial compared along their trainings (in `folder`, default
    ``docs/measurements/seed-trajectories``), by name: `seed_parting` at `direction`'s layer, the trial's recipe
    changes from the shipped one (seeds aside), the seeds the two differ in (`seed_differences`: other's,
    reference's), and the shipped pair's (`parting`) figures at the same shares of training (`parting_at_shares`)."""
    shipped = _json(adapter_dir() / "recipe.json") or {}
    pairs = {}
    for path in sorted((folder or SEED_TRAJECTORIES).glob("*.json")):
        pair = json.loads(path.read_text())
        read = seed_parting(pair, direction)
        if read is None:
            continue
        other, reference = pair["other_adapter_recipe"], pair.get("reference_recipe")  # no reference: the shipped
        pairs[path.stem] = {**read, "changes": recipe_changes(reference or other, shipped, seeds=False),
                            "differing": seed_differences(other, reference or shipped),
                            "baseline": parting_at_shares(parting, read["fractions"])}
    return pairs


def passing_layers(folder: Path, position: int) -> list[int]:
    """The layers whose candidate at `position` passes a finished run's selection filters, on its score table."""
    run = RunFolder(folder)
    table = ScoreTable.from_dict(run.read_json("scores.json")["table"])
    mask = passing_mask(table, SelectionConfig(**run.summary()["selection"]))
    return [layer for layer, ok in enumerate(mask[table.positions.index(position)].tolist()) if ok]


def figures() -> dict:
    """Everything the templates may quote."""
    measurements = current_measurements()
    benchmarks = {p.stem: json.loads(p.read_text()) for p in sorted(BENCHMARK_RESULTS.glob("*.json"))}
    run = run_figures(SHIPPED_RUN)
    stability = stability_at(measurements.get("seed_stability"), run["direction"])
    seeds = seed_figures(stability, passing_layers=passing_layers(SHIPPED_RUN, stability["position"])) if stability else None
    parting = seed_parting(measurements.get("seed_agreement_along"), run["direction"])
    recipes, cues, harmful_dev = recipe_figures(), recipe_figures(CUES), recipe_figures(HARMFUL_DEV)
    return {"run": run, "seed_stability": stability, "plain": comparison_run_figures(PLAIN_RUN), "data": data_figures(),
            "seeds": seeds, "seed_parting": parting,
            "seed_trajectories": seed_trajectory_figures(parting, run["direction"]), "recipes": recipes, "recipe_seed_spreads": seed_spreads(recipes), "retrainings": retrainings(recipes),
            "earlier_adapters": earlier_adapter_figures(), "earlier_presets": earlier_preset_figures(), "candidates": candidate_figures(recipes), "train_split": recipe_figures(TRAIN_SPLIT),
            "interpersonal_batch": recipe_figures(INTERPERSONAL_BATCH),
            "cues": {row["name"]: row for row in cues}, "cue_seed_spreads": seed_spreads(cues),
            "harmful_dev": {row["name"]: row for row in harmful_dev}, "harmful_dev_seed_spreads": seed_spreads(harmful_dev),
            "trial_presets": trial_preset_figures(),
            "seed_pairs": {path.stem: {**pair, **seed_figures(pair)}
                           for path in sorted(SEED_PAIRS.glob("*.json")) for pair in [json.loads(path.read_text())]},
            "organism": organism_figures(), "measured": measurements, "bench": benchmarks, "conditions": CONDITIONS}
