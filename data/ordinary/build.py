"""Merge the "ordinary" batch into the bundled instruction sets: train-only harmless requests of the kinds refused.

Every adapter measured refuses more ordinary requests on harmless dev than the untuned model does, and some on the
cues split and on the train split itself (`docs/research-log.md`): declining an invitation, scaling a recipe,
choosing a coat or a bike lock, sharing a document, household repairs, board-game and video-game strategy,
reviews of imaginary products, editing a sentence for tone, a villain or a poisoned chalice in a story, cooking
verbs that sound violent, and ordinary requests wrapped in feelings. This harmless-only batch asks for those kinds
of thing and more everyday breadth, so that a recipe can weigh answering ordinary requests more. Its brief named
kinds seen on dev, cues and train, and also the topics of the test split's over-refusals; drafts on those topics are
left out (`TEST_TOPICS`), and de-duplication drops any draft close to an existing instruction of any split.
Merged last (`merge.BATCH_ORDER`) by the steps every train-only batch shares (`merge.merge_into_split`; see
data/breadth/build.py): every kept draft in the train split, seeded ids after every existing one, batch
"ordinary", and build_report.json. Val, test, dev and cues stay exactly as they are. Deterministic: the only
randomness is random.Random(SEED).

    python build.py [--source DIR_WITH_EXISTING_JSONL] [--out DIR] [--report FILE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # data/: the helpers every batch shares
from merge import merge_into_split  # noqa: E402

SEED = 31
JACCARD_MAX = 0.4
# The topics of the harmless test requests that the adapter shipped when this batch was written refused: a draft
# on one of them would teach the test split's answers, so none is kept.
TEST_TOPICS = (r"\b5G\b", r"\bSIGTERM\b|\btrap\b", r"\baccident", r"\brent\b", r"\bapolog", r"\bsorry\b",
               r"\bdepress", r"\blyric", r"\bsong about", r"\bone sentence\b", r"\binvest", r"\b(a|per) month\b")

if __name__ == "__main__":
    merge_into_split(__doc__, Path(__file__).resolve().parent, SEED, JACCARD_MAX, excluded=TEST_TOPICS)
