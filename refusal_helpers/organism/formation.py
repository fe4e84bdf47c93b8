"""What the trajectory means causally: is the untuned model's direction already a refusal direction?

The untuned model already separates harmful from harmless prompts along a direction close to the final one.
`causal_tests` asks what that direction does: adding the final direction to the untuned model, adding the
untuned model's own direction to the tuned one (rescaled to the final direction's norm, so that only the
direction differs), and ablating each from the tuned model. `timeline` reads the trajectory for when refusal
appears relative to when the direction's norm grows and its cosine with the final one settles.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from jaxtyping import Float
from torch import Tensor

from ..data import load_instructions
from ..directions import zero_dims
from ..interventions import ablate, add
from ..judges import judged_completions, refused_count
from ..models import ChatModel


def _refused(cm: ChatModel, prompts: list[str], context, max_new_tokens: int) -> dict:
    with context:
        items = judged_completions(cm, prompts, max_new_tokens)
    return {"refused": refused_count(items), "n": len(items)}


def causal_tests(
    tuned: ChatModel, untuned: ChatModel, final: Float[Tensor, " d_model"], untuned_direction: Float[Tensor, " d_model"],
    layer: int, n_prompts: int = 32, max_new_tokens: int = 48,
) -> dict:
    """Refusal on validation prompts under each swap of direction and model (see the module docstring)."""
    harmful, harmless = (load_instructions(kind, "val")[:n_prompts] for kind in ("harmful", "harmless"))
    early = untuned_direction * (final.norm() / untuned_direction.norm())  # the untuned direction at the final norm
    cosine = float(torch.nn.functional.cosine_similarity(final, untuned_direction, dim=0))
    return {
        "layer": layer, "n_prompts": n_prompts, "max_new_tokens": max_new_tokens, "cosine": cosine,
        "untuned_norm": float(untuned_direction.norm()), "final_norm": float(final.norm()),
        "untuned": {"harmful": _refused(untuned, harmful, nullcontext(), max_new_tokens),
                    "harmless": _refused(untuned, harmless, nullcontext(), max_new_tokens),
                    "harmless_final_added": _refused(untuned, harmless, add(untuned, final, layer), max_new_tokens),
                    "harmful_final_added": _refused(untuned, harmful, add(untuned, final, layer), max_new_tokens)},
        "tuned": {"harmful": _refused(tuned, harmful, nullcontext(), max_new_tokens),
                  "harmless": _refused(tuned, harmless, nullcontext(), max_new_tokens),
                  "harmless_final_added": _refused(tuned, harmless, add(tuned, final, layer), max_new_tokens),
                  "harmless_untuned_added": _refused(tuned, harmless, add(tuned, early, layer), max_new_tokens),
                  "harmful_final_ablated": _refused(tuned, harmful, ablate(tuned, final), max_new_tokens),
                  "harmful_untuned_ablated": _refused(tuned, harmful, ablate(tuned, untuned_direction), max_new_tokens)},
    }


def untuned_direction(record: dict, candidates: Float[Tensor, "checkpoint pos layer d_model"], position: int,
                      layer: int, dims: list[int]) -> Float[Tensor, " d_model"]:
    """The untuned model's (step 0) candidate at the run's position and layer, with the run's dimensions zeroed."""
    if record["checkpoints"][0]["step"] != 0:
        raise ValueError("The trajectory does not start at step 0 (the untuned model): record it from the start.")
    return zero_dims(candidates[0, record["positions"].index(position), layer], dims)


def first_step(steps: list[int], values: list[float], threshold: float) -> int | None:
    """The first step at which `values` reaches `threshold` (None if it never does)."""
    return next((s for s, v in zip(steps, values) if v >= threshold), None)


def timeline(record: dict, candidates: Float[Tensor, "checkpoint pos layer d_model"]) -> dict:
    """When refusal appears, and when the selected cell's norm and cosine reach most of their final values."""
    final = record["final"]
    steps = [c["step"] for c in record["checkpoints"]]
    index = record["positions"].index(final["position"])
    norms = candidates[:, index, final["layer"]].norm(dim=-1).tolist()
    cosines = [row[final["layer"]] for row in final["cosine"]]
    harmful = [c["refusal_rate"]["harmful"] for c in record["checkpoints"]]
    return {
        "steps": steps, "norm": norms, "cosine": cosines, "harmful_refusal": harmful,
        "harmless_refusal": [c["refusal_rate"]["harmless"] for c in record["checkpoints"]],
        "refusal_half": first_step(steps, harmful, 0.5), "refusal_90": first_step(steps, harmful, 0.9),
        "norm_half": first_step(steps, [n / norms[-1] for n in norms], 0.5),
        "norm_90": first_step(steps, [n / norms[-1] for n in norms], 0.9),
        "cosine_90": first_step(steps, cosines, 0.9), "cosine_95": first_step(steps, cosines, 0.95),
    }
