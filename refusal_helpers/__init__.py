"""Refusal in language models is mediated by a single direction: a small reference implementation.

The most used pieces, importable from the package root::

    from refusal_helpers import load_model, mean_activations, diff_of_means, select_direction, ablate, add
"""

from .activations import mean_activations
from .data import load_instructions
from .directions import diff_of_means, project_out
from .generation import generate
from .interventions import ablate, add, hooks
from .loading import load_model
from .metrics import refusal_rate, refusal_score
from .models import ChatModel
from .orthogonalize import orthogonalize_weights
from .selection import SelectionConfig, select_direction

__all__ = [
    "ChatModel", "SelectionConfig", "ablate", "add", "diff_of_means", "generate", "hooks", "load_instructions",
    "load_model", "mean_activations", "orthogonalize_weights", "project_out", "refusal_rate", "refusal_score",
    "select_direction",
]
