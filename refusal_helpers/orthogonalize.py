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

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .directions import check_direction, orthogonalize_matrix
from .models import ChatModel


class NotFoldableError(ValueError):
    """Ablation cannot be folded exactly into this architecture's weights."""


def writers(cm: ChatModel) -> list[tuple[nn.Module, int]]:
    """Every module that writes to the residual stream, with the layer whose weight it takes: the token (and
    learned position) embeddings take layer 0's, each block's attention and MLP output projections their own."""
    embeddings = [cm.embed] + ([cm.position_embed] if cm.position_embed is not None else [])
    blocks = [(m, layer) for layer in range(cm.n_layers)
              for m in (cm.parts(layer).attn_out_proj, cm.parts(layer).mlp_out_proj)]
    return [(e, 0) for e in embeddings] + blocks


def output_dim(module: nn.Module) -> int:
    """The axis of a writer's weight that lies in the residual stream: a Linear's rows (d_model, d_in), an
    embedding's and a GPT-2 Conv1D's columns (vocab or d_in, d_model)."""
    return 0 if isinstance(module, nn.Linear) else -1


@torch.no_grad()
def orthogonalize_module_(module: nn.Module, direction: Float[Tensor, " d_model"], weight: float = 1.0) -> None:
    """In place: remove `weight` times the component along the direction from a writer's outputs (its weight
    and bias); weight 1 makes them orthogonal to it."""
    r = direction.double()
    for param, dim in ((module.weight, output_dim(module)), (getattr(module, "bias", None), -1)):
        if param is not None:
            original = param.double()
            orthogonal = orthogonalize_matrix(original, r, dim=dim)
            param.copy_((orthogonal if weight == 1 else original - weight * (original - orthogonal)).to(param.dtype))


@torch.no_grad()
def untie_embeddings(cm: ChatModel) -> None:
    """Give the unembedding its own copy of the weights if it shares them with the embedding."""
    unembed = cm.unembed
    if unembed is not None and unembed.weight.data_ptr() == cm.embed.weight.data_ptr():
        unembed.weight = nn.Parameter(cm.embed.weight.detach().clone())
    for config in {id(c): c for c in (cm.model.config, cm.model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


@torch.no_grad()
def orthogonalize_weights(
    cm: ChatModel, direction: Float[Tensor, " d_model"], layer_weights: list[float] | None = None
) -> ChatModel:
    """In place: fold ablation of `direction` into the model's weights; returns the same ChatModel.

    `layer_weights` (default: 1 at every layer, the paper's ablation) scales what each layer's writers lose
    of their component along the direction (the embeddings take layer 0's).
    """
    check_direction(direction, cm.d_model)
    if cm.has_post_norms:
        raise NotFoldableError(
            f"{type(cm.model).__name__} normalises attention and MLP outputs (post-norms) before adding them "
            "to the residual stream, so orthogonalizing the output projections would not remove the "
            "direction from what is added. Use hook ablation (interventions.ablate) for this model."
        )
    weights = [1.0] * cm.n_layers if layer_weights is None else list(layer_weights)
    if len(weights) != cm.n_layers:
        raise ValueError(f"Expected one weight per layer ({cm.n_layers}), got {len(weights)}.")
    untie_embeddings(cm)
    for module, layer in writers(cm):
        if weights[layer]:
            orthogonalize_module_(module, direction, weights[layer])
    return cm

