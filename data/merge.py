"""What every batch's build script shares: reading and writing the instruction files, and de-duplication.

A batch is a folder beside this file holding its drafts (harmful.jsonl, harmless.jsonl: one {"instruction",
"category", "group"} record per line) and a build.py that merges the kept drafts into data/instructions/.
Batches are merged in the order of `BATCH_ORDER`: re-running one leaves out the batches after it, whose builds
then run again.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
from pathlib import Path

KINDS = ("harmful", "harmless")
INSTRUCTIONS = Path(__file__).resolve().parent / "instructions"
BATCH_ORDER = ("broadening", "breadth", "interpersonal", "cues", "harmful_dev", "gaps", "ordinary")  # the batches with a build.py, in merge order


def later_batches(batch: str) -> tuple[str, ...]:
    """The batches merged after `batch`: a build of `batch` leaves their records out."""
    return BATCH_ORDER[BATCH_ORDER.index(batch) + 1:]


def build_arguments(doc: str, batch_folder: Path) -> argparse.Namespace:
    """A batch build's command line: where the current files are, where the merged ones go, and the report."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--source", type=Path, default=INSTRUCTIONS, help="folder with the current jsonl files")
    parser.add_argument("--out", type=Path, default=INSTRUCTIONS, help="folder for the merged files")
    parser.add_argument("--report", type=Path, default=batch_folder / "build_report.json",
                        help="where to write the build report")
    return parser.parse_args()


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens: punctuation (including apostrophes and hyphens) separates words."""
    return re.findall(r"[a-z0-9]+", text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def read_jsonl(path: Path) -> tuple[list[str], list[dict]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines, [json.loads(line) for line in lines]


def dump(record: dict) -> str:
    """One record as the instruction files hold it."""
    return json.dumps(record, ensure_ascii=False)


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(dump(record) + "\n")


def deduplicate(existing: dict[str, list[dict]], drafts: dict[str, list[dict]], categories: dict[str, set[str]],
                jaccard_max: float, excluded: tuple[str, ...] = ()) -> tuple[dict[str, list[dict]], list[dict]]:
    """The drafts kept, per kind, and those dropped (with the reason and what they matched), in file order
    (harmful first): a draft is dropped if it matches one of the `excluded` regular expressions (case-insensitive),
    if, lower-cased without punctuation, it equals an existing or earlier kept instruction, or if its word set has
    a Jaccard index above `jaccard_max` with any of them (either kind, any split). Every kept draft has a known
    category and 5-30 words."""
    pool: list[tuple[str, set[str], str]] = []  # (instruction, word set, origin)
    seen: dict[str, str] = {}
    for kind in KINDS:
        for r in existing[kind]:
            pool.append((r["instruction"], set(words(r["instruction"])), f"existing {r['id']}"))
            seen.setdefault(normalise(r["instruction"]), f"existing {r['id']}")
    kept: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    dropped: list[dict] = []
    for kind in KINDS:
        for index, item in enumerate(drafts[kind]):
            text, category = item["instruction"], item["category"]
            assert text == text.strip() and category in categories[kind], (kind, item)
            norm, word_set = normalise(text), set(words(text))
            entry = {"kind": kind, "line": index + 1, "instruction": text, "category": category}
            topic = next((pattern for pattern in excluded if re.search(pattern, text, re.IGNORECASE)), None)
            if topic is not None:
                dropped.append({**entry, "reason": "excluded topic", "matches": topic})
                continue
            if norm in seen:
                dropped.append({**entry, "reason": "exact duplicate", "matches": seen[norm]})
                continue
            best = max(pool, key=lambda p: jaccard(word_set, p[1]))
            score = jaccard(word_set, best[1])
            if score > jaccard_max:
                dropped.append({**entry, "reason": f"jaccard {score:.2f}", "matches": f"{best[2]}: {best[0]}"})
                continue
            assert 5 <= len(text.split()) <= 30, (kind, text)  # the brief's length, checked on what is kept
            origin = f"new {kind} line {index + 1}"
            pool.append((text, word_set, origin))
            seen[norm] = origin
            kept[kind].append(item)
    return kept, dropped


def dropped_counts(dropped: list[dict]) -> dict[str, dict[str, int]]:
    """How many drafts of each kind were dropped, by reason."""
    def reason(d: dict) -> str:
        if d["reason"] in ("exact duplicate", "excluded topic"):
            return d["reason"]
        return "jaccard vs existing" if d["matches"].startswith("existing") else "jaccard vs new"
    return {kind: dict(collections.Counter(reason(d) for d in dropped if d["kind"] == kind))
            for kind in KINDS}


def check_merged(kind: str, records: list[dict]) -> None:
    """A merged file's invariants: contiguous ids, no instruction twice, every record with the same fields."""
    assert [r["id"] for r in records] == [f"{kind}-{i:04d}" for i in range(len(records))], kind
    norms = [normalise(r["instruction"]) for r in records]
    assert len(set(norms)) == len(norms), kind
    assert all(list(r) == ["id", "instruction", "category", "split", "batch"] for r in records), kind


def draft_counts(drafts: dict[str, list[dict]], kept: dict[str, list[dict]], dropped: list[dict],
                 new_records: dict[str, list[dict]]) -> dict:
    """A build report's counts of the drafts: written, kept, dropped by reason, kept by group, and the new ids."""
    return {
        "written": {kind: len(drafts[kind]) for kind in KINDS},
        "kept": {kind: len(kept[kind]) for kind in KINDS},
        "dropped_counts": dropped_counts(dropped),
        "kept_by_group": {kind: dict(sorted(collections.Counter(i["group"] for i in kept[kind]).items()))
                          for kind in KINDS},
        "new_ids": {kind: [new_records[kind][0]["id"], new_records[kind][-1]["id"]] if new_records[kind] else []
                    for kind in KINDS},
    }


def save_report(path: Path, report: dict) -> None:
    """Write a build report and print what each kind's drafts came to."""
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for kind in KINDS:
        print(f"{kind}: written {report['written'][kind]}, dropped {report['written'][kind] - report['kept'][kind]} "
              f"{report['dropped_counts'][kind]}, kept {report['kept'][kind]} -> {report['new_ids'][kind]}")


def merge_into_split(doc: str, batch_folder: Path, seed: int, jaccard_max: float, split: str = "train",
                     excluded: tuple[str, ...] = ()) -> None:
    """The build of a batch whose every kept draft goes to one split: "train" for a batch that only widens the
    training data (see data/breadth/build.py for the steps), or a held-out split (data/cues/build.py,
    data/harmful_dev/build.py). A batch of one kind leaves its other kind's drafts file empty. Drafts matching
    an `excluded` pattern are dropped first (`deduplicate`)."""
    args = build_arguments(doc, batch_folder)
    batch = batch_folder.name
    left_out = (batch, *later_batches(batch))
    existing = {kind: [r for r in read_jsonl(args.source / f"{kind}.jsonl")[1] if r["batch"] not in left_out]
                for kind in KINDS}
    drafts = {kind: read_jsonl(batch_folder / f"{kind}.jsonl")[1] for kind in KINDS}
    categories = {kind: {r["category"] for r in existing[kind]} for kind in KINDS}
    kept, dropped = deduplicate(existing, drafts, categories, jaccard_max, excluded)

    rng = random.Random(seed)
    merged, new_records = {}, {}
    for kind in KINDS:
        items = list(kept[kind])
        rng.shuffle(items)  # id order carries no category or drafting order
        next_number = max(int(r["id"].split("-")[1]) for r in existing[kind]) + 1
        new_records[kind] = [{"id": f"{kind}-{next_number + i:04d}", "instruction": item["instruction"],
                              "category": item["category"], "split": split, "batch": batch}
                             for i, item in enumerate(items)]
        merged[kind] = existing[kind] + new_records[kind]

    for kind in KINDS:
        check_merged(kind, merged[kind])
        write_jsonl(args.out / f"{kind}.jsonl", merged[kind])
    report = {"seed": seed, "jaccard_max": jaccard_max, "split": split, **({"excluded": list(excluded)} if excluded else {}),
              **draft_counts(drafts, kept, dropped, new_records),
              "new_by_category": {kind: dict(sorted(collections.Counter(r["category"] for r in new_records[kind]).items()))
                                  for kind in KINDS},
              "dropped": dropped}
    save_report(args.report, report)
    print(f"wrote {args.out}/harmful.jsonl, {args.out}/harmless.jsonl, {args.report}")
