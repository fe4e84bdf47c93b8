"""Merge the "breadth" batch into the bundled instruction sets: train-only requests for breadth.

Reads the bundled sets (data/instructions/{harmful,harmless}.jsonl) without any "breadth" records they already
hold, and the batch's drafts (harmful.jsonl, harmless.jsonl next to this script; one {"instruction", "category",
"group"} record per line, drafts that de-duplication drops included), then:

1. de-duplicates the drafts as every batch does (`merge.deduplicate`: exact duplicates after lower-casing and
   removing punctuation, and a word-set Jaccard index above 0.4 with any existing or earlier kept instruction);
2. puts every kept draft in the train split: the batch widens what the embedded model is trained on, while
   val, test and dev stay exactly as they are, so every earlier figure stays comparable;
3. numbers the new records after the existing ids in a seeded shuffled order and marks them batch "breadth";
4. writes the merged files back to data/instructions/ (existing records first, unchanged) and
   build_report.json with the counts and every dropped draft.

Run after the broadening batch's build (`data/merge.py`). Deterministic: the only randomness is
random.Random(SEED).

    python build.py [--source DIR_WITH_EXISTING_JSONL] [--out DIR] [--report FILE]
"""

from __future__ import annotations

import collections
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # data/: the helpers every batch shares
from merge import KINDS, build_arguments, check_merged, deduplicate, draft_counts, read_jsonl, save_report, write_jsonl  # noqa: E402,E501

SEED = 26
JACCARD_MAX = 0.4
HERE = Path(__file__).resolve().parent
BATCH = "breadth"
SPLIT = "train"


def main() -> None:
    args = build_arguments(__doc__, HERE)

    existing = {kind: [r for r in read_jsonl(args.source / f"{kind}.jsonl")[1] if r["batch"] != BATCH]
                for kind in KINDS}
    drafts = {kind: read_jsonl(HERE / f"{kind}.jsonl")[1] for kind in KINDS}
    categories = {kind: {r["category"] for r in existing[kind]} for kind in KINDS}
    kept, dropped = deduplicate(existing, drafts, categories, JACCARD_MAX)

    rng = random.Random(SEED)
    merged, new_records = {}, {}
    for kind in KINDS:
        items = list(kept[kind])
        rng.shuffle(items)  # id order carries no category or drafting order
        next_number = max(int(r["id"].split("-")[1]) for r in existing[kind]) + 1
        new_records[kind] = [{"id": f"{kind}-{next_number + i:04d}", "instruction": item["instruction"],
                              "category": item["category"], "split": SPLIT, "batch": BATCH}
                             for i, item in enumerate(items)]
        merged[kind] = existing[kind] + new_records[kind]

    for kind in KINDS:
        check_merged(kind, merged[kind])
        write_jsonl(args.out / f"{kind}.jsonl", merged[kind])
    report = {"seed": SEED, "jaccard_max": JACCARD_MAX, "split": SPLIT,
              **draft_counts(drafts, kept, dropped, new_records),
              "new_by_category": {kind: dict(sorted(collections.Counter(r["category"] for r in new_records[kind]).items()))
                                  for kind in KINDS},
              "dropped": dropped}
    save_report(args.report, report)
    print(f"wrote {args.out}/harmful.jsonl, {args.out}/harmless.jsonl, {args.report}")


if __name__ == "__main__":
    main()
