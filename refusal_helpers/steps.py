"""The paper's pipeline steps as functions on a model and data, without disk I/O (`pipeline` stores them).

1. `extract`: difference-of-means candidates for every (post-instruction position, layer);
2. selection: `selection.select_direction` (scores on validation prompts, the paper's filters and choice);
3. `generate_condition`: judged completions on held-out prompts, plain or under an intervention (`CONDITIONS`);
4. `ablation_loss`: cross-entropy of harmless completions with and without ablation (a coherence check), with
   each prompt's first token spared (what the attention sink contributes), and with random unit directions
   ablated instead (what removing any one direction costs).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

from jaxtyping import Float
from torch import Tensor

from .activations import mean_activations
from .directions import diff_of_means, random_directions, zero_dims
from .evaluation import completion_loss
from .interventions import ablate, add
from .judges import Judge, judged_completions
from .models import ChatModel


class Condition(NamedTuple):
    kind: str  # of prompts: "harmful" or "harmless"
    intervention: str | None  # None, "ablation", "ablation_spared", "subtract" or "add"
    label: str  # for the summary table


CONDITIONS = {
    "harmful_baseline": Condition("harmful", None, "harmful, baseline"),
    "harmful_ablation": Condition("harmful", "ablation", "harmful, ablation"),
    # ablated at every token but each prompt's first (the attention sink)
    "harmful_ablation_spared": Condition("harmful", "ablation_spared", "harmful, ablation, first token spared"),
    "harmful_actadd": Condition("harmful", "subtract", "harmful, subtract r"),
    "harmless_baseline": Condition("harmless", None, "harmless, baseline"),
    "harmless_actadd": Condition("harmless", "add", "harmless, add r"),
}
RANDOM_SEED = 0  # of the random control directions


def extract(
    cm: ChatModel, harmful: list[str], harmless: list[str], dims: tuple[int, ...] = (), batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Float[Tensor, "pos layer d_model"]]:
    """Mean activations of both kinds at the post-instruction positions of every layer, and their difference
    with `dims` zeroed (``{"candidates", "harmful_mean", "harmless_mean"}``, float32)."""
    means = {kind: mean_activations(cm, instructions, batch_size=batch_size,
                                    progress=f"mean activations ({kind})" if progress else False)
             for kind, instructions in (("harmful", harmful), ("harmless", harmless))}
    candidates = zero_dims(diff_of_means(means["harmful"], means["harmless"]).float(), dims)
    return {"candidates": candidates, "harmful_mean": means["harmful"].float(), "harmless_mean": means["harmless"].float()}


def intervention(
    cm: ChatModel, kind: str | None, direction: Float[Tensor, " d_model"], layer: int
) -> AbstractContextManager:
    """The context a condition's completions are made in (see `Condition.intervention`)."""
    if kind is None:
        return nullcontext()
    if kind in ("ablation", "ablation_spared"):
        return ablate(cm, direction, spare_first_token=kind == "ablation_spared")
    if kind in ("subtract", "add"):
        return add(cm, direction, layer, coeff=-1.0 if kind == "subtract" else 1.0)
    raise ValueError(f"Unknown intervention {kind!r}: expected None, 'ablation', 'ablation_spared', 'subtract' or 'add'.")


def generate_condition(
    cm: ChatModel, condition: str, instructions: list[str], direction: Float[Tensor, " d_model"], layer: int,
    max_new_tokens: int, batch_size: int = 32, progress: bool = True, judge: Judge | None = None,
) -> list[dict]:
    """Greedy completions of `instructions` under the condition's intervention, judged there (default judge:
    substring)."""
    with intervention(cm, CONDITIONS[condition].intervention, direction, layer):
        return judged_completions(cm, instructions, max_new_tokens, batch_size,
                                  progress=f"generating {condition}" if progress else False, judge=judge)


def ablation_loss(
    cm: ChatModel, instructions: list[str], completions: list[str], direction: Float[Tensor, " d_model"],
    random_controls: int = 3, dims: tuple[int, ...] = (), progress: bool = True,
) -> dict:
    """CE (nats/token) of `completions`: plain, with `direction` ablated, ablated but for each prompt's first
    token, and the increase when each of `random_controls` random unit directions (with `dims` zeroed, the same
    kind of direction) is ablated instead."""
    def loss_under(label: str, r: Tensor | None = None, spare_first_token: bool = False) -> float:
        with ablate(cm, r, spare_first_token=spare_first_token) if r is not None else nullcontext():
            return completion_loss(cm, instructions, completions,
                                   progress=f"completion loss, {label}" if progress else False)

    baseline = loss_under("baseline")
    ablated = loss_under("direction ablated", direction)
    spared = loss_under("direction ablated, first token spared", direction, spare_first_token=True)
    randoms = zero_dims(random_directions(random_controls, cm.d_model, seed=RANDOM_SEED), dims)
    controls = [loss_under(f"random direction {i + 1} ablated", r) - baseline for i, r in enumerate(randoms)]
    return {
        "data": "harmless test completions of the unmodified model",
        "baseline": baseline, "ablation": ablated, "increase": ablated - baseline,
        "first_token_spared": {"ablation": spared, "increase": spared - baseline},
        "random_controls": {"seed": RANDOM_SEED, "increases": controls,
                            "mean_increase": sum(controls) / len(controls) if controls else None},
    }
