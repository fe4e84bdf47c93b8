"""The refusal-direction experiment with TransformerLens 4.x (``TransformerBridge``).

TransformerLens 4 no longer re-implements new models as ``HookedTransformer``: a
``TransformerBridge`` wraps the Hugging Face model itself and exposes the familiar hook names
(``blocks.{l}.hook_resid_pre``, ``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_mlp_out``, ...).
This module builds one around the model a `ChatModel` already holds (nothing is downloaded) and
redoes the method's steps with TransformerLens idioms::

    bridge = bridge_from_chat_model(cm)
    mean_harmful = mean_activations_tl(bridge, cm, harmful)             # run_with_cache
    hooks = ablation_hooks_tl(bridge, direction)                        # fwd_hooks
    completions = generate_tl(bridge, cm, instructions, fwd_hooks=hooks)

Two things about TransformerLens 4.3 on transformers 5.x that these functions handle:

- **The bridge changes the model it wraps**: it swaps the model's submodules for bridge components
  and re-implements attention, so the HF attention modules (where the main path's ``ablate`` hooks
  ``hook_attn_out``) are no longer called. `bridge_from_chat_model` therefore wraps a *structural
  copy* that shares every parameter and buffer with ``cm.model``: no extra weight memory, weight
  edits show in both, and ``cm`` keeps working with the main path.
- **KV-cached generation is broken out of the box**: transformers 5.x passes the KV cache to
  attention as ``cache=`` (``past_key_values=`` is deprecated), but the bridge's attention only
  reads ``past_key_values``/``layer_past``. The cache is never filled, so after the prompt every
  new token attends only to itself and greedy generation is garbage (the same tokens whatever the
  prompt). `fix_bridge_kv_cache` passes ``cache=`` through; `generate_tl` applies it, or can
  generate without a KV cache (``use_kv_cache=False``), which is slower but needs no fix.

TransformerLens is imported only when a function here is called.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..batching import check_instructions, progress_batches
from ..directions import check_direction
from ..hookpoints import HOOK_KINDS, hook_name, hook_names
from ..interventions import ablation_hook
from ..models import ChatModel

if TYPE_CHECKING:
    from transformer_lens.hook_points import HookPoint
    from transformer_lens.model_bridge import TransformerBridge

# A TransformerLens hook function: (activation, hook) -> activation.
TLHookFn = Callable[[Tensor, "HookPoint"], Tensor]


_SHIM_FLAG = "_refusal_helpers_cache_shim"
_DROP = object()  # marks what shared_weight_copy leaves out of the copy


def _require_transformer_lens() -> None:
    try:
        import transformer_lens.model_bridge  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "The TransformerLens backend needs transformer-lens 4.x (TransformerBridge): "
            "pip install 'transformer-lens>=4.3,<5'. Underlying error: " + str(err)
        ) from err


def shared_weight_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original's own tensors.

    Library code may rebuild the copy's structure (as TransformerLens's bridge does) without touching
    the original's, while both compute with the same weights and no weight memory is duplicated.
    nnsight's per-module instrumentation (an instance-level ``forward``) is not carried over.
    """
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if forward is not None and type(forward).__module__.startswith("nnsight."):
            memo[id(forward)] = _DROP
    try:
        clone = copy.deepcopy(model, memo)
    except Exception as err:  # noqa: BLE001 - e.g. dispatched/quantized models that refuse deepcopy
        raise RuntimeError(
            f"Could not copy the structure of {type(model).__name__} to wrap it in a TransformerBridge "
            f"({type(err).__name__}: {err})."
        ) from err
    for module in clone.modules():
        if module.__dict__.get("forward") is _DROP:
            del module.__dict__["forward"]
    return clone


def _takes_cache_keyword(module: nn.Module) -> bool:
    """Whether a HF attention module receives its KV cache as ``cache=`` (transformers >= 5.x)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in params and "past_key_values" not in params


def fix_bridge_kv_cache(bridge: TransformerBridge) -> int:
    """Make the bridge's attention fill the KV cache that transformers 5.x passes as ``cache=``.

    TransformerLens 4.3's attention bridges look for the cache under ``past_key_values`` (or
    ``layer_past``) only; the decoder layers of transformers 5.x hand it over as ``cache``. Without
    this shim, KV-cached generation (``bridge.generate(..., use_past_kv_cache=True)``, the default)
    ignores the prompt after the first token. Idempotent; returns how many attention components were
    patched (0 when none needed it, e.g. on a TransformerLens that already reads ``cache``).
    """
    patched = 0
    for module in bridge.modules():
        update = getattr(module, "_update_kv_cache", None)
        original = getattr(module, "original_component", None)
        if update is None or original is None or getattr(module, _SHIM_FLAG, False):
            continue
        if not _takes_cache_keyword(original):
            continue

        def update_with_cache(k: Tensor, v: Tensor, _update=update, **kwargs: Any) -> tuple[Tensor, Tensor]:
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _update(k, v, **kwargs)

        # Instance attributes: only this bridge's components change, never TransformerLens's classes.
        module._update_kv_cache = update_with_cache
        setattr(module, _SHIM_FLAG, True)
        patched += 1
    return patched


def bridge_from_chat_model(cm: ChatModel, fix_kv_cache: bool = True) -> TransformerBridge:
    """A TransformerBridge around ``cm``'s already-loaded model and tokenizer (no download).

    The bridge wraps a structural copy sharing all weights with ``cm.model`` (see the module
    docstring), so ``cm`` and the main path keep working. ``fix_kv_cache`` applies
    `fix_bridge_kv_cache`; pass False only to look at the unfixed behaviour.
    """
    _require_transformer_lens()
    from transformer_lens.model_bridge.sources import build_bridge_from_module
    from transformer_lens.model_bridge.sources._hf_format import determine_architecture_from_hf_config

    model = shared_weight_copy(cm.model)
    try:
        architecture = determine_architecture_from_hf_config(model.config)
    except ValueError as err:
        raise ValueError(
            f"TransformerLens has no bridge adapter for {type(cm.model).__name__} "
            f"(model_type {getattr(model.config, 'model_type', None)!r}): {err}"
        ) from err
    # `TransformerBridge.boot_transformers(name, hf_model=...)` is not used: it reloads the tokenizer
    # from the Hub (with add_bos_token=True) and fails on tokenizers built in memory
    # (KeyError 'name_or_path'). Building from the module and attaching the tokenizer afterwards keeps
    # cm's tokenizer as it is (the first assignment does not re-run TransformerLens's tokenizer setup).
    bridge = build_bridge_from_module(
        model, architecture, hf_config=copy.deepcopy(model.config), dtype=cm.dtype, device=cm.device,
        model_name=cm.name,
    )
    bridge.tokenizer = cm.tokenizer
    try:
        from transformer_lens.model_bridge.sources._bridge_builder import detect_tokenizer_bos_eos

        bridge.cfg.tokenizer_prepends_bos, bridge.cfg.tokenizer_appends_eos = detect_tokenizer_bos_eos(
            cm.tokenizer
        )
    except ImportError:  # only affects TransformerLens's own string tokenization, which we never use
        pass
    bridge.eval()
    if fix_kv_cache:
        fix_bridge_kv_cache(bridge)
    return bridge


def _check_sizes(bridge: TransformerBridge, cm: ChatModel) -> None:
    if bridge.cfg.n_layers != cm.n_layers or bridge.cfg.d_model != cm.d_model:
        raise ValueError(
            f"The bridge ({bridge.cfg.n_layers} layers, d_model {bridge.cfg.d_model}) does not wrap the "
            f"model of {cm!r}; build it with bridge_from_chat_model(cm)."
        )


def mean_activations_tl(
    bridge: TransformerBridge, cm: ChatModel, instructions: list[str], batch_size: int = 32,
    progress: bool | str = False,
) -> Float[Tensor, "pos layer d_model"]:
    """Mean of ``blocks.{l}.hook_resid_pre`` at the post-instruction positions, every layer, in float64.

    The TransformerLens counterpart of `refusal_helpers.activations.mean_activations` (same prompts,
    same left padding and positions), using ``run_with_cache``.
    """
    check_instructions(instructions)
    _check_sizes(bridge, cm)
    positions = cm.post_instruction_positions
    names = hook_names(cm, kinds=("hook_resid_pre",))
    total = torch.zeros(len(positions), len(names), cm.d_model, dtype=torch.float64)
    for chunk in progress_batches(instructions, batch_size, progress, "mean activations (TransformerLens)"):
        inputs = cm.tokenize(chunk)
        with torch.no_grad():
            _, cache = bridge.run_with_cache(
                inputs["input_ids"], attention_mask=inputs["attention_mask"], names_filter=names,
                return_type=None, use_cache=False,
            )
        acts = torch.stack([cache[name][:, positions, :] for name in names], dim=2)  # batch pos layer d
        total += acts.to(torch.float64).sum(dim=0).cpu()
    return total / len(instructions)


def ablation_hooks_tl(
    bridge: TransformerBridge, direction: Float[Tensor, " d_model"], layers: Sequence[int] | None = None
) -> list[tuple[str, TLHookFn]]:
    """``fwd_hooks`` for directional ablation: project the direction out of every resid_pre, attn_out, mlp_out.

    Use with ``bridge.hooks(fwd_hooks=...)``, ``bridge.run_with_hooks`` or `generate_tl`. The
    projection is the main path's own (`refusal_helpers.interventions.ablation_hook`). For Llama-style
    blocks ``hook_attn_out``/``hook_mlp_out`` are exactly what is added to the residual stream.
    """
    check_direction(direction, bridge.cfg.d_model, "ablation direction")
    ablate = ablation_hook(direction)

    def hook(activation: Tensor, hook: HookPoint) -> Tensor:
        return ablate(activation)

    layers = range(bridge.cfg.n_layers) if layers is None else layers
    return [(hook_name(layer, kind), hook) for layer in layers for kind in HOOK_KINDS]


def _as_list(token_ids: int | list[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def generate_tokens_tl(
    bridge: TransformerBridge,
    cm: ChatModel,
    inputs: dict[str, Int[Tensor, "batch seq"]],
    max_new_tokens: int = 64,
    fwd_hooks: Sequence[tuple[str, TLHookFn]] = (),
    use_kv_cache: bool = True,
) -> Int[Tensor, "batch new"]:
    """Greedy new-token ids for a left-padded batch (``cm.tokenize``), under ``fwd_hooks``.

    Stops at the model's EOS like ``cm.model.generate``, and like it fills a finished row with the pad
    token, so the ids compare token for token with the main path. ``use_kv_cache=True`` applies
    `fix_bridge_kv_cache` first (see the module docstring); False recomputes the whole sequence at
    every step instead.
    """
    if use_kv_cache:
        fix_bridge_kv_cache(bridge)
    eos = _as_list(cm.model.generation_config.eos_token_id)
    pad = cm.tokenizer.pad_token_id
    with warnings.catch_warnings():
        # The bridge still hands HF its cache as `past_key_values`, which transformers 5.x renames.
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        with torch.no_grad(), bridge.hooks(fwd_hooks=list(fwd_hooks)):
            output = bridge.generate(
                inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens,
                do_sample=False, stop_at_eos=bool(eos), eos_token_id=eos or None,
                use_past_kv_cache=use_kv_cache, return_type="tokens", verbose=False,
            )
    new = output[:, inputs["input_ids"].shape[1] :]
    if eos and pad is not None:
        # The bridge repeats EOS in rows that have finished; HF's generate writes the pad token.
        is_eos = torch.isin(new, torch.tensor(eos, device=new.device)).long()
        after_eos = (is_eos.cumsum(-1) - is_eos) > 0
        new = new.masked_fill(after_eos, pad)
    return new


def generate_tl(
    bridge: TransformerBridge,
    cm: ChatModel,
    instructions: list[str],
    max_new_tokens: int = 64,
    fwd_hooks: Sequence[tuple[str, TLHookFn]] = (),
    batch_size: int = 16,
    use_kv_cache: bool = True,
    progress: bool | str = False,
) -> list[str]:
    """Greedy completions of ``instructions`` through the bridge, under ``fwd_hooks`` (e.g. `ablation_hooks_tl`).

    The counterpart of ``with ablate(cm, r): generate(cm, instructions)``: same prompts, same
    decoding (special tokens skipped, whitespace stripped).
    """
    if isinstance(instructions, str):
        instructions = [instructions]
    _check_sizes(bridge, cm)
    completions: list[str] = []
    for chunk in progress_batches(instructions, batch_size, progress, "generating (TransformerLens)"):
        new = generate_tokens_tl(bridge, cm, cm.tokenize(chunk), max_new_tokens, fwd_hooks, use_kv_cache)
        completions.extend(cm.tokenizer.batch_decode(new, skip_special_tokens=True))
    return [c.strip() for c in completions]
