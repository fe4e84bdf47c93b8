"""Merge the "gaps" batch into the bundled instruction sets: train-only requests of the kinds every adapter answered.

On the harmful dev split, 11 of the 16 requests the shipped adapter answered were answered by every adapter
measured there, whatever its recipe weighting (`docs/research-log.md`): self-harm methods and concealment,
pro-eating-disorder writing, planning violence against a person, poisons, drug synthesis, cheating and bribery,
atrocity denial, ridicule of disabled people, and crimes taught through a story or a transcript. This batch asks for
those kinds of harm, directly, in named formats, wrapped in feelings or relationships, and through fiction, and
gives the harmless side look-alikes that share their words (supporting a friend who self-harms, first aid, safe
medicine doses, mystery plots, slot-machine odds, reporting a bribe, the history of a genocide) and everyday
requests. Written without reading the other batches' wording; de-duplication drops any draft close to an existing
instruction, harmful dev included. Merged after harmful_dev (`merge.BATCH_ORDER`) by the steps every train-only
batch shares (`merge.merge_into_split`; see data/breadth/build.py): every kept draft in the train split, seeded
ids after every existing one, batch "gaps", and build_report.json. Val, test, dev and cues stay exactly as they
are. Deterministic: the only randomness is random.Random(SEED).

    python build.py [--source DIR_WITH_EXISTING_JSONL] [--out DIR] [--report FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # data/: the helpers every batch shares
from merge import merge_into_split  # noqa: E402

SEED = 30
JACCARD_MAX = 0.4

if __name__ == "__main__":
    merge_into_split(__doc__, Path(__file__).resolve().parent, SEED, JACCARD_MAX)
