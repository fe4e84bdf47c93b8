"""Instruction sets: the project's bundled splits and loaders for the standard hub datasets.

The bundled sets (``data/instructions/{harmful,harmless}.jsonl``) were written for this project; see
``data/DATASHEET.md``. Each line is ``{"id", "instruction", "category", "split"}`` with fixed splits.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from functools import lru_cache
from pathlib import Path

KINDS = ("harmful", "harmless")
# dev: both kinds, for choosing the embedded model's training recipe (never trained or selected on); cues:
# emotional-cue requests of both kinds, likewise held out, for comparing recipes on the over-refusal that dev does not hold
SPLITS = ("train", "val", "test", "dev", "cues")


PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_DIR = PACKAGE_DIR / "_bundled"  # a wheel's copy of data/ and runs/embedded/ (see setup.py)
CHECKOUT_HINT = ("refusal_helpers reads the data/ and runs/embedded/ folders of the repository: from a checkout "
                 "(git clone, then pip install -e .) or from the copy a wheel built from one carries.")


def repository_path(relative: str) -> Path:
    """A path of the repository, e.g. "data": a wheel's bundled copy, else the checkout's (which may be missing)."""
    bundled = BUNDLED_DIR / relative
    return bundled if bundled.exists() else PACKAGE_DIR.parent / relative


def data_dir() -> Path:
    """The repository's data/ folder (instructions and the embedded model's adapter)."""
    root = repository_path("data")
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found. {CHECKOUT_HINT}")
    return root


@lru_cache(maxsize=None)
def _records(kind: str) -> tuple[dict, ...]:
    if kind not in KINDS:
        raise ValueError(f"Unknown instruction kind {kind!r}: expected one of {KINDS}.")
    path = data_dir() / "instructions" / f"{kind}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"Bundled instructions not found at {path}. {CHECKOUT_HINT}")
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def load_records(kind: str, split: str | None = None) -> list[dict]:
    """Bundled records (id, instruction, category, split) of one kind, optionally of one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}: expected one of {SPLITS} or None for all.")
    return [dict(r) for r in _records(kind) if split is None or r["split"] == split]


def records_by_instruction(kind: str, split: str | None = None) -> dict[str, dict]:
    """`load_records` keyed by instruction: where a completed prompt comes from (batch, category, id)."""
    return {r["instruction"]: r for r in load_records(kind, split)}


def load_instructions(kind: str, split: str, n: int | None = None, seed: int | None = None) -> list[str]:
    """Bundled instructions of one kind ("harmful"/"harmless") and split; the first `n`, or `n` sampled with `seed`."""
    instructions = [r["instruction"] for r in load_records(kind, split)]
    return take(instructions, n, seed)


def take(items: list[str], n: int | None, seed: int | None = None) -> list[str]:
    """The first `n` items (all if None), or `n` sampled without replacement when a seed is given."""
    if n is None or n >= len(items):
        return list(items)
    if n <= 0:
        raise ValueError(f"Asked for {n} instructions; expected a positive number.")
    if seed is None:
        return list(items[:n])
    return random.Random(seed).sample(list(items), n)


def categories(kind: str) -> list[str]:
    """The category labels of a bundled set ('harmful' or 'harmless'), sorted."""
    return sorted({r["category"] for r in _records(kind)})


# ----- hub datasets --------------------------------------------------------------------------------
# Each entry: dataset name, config, split, column holding the instruction.
HUB_DATASETS: dict[str, tuple[str, str | None, str, str]] = {
    "advbench": ("walledai/AdvBench", None, "train", "prompt"),
    "alpaca": ("tatsu-lab/alpaca", None, "train", "instruction"),
    "jailbreakbench": ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "Goal"),
    "jailbreakbench_benign": ("JailbreakBench/JBB-Behaviors", "behaviors", "benign", "Goal"),
    "harmbench": ("walledai/HarmBench", "standard", "train", "prompt"),
}
HARMFUL_HUB_SETS = ("advbench", "jailbreakbench", "harmbench")
HARMLESS_HUB_SETS = ("alpaca", "jailbreakbench_benign")


def load_hub_instructions(name: str, n: int | None = None, seed: int | None = None) -> list[str]:
    """Instructions from a standard hub dataset (advbench, alpaca, jailbreakbench, harmbench) via `datasets`."""
    if name not in HUB_DATASETS:
        raise ValueError(f"Unknown hub dataset {name!r}: expected one of {sorted(HUB_DATASETS)}.")
    repo, config, split, column = HUB_DATASETS[name]
    from datasets import load_dataset

    try:
        dataset = load_dataset(repo, config, split=split)
    except Exception as err:  # datasets raises several types for "cannot reach the hub"
        raise ConnectionError(
            f"Could not load {name!r} ({repo}) from the Hugging Face Hub: {type(err).__name__}: {err}. "
            "This needs network access (and, for gated sets, HF_TOKEN and accepted terms). Offline, use "
            "the bundled sets: load_instructions('harmful' | 'harmless', split), or on the command line "
            "--harmful bundled --harmless bundled (the default)."
        ) from err
    # Alpaca: keep the instructions that stand alone (no separate input), as the paper does.
    # Stripped: trailing whitespace can merge with a template's first token when the two are tokenised together.
    instructions = [row[column].strip() for row in dataset if name != "alpaca" or not row.get("input", "").strip()]
    if not instructions:
        raise ValueError(f"Hub dataset {name!r} returned no instructions.")
    return take(instructions, n, seed)


def split_instructions(source: str, kind: str, split: str, n: int | None) -> list[str]:
    """The first `n` instructions (all if None) of a kind and split, from the bundled sets or a hub dataset
    (which has no fixed splits: halves and quarters are carved off it deterministically)."""
    if source == "bundled":
        items = load_instructions(kind, split)
    else:
        items = load_hub_instructions(source)
        carved = {"train": slice(0, len(items) // 2), "val": slice(len(items) // 2, 3 * len(items) // 4),
                  "test": slice(3 * len(items) // 4, None)}
        items = items[carved[split]]
    if not items:
        raise ValueError(f"No {kind} instructions in split {split!r} of {source!r}.")
    if n is not None and n > len(items):
        warnings.warn(f"Asked for {n} {kind} {split} instructions but {source!r} has {len(items)}: using {len(items)}.",
                      stacklevel=2)
    return take(items, n)


def data_record(source: str, instructions: list[str]) -> dict:
    """What results made from instructions depend on: their source, number and a digest of their text
    (edited files or an updated hub dataset change it where the sizes do not)."""
    digest = hashlib.sha256(json.dumps(instructions, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"source": source, "n": len(instructions), "sha256": digest}
