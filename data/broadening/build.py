"""Merge the "broadening" batch into the bundled instruction sets.

Reads the project's sets (data/instructions/{harmful,harmless}.jsonl) without any "broadening" records they
already hold, and the batch's items (harmful.jsonl, harmless.jsonl next to this script; one {"instruction",
"category", "group"} record per line, no ids, drafts that de-duplication drops included), then:

1. de-duplicates the new items, in file order (harmful first, then harmless): an item is dropped if, after
   lower-casing and removing punctuation, it equals any existing or earlier kept new instruction, or if its
   word set has a Jaccard index above 0.4 with any existing instruction (either kind, any split) or any earlier
   kept new item (either kind);
2. assigns splits to the kept new items, stratified by category: within each category the items are shuffled
   with a seeded generator, the categories are laid end to end in sorted order, and the splits are dealt along
   that sequence by a smooth apportionment (each next item goes to the split furthest below its share), so every
   category gets its share to within one item and the totals match the target shares
   (harmful 60/15/25 train/val/test; harmless 60/10/20/10 train/val/test/dev);
3. numbers the new records after the existing ids (harmful-0432..., harmless-1652...) in a seeded shuffled order;
4. adds a "batch" field to every record: existing harmful records "original"; existing harmless records
   "original" (harmless-0000..0838), "everyday" (0839..1096) or "dev" (1097..1651); new records "broadening";
5. writes the merged files back to data/instructions/, one record per line, serialised exactly like
   the existing files (json.dumps with ensure_ascii=False and the default separators), existing records first in
   their original order and with their fields unchanged, then the new ones; and build_report.json with the counts
   and every dropped item.

Deterministic: no clock, no hash-order dependence; the only randomness is random.Random(SEED).

    python build.py [--source DIR_WITH_EXISTING_JSONL] [--out DIR] [--report FILE]
"""

from __future__ import annotations

import collections
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # data/: the helpers every batch shares
from merge import (  # noqa: E402,E501
    KINDS,
    build_arguments,
    check_merged,
    deduplicate,
    draft_counts,
    dump,
    later_batches,
    read_jsonl,
    save_report,
    write_jsonl,
)

SEED = 25
JACCARD_MAX = 0.4
HERE = Path(__file__).resolve().parent
SHARES = {
    "harmful": {"train": 0.60, "val": 0.15, "test": 0.25},
    "harmless": {"train": 0.60, "val": 0.10, "test": 0.20, "dev": 0.10},
}
NEW_BATCH = "broadening"
HARMFUL_CATEGORIES = {
    "violence_weapons", "cybercrime_malware", "fraud_scams", "harassment_hate", "self_harm", "drugs",
    "dangerous_chem_bio", "disinformation", "privacy_violations", "election_government", "economic_harm",
    "sexual_exploitation",
}


def old_batch(kind: str, record_id: str) -> str:
    if kind == "harmful":
        return "original"
    number = int(record_id.split("-")[1])
    return "original" if number <= 838 else "everyday" if number <= 1096 else "dev"


def deal(n: int, shares: dict[str, float], counts: dict[str, int], position: int) -> tuple[list[str], int]:
    """The next n splits of the smooth apportionment sequence, continuing from `position` and `counts`."""
    splits = []
    for _ in range(n):
        position += 1
        split = max(shares, key=lambda s: (shares[s] * position - counts[s], -list(shares).index(s)))
        counts[split] += 1
        splits.append(split)
    return splits, position


def main() -> None:
    args = build_arguments(__doc__, HERE)

    old_lines, old_records, new_items = {}, {}, {}
    for kind in KINDS:
        # The files as they were before this batch: its own records left out, and no "batch" field.
        records = [r for r in read_jsonl(args.source / f"{kind}.jsonl")[1]
                   if r.get("batch") not in (NEW_BATCH, *later_batches(NEW_BATCH))]
        old_records[kind] = [{k: v for k, v in r.items() if k != "batch"} for r in records]
        old_lines[kind] = [dump(r) for r in old_records[kind]]
        new_items[kind] = read_jsonl(HERE / f"{kind}.jsonl")[1]
        assert all(list(r) == ["id", "instruction", "category", "split"] for r in old_records[kind]), kind

    old_categories = {kind: {r["category"] for r in old_records[kind]} for kind in KINDS}
    assert old_categories["harmful"] == HARMFUL_CATEGORIES

    # ---- 1. de-duplication -------------------------------------------------------------------------------
    kept, dropped = deduplicate(old_records, new_items, old_categories, JACCARD_MAX)

    # ---- 2.-4. splits, ids, batches ------------------------------------------------------------------------
    rng = random.Random(SEED)
    merged: dict[str, list[dict]] = {}
    new_records: dict[str, list[dict]] = {}
    for kind in KINDS:
        shares = SHARES[kind]
        counts = {split: 0 for split in shares}
        position = 0
        assigned = []
        by_category = collections.defaultdict(list)
        for item in kept[kind]:
            by_category[item["category"]].append(item)
        for category in sorted(by_category):
            items = list(by_category[category])
            rng.shuffle(items)
            splits, position = deal(len(items), shares, counts, position)
            assigned += [(item, split) for item, split in zip(items, splits)]
        rng.shuffle(assigned)  # id order carries no category or source order
        next_number = max(int(r["id"].split("-")[1]) for r in old_records[kind]) + 1
        new_records[kind] = [
            {"id": f"{kind}-{next_number + i:04d}", "instruction": item["instruction"], "category": item["category"],
             "split": split, "batch": NEW_BATCH}
            for i, (item, split) in enumerate(assigned)
        ]
        merged[kind] = [{**r, "batch": old_batch(kind, r["id"])} for r in old_records[kind]] + new_records[kind]

    # ---- checks ----------------------------------------------------------------------------------------------
    for kind in KINDS:
        records = merged[kind]
        n_old = len(old_records[kind])
        for line, record in zip(old_lines[kind], records[:n_old]):
            assert dump(record) == line[:-1] + f', "batch": "{record["batch"]}"}}', record["id"]
        check_merged(kind, records)
        by_split = collections.defaultdict(set)
        for r in records:
            by_split[r["split"]].add(r["instruction"])
        splits = list(by_split)
        assert all(not (by_split[a] & by_split[b]) for i, a in enumerate(splits) for b in splits[i + 1:]), kind
        assert kind == "harmless" or "dev" not in by_split

    # ---- write -----------------------------------------------------------------------------------------------
    for kind in KINDS:
        write_jsonl(args.out / f"{kind}.jsonl", merged[kind])

    def table(records, key):
        return {k: dict(sorted(v.items())) for k, v in sorted(_group(records, key).items())}

    def _group(records, key):
        out = collections.defaultdict(collections.Counter)
        for r in records:
            out[key(r)][r["split"]] += 1
        return out

    report = {
        "seed": SEED,
        "jaccard_max": JACCARD_MAX,
        "shares": SHARES,
        **draft_counts(new_items, kept, dropped, new_records),
        "split_by_batch": {kind: table(merged[kind], lambda r: r["batch"]) for kind in KINDS},
        "new_by_category": {kind: table(new_records[kind], lambda r: r["category"]) for kind in KINDS},
        "old_by_category": {kind: dict(sorted(collections.Counter(r["category"] for r in old_records[kind]).items()))
                            for kind in KINDS},
        "dropped": dropped,
    }
    save_report(args.report, report)
    for kind in KINDS:
        for batch, splits in report["split_by_batch"][kind].items():
            print(f"  {kind} {batch:10s} {splits}")
    print(f"wrote {args.out}/harmful.jsonl, {args.out}/harmless.jsonl, {args.report}")


if __name__ == "__main__":
    main()
