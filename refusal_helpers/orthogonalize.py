"""Weight orthogonalization: fold directional ablation into the weights.

Every matrix that writes to the residual stream (token and position embeddings, each attention output
projection, each MLP output projection, and their biases) is replaced by its projection orthogonal to
r_hat. Then no component along r_hat ever enters the residual stream, which is exactly what ablation
hooks enforce, so the edited model needs no hooks. Tied embedding / unembedding weights are untied
first, so the unembedding keeps reading the original directions.

Folding is exact only where the out-projection's output is what is added to the residual stream.
Gemma 2/3 put a norm after it (post-norms); there, orthogonalizing the projection does not remove the
direction from what is added, so ``orthogonalize_weights`` refuses such models.
"""

from __future__ import annotations

import os

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .directions import check_direction, orthogonalize_matrix
from .models import ChatModel


class NotFoldableError(ValueError):
    """Ablation cannot be folded exactly into this architecture's weights."""


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2: weight is (d_in, d_out)


@torch.no_grad()
def orthogonalize_linear_(module: nn.Module, direction: Float[Tensor, "d_model"]) -> None:
    """In place: make a layer's outputs (weight and bias) orthogonal to the direction."""
    w = module.weight
    out_dim = -1 if _is_conv1d(module) else 0
    w.copy_(orthogonalize_matrix(w.double(), direction.double(), dim=out_dim).to(w.dtype))
    if getattr(module, "bias", None) is not None:
        b = module.bias
        b.copy_(orthogonalize_matrix(b.double(), direction.double(), dim=-1).to(b.dtype))


@torch.no_grad()
def untie_embeddings(cm: ChatModel) -> None:
    """Give the unembedding its own copy of the weights if it shares them with the embedding."""
    unembed = cm.unembed
    if unembed is not None and unembed.weight.data_ptr() == cm.embed.weight.data_ptr():
        unembed.weight = nn.Parameter(cm.embed.weight.detach().clone())
    for config in {id(c): c for c in (cm.model.config, cm.model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


@torch.no_grad()
def orthogonalize_weights(cm: ChatModel, direction: Float[Tensor, "d_model"]) -> ChatModel:
    """In place: fold ablation of `direction` into the model's weights; returns the same ChatModel."""
    check_direction(direction, cm.d_model)
    if cm.has_post_norms:
        raise NotFoldableError(
            f"{type(cm.model).__name__} normalises attention and MLP outputs (post-norms) before adding them "
            "to the residual stream, so orthogonalizing the output projections would not remove the "
            "direction from what is added. Use hook ablation (interventions.ablate) for this model."
        )
    untie_embeddings(cm)
    embeddings = [cm.embed] + ([cm.position_embed] if cm.position_embed is not None else [])
    for emb in embeddings:
        emb.weight.copy_(orthogonalize_matrix(emb.weight.double(), direction.double(), dim=-1).to(emb.weight.dtype))
    for layer in range(cm.n_layers):
        parts = cm.parts(layer)
        orthogonalize_linear_(parts.attn_out_proj, direction)
        orthogonalize_linear_(parts.mlp_out_proj, direction)
    return cm


def save_model(cm: ChatModel, folder: str | os.PathLike) -> None:
    """Save model and tokenizer with ``save_pretrained`` (safetensors)."""
    cm.model.save_pretrained(folder)
    cm.tokenizer.save_pretrained(folder)
