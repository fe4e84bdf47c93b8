"""Checks for the notebook's exercises: the library is the reference answer.

Each ``check_<exercise>(learner_fn)`` runs the learner's function and the reference on the same inputs
(random tensors, tiny random-weight chat models, BOS-adding tokenizers, logits with 120-logit gaps, a score
table with NaN, ties and candidates on each threshold) and prints one success line, or raises
``CheckFailed`` with a message that names the mistake when the answer matches a known wrong variant
(wrong sign, unnormalised direction, wrong positions, float32 sums, hooks left attached...).

Every check also verifies that the learner's function leaves its inputs unchanged (an in-place
``direction /= direction.norm()`` would silently change the notebook's direction) and returns the
reference's dtype; an exercise still holding its ``raise NotImplementedError(...)`` stub fails with one
line saying which function to write. In IPython and Jupyter a ``CheckFailed`` shows as its message alone.
"""

from .activations import (
    check_candidate_directions,
    check_mean_activations,
    check_post_instruction_positions,
)
from .beyond import check_cosine_to_final, check_head_projections
from .core import CheckFailed, compare
from .interventions import (
    check_ablation_hooks,
    check_addition_hook,
    check_nnsight_resid_pre,
    check_orthogonalize,
    check_project_out,
    check_tl_ablation_hooks,
)
from .metrics import check_kl_divergence, check_refusal_rate, check_refusal_score
from .selection import check_choose_direction

__all__ = [
    "CheckFailed", "check_ablation_hooks", "check_addition_hook", "check_candidate_directions", "check_choose_direction",
    "check_cosine_to_final", "check_head_projections", "check_kl_divergence", "check_mean_activations", "check_nnsight_resid_pre", "check_orthogonalize",
    "check_post_instruction_positions", "check_project_out", "check_refusal_rate", "check_refusal_score",
    "check_tl_ablation_hooks", "compare",
]
