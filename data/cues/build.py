"""Merge the "cues" batch into the bundled instruction sets: a held-out split of emotional-cue requests.

Harmless requests carrying the cues the embedded model was seen to over-refuse (feelings, relationships and
communication, benign requests on sensitive-sounding themes, and plain everyday ones for contrast), and harmful
requests wrapped in the same framing. Every kept draft goes to split "cues", which no recipe trains on and
nothing selects on: it compares training recipes on that failure (`organism evaluate --harmful-split cues
--harmless-split cues`), including recipes that train on the interpersonal batch, which the dev split does not
see. Written apart from the interpersonal batch, without reading its drafts' wording. Merged after the
interpersonal batch (`merge.BATCH_ORDER`) by the steps every batch of one split shares (`merge.merge_into_split`; see
data/breadth/build.py): de-duplication, seeded ids, batch "cues", and build_report.json. Train, val, test and dev
stay exactly as they are. Deterministic: the only randomness is random.Random(SEED).

    python build.py [--source DIR_WITH_EXISTING_JSONL] [--out DIR] [--report FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # data/: the helpers every batch shares
from merge import merge_into_split  # noqa: E402

SEED = 28
JACCARD_MAX = 0.4

if __name__ == "__main__":
    merge_into_split(__doc__, Path(__file__).resolve().parent, SEED, JACCARD_MAX, split="cues")
