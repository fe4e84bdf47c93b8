"""Merge the "breadth" batch into the bundled instruction sets: train-only requests for breadth.

Reads the bundled sets (data/instructions/{harmful,harmless}.jsonl) without the records of this batch and of the
batches merged after it, and the batch's drafts (harmful.jsonl, harmless.jsonl next to this script; one
{"instruction", "category", "group"} record per line, drafts that de-duplication drops included), then:

1. de-duplicates the drafts as every batch does (`merge.deduplicate`: exact duplicates after lower-casing and
   removing punctuation, and a word-set Jaccard index above 0.4 with any existing or earlier kept instruction);
2. puts every kept draft in the train split: the batch widens what the embedded model is trained on, while
   val, test and dev stay exactly as they are, so every earlier figure stays comparable;
3. numbers the new records after the existing ids in a seeded shuffled order and marks them batch "breadth";
4. writes the merged files back to data/instructions/ (existing records first, unchanged) and
   build_report.json with the counts and every dropped draft.

Run after the broadening batch's build and before the interpersonal one's (`merge.BATCH_ORDER`). The steps are
`merge.merge_into_split`'s, which every train-only batch shares. Deterministic: the only randomness is
random.Random(SEED).

    python build.py [--source DIR_WITH_EXISTING_JSONL] [--out DIR] [--report FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # data/: the helpers every batch shares
from merge import merge_into_split  # noqa: E402

SEED = 26
JACCARD_MAX = 0.4

if __name__ == "__main__":
    merge_into_split(__doc__, Path(__file__).resolve().parent, SEED, JACCARD_MAX)
