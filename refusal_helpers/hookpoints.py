"""Hook points, named as in TransformerLens: the one place that builds, parses and resolves hook names.

- ``blocks.{l}.hook_resid_pre``: the residual stream entering block l (a hook on the block's input);
- ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out``: what attention / the MLP of block l adds to the
  residual stream (a hook on that module's output; after Gemma 2/3's post-norms, which is what is added).
"""

from __future__ import annotations

from torch import nn

from .models import ChatModel

RESID_PRE, ATTN_OUT, MLP_OUT = "hook_resid_pre", "hook_attn_out", "hook_mlp_out"
HOOK_KINDS = (RESID_PRE, ATTN_OUT, MLP_OUT)


def hook_name(layer: int, kind: str = RESID_PRE) -> str:
    """The hook point of `kind` at block `layer`, e.g. ``blocks.3.hook_resid_pre``."""
    if kind not in HOOK_KINDS:
        raise KeyError(f"Unknown hook kind {kind!r}; expected one of {HOOK_KINDS}.")
    return f"blocks.{layer}.{kind}"


def parse_hook_name(name: str, n_layers: int | None = None) -> tuple[int, str]:
    """(layer, kind) of a hook name; a KeyError naming the expected form for anything else."""
    parts = name.split(".") if isinstance(name, str) else []
    valid = len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in HOOK_KINDS
    if not valid or (n_layers is not None and int(parts[1]) >= n_layers):
        layers = f"0..{n_layers - 1}" if n_layers is not None else "a block index"
        raise KeyError(f"Unknown hook point {name!r}: expected 'blocks.<layer>.<kind>' with layer in {layers} "
                       f"and kind in {HOOK_KINDS}.")
    return int(parts[1]), parts[2]


def hook_names(cm: ChatModel | int, kinds: tuple[str, ...] = HOOK_KINDS, layers: list[int] | None = None) -> list[str]:
    """Hook names for the given kinds at the given layers (all layers of `cm`, a model or a layer count, by default)."""
    n_layers = cm if isinstance(cm, int) else cm.n_layers
    layers = range(n_layers) if layers is None else layers
    return [hook_name(layer, kind) for layer in layers for kind in kinds]


def resolve(cm: ChatModel, name: str) -> tuple[nn.Module, bool]:
    """The module behind a hook name and whether the hook acts on its input (True) or its output."""
    layer, kind = parse_hook_name(name, cm.n_layers)
    parts = cm.parts(layer)
    if kind == RESID_PRE:
        return parts.block, True
    return (parts.attn_writer if kind == ATTN_OUT else parts.mlp_writer), False
