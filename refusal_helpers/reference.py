"""The paper's direction selection as its released code defines it: a slow, independent oracle.

Arditi et al.'s ``select_direction`` scores every candidate with full forward passes over padded batches
(logits at every position, the last one used), hooks registered directly on each block's input and on each
attention and MLP module's output, a refusal score of ``log(p + 1e-8) - log(1 - p + 1e-8)`` and a KL of
``sum P (log(P + 1e-6) - log(Q + 1e-6))``; it discards candidates with any NaN score, from layers
``>= int(n_layers * (1 - 0.2))``, with KL above the threshold or induce below it, and keeps the lowest bypass.
Nothing here uses the library's hooks, metrics or selection code: `tests/test_conformance.py` and
``benchmarks/bench_selection.py`` check the library against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor

from .models import ChatModel

REFUSAL_EPSILON, KL_EPSILON, PRUNE = 1e-8, 1e-6, 0.2


def paper_refusal_score(logits: Float[Tensor, "batch vocab"], refusal_ids: list[int]) -> Float[Tensor, " batch"]:
    probs = torch.softmax(logits.to(torch.float64), dim=-1)
    p = probs[:, refusal_ids].sum(dim=-1)
    return torch.log(p + REFUSAL_EPSILON) - torch.log(torch.ones_like(p) - p + REFUSAL_EPSILON)


def paper_kl(a: Float[Tensor, "batch vocab"], b: Float[Tensor, "batch vocab"]) -> Float[Tensor, " batch"]:
    pa, pb = a.to(torch.float64).softmax(-1), b.to(torch.float64).softmax(-1)
    return torch.sum(pa * (torch.log(pa + KL_EPSILON) - torch.log(pb + KL_EPSILON)), dim=-1)


def _unit(direction: Tensor) -> Tensor:
    return direction / (direction.norm(dim=-1, keepdim=True) + 1e-8)


@contextmanager
def _registered(pre: list, post: list) -> Iterator[None]:
    handles = [m.register_forward_pre_hook(h) for m, h in pre] + [m.register_forward_hook(h) for m, h in post]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _ablation(cm: ChatModel, direction: Tensor):
    """The paper's pre-hooks (block inputs) and hooks (attention and MLP outputs) for ablating `direction`."""
    r = _unit(direction)

    def project(x: Tensor) -> Tensor:
        rr = r.to(x)
        return x - (x @ rr).unsqueeze(-1) * rr

    def pre(module, args):
        return (project(args[0]), *args[1:])

    def post(module, args, output):
        return (project(output[0]), *output[1:]) if isinstance(output, tuple) else project(output)

    parts = [cm.parts(layer) for layer in range(cm.n_layers)]
    return [(p.block, pre) for p in parts], [(m, post) for p in parts for m in (p.attn, p.mlp)]


def _addition(cm: ChatModel, vector: Tensor, layer: int):
    def pre(module, args):
        return (args[0] + vector.to(args[0]), *args[1:])

    return [(cm.parts(layer).block, pre)], []


@torch.inference_mode()
def _last_logits(cm: ChatModel, instructions: list[str], hooks=([], []), batch_size: int = 32) -> Tensor:
    out = []
    with _registered(*hooks):
        for start in range(0, len(instructions), batch_size):
            inputs = cm.tokenize(instructions[start : start + batch_size])
            out.append(cm.model(**inputs).logits[:, -1, :].to(torch.float64).cpu())  # full logits, last one used
    return torch.cat(out)


def paper_scores(
    cm: ChatModel, candidates: Float[Tensor, "pos layer d_model"], harmful: list[str], harmless: list[str],
    cells: list[tuple[int, int]] | None = None,
) -> dict[tuple[int, int], dict[str, float]]:
    """{(position index, layer): {"bypass", "induce", "kl"}} for `cells` (default: every candidate)."""
    cells = cells or [(p, l) for p in range(candidates.shape[0]) for l in range(candidates.shape[1])]
    ids = cm.refusal_token_ids
    base_harmless = _last_logits(cm, harmless)
    scores = {}
    for p, layer in cells:
        r = candidates[p, layer]
        ablation = _ablation(cm, r)
        scores[p, layer] = {
            "bypass": float(paper_refusal_score(_last_logits(cm, harmful, ablation), ids).mean()),
            "induce": float(paper_refusal_score(_last_logits(cm, harmless, _addition(cm, r, layer)), ids).mean()),
            "kl": float(paper_kl(base_harmless, _last_logits(cm, harmless, ablation)).mean()),
        }
    return scores


def paper_choice(scores: dict[tuple[int, int], dict[str, float]], n_layers: int, kl_threshold: float = 0.1,
                 induce_threshold: float = 0.0) -> tuple[int, int]:
    """The (position index, layer) the paper's filter and sort keep, from `paper_scores`."""
    kept = []
    for (p, layer), s in scores.items():
        if any(math.isnan(v) for v in s.values()) or layer >= int(n_layers * (1.0 - PRUNE)):
            continue
        if s["kl"] > kl_threshold or s["induce"] < induce_threshold:
            continue
        kept.append((-s["bypass"], p, layer))
    if not kept:
        raise ValueError("All scores have been filtered out.")
    _, p, layer = sorted(kept, key=lambda k: k[0], reverse=True)[0]
    return p, layer
