"""Choosing the refusal direction among the (position, layer) candidates, as in Arditi et al. (2024).

- `rule`: the score table, the paper's filters and its choice (pure);
- `scoring`: computing the table on validation prompts, and the paper's filter of prompts by baseline refusal;
- `engine`: the fast path that scoring runs on (a shared-prefix KV cache, starting at a layer).
"""

from .rule import (
    ScoreTable,
    Selection,
    SelectionConfig,
    allowed_layers,
    candidate_order,
    choose,
    layer_mask,
    passing_mask,
)
from .scoring import keep_consistent, score_candidates, select_direction

__all__ = [
    "ScoreTable", "Selection", "SelectionConfig", "allowed_layers", "candidate_order", "choose", "keep_consistent",
    "layer_mask", "passing_mask", "score_candidates", "select_direction",
]
