"""Interventions on the residual stream, as context managers that always remove their hooks.

A hook function is a plain function on a tensor, ``fn(activation) -> activation``, where the
activation is (batch, seq, d_model). ``hooks(cm, {hook_name: fn})`` attaches such functions at
TransformerLens-named points:

- ``blocks.{l}.hook_resid_pre``: the residual stream entering block l;
- ``blocks.{l}.hook_attn_out`` / ``blocks.{l}.hook_mlp_out``: what attention / the MLP of block l adds
  to the residual stream (after Gemma 2/3's post-norms, which is what is actually added).

On top of it: ``ablate`` (directional ablation everywhere, optionally sparing each sequence's first
token) and ``add`` (activation addition at one layer).
Hooks act at every position, during plain forward passes and during generation alike.

Hooks are process-wide: PyTorch calls a module's hooks on every forward pass, whichever thread runs it.
``hooks`` therefore refuses to attach hooks to a model on which another thread holds hooks (use one model
per thread, or a lock).
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .directions import check_direction, check_float_tensor, normalize, project_out_unit
from .hookpoints import hook_name, hook_names, resolve
from .models import ChatModel

HookFn = Callable[[Tensor], Tensor]

# Threads holding hooks on each model: {model: Counter(thread id -> open `hooks` blocks)}.
_HOLDERS: weakref.WeakKeyDictionary[nn.Module, Counter] = weakref.WeakKeyDictionary()
_HOLDERS_LOCK = threading.Lock()


@contextmanager
def _held_by_this_thread(model: nn.Module) -> Iterator[None]:
    """Register this thread as holding hooks on `model`; a clear error if another thread holds some."""
    me = threading.get_ident()
    with _HOLDERS_LOCK:
        holders = _HOLDERS.setdefault(model, Counter())
        if any(thread != me and n for thread, n in holders.items()):
            raise RuntimeError(
                "Another thread has hooks attached to this model. PyTorch hooks are process-wide: that thread's "
                "forward passes would run under these hooks too, and this thread's under its hooks. Use one model "
                "per thread, or a lock around each `with` block."
            )
        holders[me] += 1
    try:
        yield
    finally:
        with _HOLDERS_LOCK:
            holders[me] -= 1


def _input_hook(fn: HookFn, name: str = "a hook point"):
    """A forward pre-hook applying `fn` to a block's input hidden states; `name` is the hook point, for errors."""
    def pre_hook(module, args, kwargs):
        if args:
            return (_applied(fn, args[0], name), *args[1:]), kwargs
        kwargs["hidden_states"] = _applied(fn, kwargs["hidden_states"], name)
        return args, kwargs

    pre_hook.is_refusal_hook = True
    return pre_hook


def _output_hook(fn: HookFn, name: str = "a hook point"):
    """A forward hook applying `fn` to a module's output (its first element if a tuple); `name` is the hook point."""
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (_applied(fn, output[0], name), *output[1:])
        return _applied(fn, output, name)

    hook.is_refusal_hook = True
    return hook


def _applied(fn: HookFn, x: Tensor, name: str) -> Tensor:
    """fn(x), or a TypeError naming the hook point if fn returns anything but a tensor (e.g. None: a missing
    `return`, which transformers would otherwise report as an AttributeError deep inside the model)."""
    out = fn(x)
    if not isinstance(out, Tensor):
        got = "None" if out is None else f"a {type(out).__name__}"
        hint = " (did the function forget `return x`?)" if out is None else ""
        raise TypeError(f"The hook function at {name} returned {got}: a hook must return the (modified) "
                        f"activation tensor{hint}.")
    return out


@contextmanager
def hooks(cm: ChatModel, hook_fns: dict[str, HookFn | list[HookFn]]) -> Iterator[ChatModel]:
    """Attach hook functions by hook name for the duration of the block; they are removed on exit, also on error."""
    handles = []
    with _held_by_this_thread(cm.model):
        try:
            for name, fns in hook_fns.items():
                module, on_input = resolve(cm, name)
                for fn in fns if isinstance(fns, list) else [fns]:
                    if on_input:
                        handles.append(module.register_forward_pre_hook(_input_hook(fn, name), with_kwargs=True))
                    else:
                        handles.append(module.register_forward_hook(_output_hook(fn, name)))
            yield cm
        finally:
            for handle in handles:
                handle.remove()


def active_hook_count(cm: ChatModel) -> int:
    """Hooks of this library attached anywhere in the model (0 when nothing is left behind)."""
    return sum(
        getattr(h, "is_refusal_hook", False)
        for m in cm.model.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )


class CastCache:
    """A tensor kept in the dtype and device of the activations it meets (cast once, reused)."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor
        self._copies: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def like(self, x: Tensor) -> Tensor:
        key = (x.dtype, x.device)
        if key not in self._copies:
            with torch.inference_mode(False):  # a normal tensor serves passes with and without inference mode
                self._copies[key] = self.tensor.to(dtype=x.dtype, device=x.device)
        return self._copies[key]


def ablation_hook(direction: Float[Tensor, "*dir d_model"]) -> HookFn:
    """A hook function that projects the direction out of an activation."""
    unit = CastCache(normalize(direction.detach().double()))
    return lambda x: project_out_unit(x, unit.like(x))


def addition_hook(vector: Float[Tensor, "*dir d_model"], coeff: float = 1.0) -> HookFn:
    """A hook function that adds coeff * vector to an activation."""
    cached = CastCache(coeff * vector.detach().double())
    return lambda x: x + cached.like(x)


def _validated(cm: ChatModel, direction: Tensor, name: str) -> Tensor:
    """`direction` if it is (d_model,) or (batch, 1, d_model), finite and non-zero; else a clear error.
    A (1, d_model) direction is taken as (d_model,)."""
    check_float_tensor(direction, name)
    if direction.ndim == 2 and direction.shape[0] == 1:
        direction = direction[0]
    if direction.ndim == 1:
        check_direction(direction, cm.d_model, name)
        return direction
    if direction.ndim != 3 or direction.shape[1] != 1:
        raise ValueError(f"{name} must have shape (d_model,) = ({cm.d_model},), or (batch, 1, d_model) for one per "
                         f"sequence; got {tuple(direction.shape)}. To use one candidate, index it: candidates[pos, layer].")
    for i, row in enumerate(direction[:, 0]):
        check_direction(row, cm.d_model, f"{name} (row {i})")
    return direction


@contextmanager
def ablate(
    cm: ChatModel, direction: Float[Tensor, "*dir d_model"], layers: list[int] | None = None,
    spare_first_token: bool = False,
) -> Iterator[ChatModel]:
    """Directional ablation: project r_hat out of every block input and every attention / MLP output.

    `direction` is (d_model,), or (batch, 1, d_model) for one direction per sequence of the batch.
    With `spare_first_token`, each sequence's first real token (after left padding) is left untouched:
    its residual stream is the same for every prompt (it sees only itself), so it carries no
    instruction, but in many models it is an attention sink with massive activations, where removing
    even a small component of the direction disturbs every later token. The paper (and weight
    orthogonalization) ablates at every position; this variant isolates what the sink contributes.
    """
    fn = ablation_hook(_validated(cm, direction, "ablation direction"))
    with _sparing_first_token(cm, fn) if spare_first_token else nullcontext(fn) as hook_fn:
        with hooks(cm, {name: hook_fn for name in hook_names(cm, layers=layers)}):
            yield cm


@contextmanager
def _sparing_first_token(cm: ChatModel, fn: HookFn) -> Iterator[HookFn]:
    """`fn` wrapped to return each sequence's first real token unchanged; the positions are read from
    every model call's inputs while the block is open."""
    first: dict[str, Tensor | None] = {"index": None}

    def find_first(module, args, kwargs):
        first["index"] = _first_token_index(args, kwargs)

    find_first.is_refusal_hook = True  # counted by active_hook_count, like the block hooks
    def sparing(x: Tensor) -> Tensor:
        out = fn(x)
        if first["index"] is None:  # a step that continues from a KV cache
            return out
        rows = torch.arange(x.shape[0], device=x.device)
        index = first["index"].to(x.device)
        out[rows, index] = x[rows, index]
        return out

    handle = cm.model.register_forward_pre_hook(find_first, with_kwargs=True)
    try:
        yield sparing
    finally:
        handle.remove()


def _first_token_index(args: tuple, kwargs: dict) -> Int[Tensor, " batch"] | None:
    """Position of each row's first real token in a model call's input, from its 2D attention mask (left
    padding); None when the call continues from a KV cache (its first token was in an earlier call)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    tokens = ids if ids is not None else kwargs["inputs_embeds"]
    batch, seq = tokens.shape[:2]
    mask = kwargs.get("attention_mask")
    cache = kwargs.get("past_key_values", kwargs.get("cache"))  # the cache's keyword differs across transformers
    cache_position = kwargs.get("cache_position")
    if (
        cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
        or cache_position is not None and int(cache_position[0]) > 0
        or mask is not None and mask.shape[-1] != seq
    ):
        return None
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=tokens.device)
    if mask.ndim != 2:
        raise ValueError(f"spare_first_token needs a 2D attention mask (batch, seq); got shape {tuple(mask.shape)}.")
    return mask.long().argmax(dim=1)


@contextmanager
def add(cm: ChatModel, vector: Float[Tensor, "*dir d_model"], layer: int, coeff: float = 1.0) -> Iterator[ChatModel]:
    """Activation addition: add coeff * vector to the residual stream entering `layer`, at every position."""
    if not 0 <= layer < cm.n_layers:
        raise ValueError(f"layer must be in 0..{cm.n_layers - 1}, got {layer}.")
    fn = addition_hook(_validated(cm, vector, "addition vector"), coeff)
    with hooks(cm, {hook_name(layer): fn}):
        yield cm

