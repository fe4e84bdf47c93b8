"""Residual-stream activations at chosen positions and layers, and their streaming means."""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .batching import batches, check_instructions, progress_batches
from .hookpoints import hook_name
from .interventions import hooks
from .models import ChatModel


@torch.inference_mode()
def residual_activations(
    cm: ChatModel,
    inputs: dict[str, Tensor],
    positions: list[int],
    layers: list[int],
) -> Float[Tensor, "batch pos layer d_model"]:
    """The residual stream entering each of `layers`, at `positions` (negative: from the end), for one batch."""
    seq = inputs["input_ids"].shape[1]
    outside = [p for p in positions if not -seq <= p < seq]
    if outside:
        raise ValueError(f"Positions {outside} lie outside the batch's {seq} tokens: use positions in {-seq}..{seq - 1} "
                         "(negative ones count from the end of the left-padded prompts).")
    bad_layers = [layer for layer in layers if not 0 <= layer < cm.n_layers]
    if bad_layers:
        raise ValueError(f"Layers {bad_layers} do not exist: the model has layers 0..{cm.n_layers - 1}.")
    captured: dict[int, Tensor] = {}

    def capture(layer: int):
        def fn(x: Tensor) -> Tensor:
            captured[layer] = x[:, positions, :]
            return x

        return fn

    with hooks(cm, {hook_name(layer): capture(layer) for layer in layers}):
        cm.forward(inputs, logits_to_keep=1)
    return torch.stack([captured[layer] for layer in layers], dim=2)


def check_template_tail(cm: ChatModel, inputs: dict[str, Tensor], instructions: list[str]) -> None:
    """Raise a clear error unless every prompt of the batch (made from `instructions`) ends with the
    post-instruction template tokens, so that the negative post-instruction positions really point at them."""
    tail = torch.tensor(cm.post_instruction_ids, device=inputs["input_ids"].device)
    ends = inputs["input_ids"][:, -len(tail):]
    bad = (ends != tail).any(dim=-1).nonzero().flatten().tolist()
    if bad:
        got = cm.tokenizer.convert_ids_to_tokens(ends[bad[0]].tolist())
        raise ValueError(f"The prompt of {instructions[bad[0]]!r} does not end with the post-instruction template "
                         f"tokens {cm.post_instruction_tokens}, but with {got}: the instruction's last characters "
                         "merged with the template when tokenised. Strip trailing whitespace, or pass explicit positions.")


def _resolve(cm: ChatModel, positions: list[int] | None, layers: list[int] | None) -> tuple[list[int], list[int]]:
    positions = cm.post_instruction_positions if positions is None else list(positions)
    layers = list(range(cm.n_layers)) if layers is None else list(layers)
    return positions, layers


def mean_activations(
    cm: ChatModel,
    instructions: list[str],
    positions: list[int] | None = None,
    layers: list[int] | None = None,
    batch_size: int = 32,
    progress: bool | str = False,
) -> Float[Tensor, "pos layer d_model"]:
    """Mean residual activation over `instructions`, per position and layer, accumulated in float64.

    Defaults: the post-instruction positions and every layer. Memory does not grow with the number of
    instructions: each batch is added to a running float64 sum.
    """
    check_instructions(instructions)
    template_positions = positions is None
    positions, layers = _resolve(cm, positions, layers)
    total = torch.zeros(len(positions), len(layers), cm.d_model, dtype=torch.float64, device=cm.device)
    for chunk in progress_batches(instructions, batch_size, progress, "mean activations"):
        inputs = cm.tokenize(chunk)
        if template_positions:
            check_template_tail(cm, inputs, chunk)
        acts = residual_activations(cm, inputs, positions, layers)
        total += acts.to(torch.float64).sum(dim=0)
    return (total / len(instructions)).cpu()


def collect_activations(
    cm: ChatModel,
    instructions: list[str],
    positions: list[int] | None = None,
    layers: list[int] | None = None,
    batch_size: int = 32,
) -> Float[Tensor, "n pos layer d_model"]:
    """Per-instruction residual activations (float32, on CPU), e.g. for projection plots."""
    check_instructions(instructions)
    positions, layers = _resolve(cm, positions, layers)
    parts = [
        residual_activations(cm, cm.tokenize(chunk), positions, layers).float().cpu()
        for chunk in batches(instructions, batch_size)
    ]
    return torch.cat(parts)
