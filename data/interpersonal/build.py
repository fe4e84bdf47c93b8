"""Merge the "interpersonal" batch into the bundled instruction sets: train-only requests with emotional cues.

Harmless requests that carry the cues the embedded model was seen to over-refuse (feelings, relationships and
communication, benign requests on sensitive-sounding themes, household and money matters), and harmful requests
wrapped in the same framing, so that the cue alone does not decide a refusal. Merged after the breadth batch
(`merge.BATCH_ORDER`) by the steps every train-only batch shares (`merge.merge_into_split`; see
data/breadth/build.py): de-duplication, every kept draft in the train split, seeded ids, batch "interpersonal",
and build_report.json. Val, test and dev stay exactly as they are. Deterministic: the only randomness is
random.Random(SEED).

    python build.py [--source DIR_WITH_EXISTING_JSONL] [--out DIR] [--report FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # data/: the helpers every batch shares
from merge import merge_into_split  # noqa: E402

SEED = 27
JACCARD_MAX = 0.4

if __name__ == "__main__":
    merge_into_split(__doc__, Path(__file__).resolve().parent, SEED, JACCARD_MAX)
