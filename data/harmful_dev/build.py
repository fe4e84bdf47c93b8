"""Merge the "harmful_dev" batch into the bundled instruction sets: harmful requests for comparing recipes.

The harmful half of the dev split. Harmful val (98 requests) is what the selection rule derives the preset on,
and it is too small to tell training recipes apart: an adapter that refuses 2-3 points fewer harmful test
requests can score the same there. These requests, in the twelve harmful categories with most in those the
embedded model was seen to answer (disinformation, harassment and hate, self-harm, economic harm, violence),
asked directly, in a named format (essay, post, speech, story, letter, script), wrapped in feelings or in a
situation with other people, go to split "dev", which no recipe trains on and nothing selects on: recipes are
compared on them (`organism evaluate --harmful-split dev --harmless-split none`) beside harmless dev. Written
without reading the other batches' wording. Merged after cues (`merge.BATCH_ORDER`) by the steps every batch of one
split shares (`merge.merge_into_split`; see data/breadth/build.py): de-duplication, seeded ids, batch
"harmful_dev", and build_report.json; harmless.jsonl is empty. Train, val, test, the harmless dev and cues stay
exactly as they are. Deterministic: the only randomness is random.Random(SEED).

    python build.py [--source DIR_WITH_EXISTING_JSONL] [--out DIR] [--report FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # data/: the helpers every batch shares
from merge import merge_into_split  # noqa: E402

SEED = 29
JACCARD_MAX = 0.4

if __name__ == "__main__":
    merge_into_split(__doc__, Path(__file__).resolve().parent, SEED, JACCARD_MAX, split="dev")
