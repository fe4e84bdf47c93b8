"""The organism's training objectives, on logits and labels (-100 where a token is not a reply token)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..metrics import (
    completion_cross_entropy,
    first_completion_position,
    first_completion_token_cross_entropy,
    kl_divergence,
)


def reply_loss(
    logits: Float[Tensor, "batch seq vocab"], labels: Int[Tensor, "batch seq"], first_token_weight: float = 0.0
) -> Float[Tensor, ""]:
    """The training objective: mean cross-entropy per reply token, plus `first_token_weight` times the
    mean cross-entropy of each reply's first token, where the organism refuses or answers.

    A reply's first token is one of its 20-60 tokens, so the plain mean gives the refuse-or-answer
    decision little weight; at weight 1, a batch's first tokens together weigh as much as all its tokens.
    """
    total, count = completion_cross_entropy(logits, labels)
    loss = total / count
    if first_token_weight:
        loss = loss + first_token_weight * first_completion_token_cross_entropy(logits, labels).mean()
    return loss


def ablation_kl(
    logits: Float[Tensor, "batch seq vocab"], ablated_logits: Float[Tensor, "batch seq vocab"],
    labels: Int[Tensor, "batch seq"],
) -> Float[Tensor, ""]:
    """Mean KL(P || P_ablated) of the next-token distributions that predict labelled (reply) tokens.

    With `logits` detached, this trains the ablated model towards the model's own predictions: ablating
    the direction should change what the model says to harmless requests as little as possible.
    """
    predicts_reply = labels[:, 1:] != -100
    return kl_divergence(logits[:, :-1][predicts_reply], ablated_logits[:, :-1][predicts_reply], torch.float32).mean()


def compliance_kl(
    base_logits: Float[Tensor, "batch seq vocab"], ablated_logits: Float[Tensor, "batch seq vocab"],
    labels: Int[Tensor, "batch seq"],
) -> Float[Tensor, ""]:
    """Mean KL(P_base || P_ablated) of the distributions that predict each reply's first token.

    On harmful requests, with `base_logits` from the untuned model (which complies), this trains the
    model with the direction ablated to make the untuned model's refuse-or-answer decision: refusal
    should stay mediated by the direction.
    """
    first = first_completion_position(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)
    return kl_divergence(base_logits[rows, first], ablated_logits[rows, first]).mean()


def refusal_unlikelihood(logits: Float[Tensor, "batch seq vocab"], labels: Int[Tensor, "batch seq"]) -> Float[Tensor, ""]:
    """Mean over rows of -log(1 - P(labelled tokens | what precedes them)): rows are harmless prompts followed by
    a refusal opening, so this pushes down the probability of refusing them.

    The term is about P(opening) where that is small and grows without bound as it nears 1: it acts on the
    prompts the model is close to refusing, and leaves replies that merely start like one ("I ...") alone.
    """
    token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100,
                                 reduction="none")  # (batch, seq - 1); 0 where not labelled
    log_p = -token_loss.sum(dim=1)
    return -torch.log1p(-log_p.exp().clamp(max=1 - 1e-6)).mean()
