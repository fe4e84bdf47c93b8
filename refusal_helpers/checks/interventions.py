"""Checks for sections 4, 7 and 10: projection, ablation and addition hooks, orthogonalization, and the
TransformerLens and nnsight versions."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor

from .. import directions as ref_dirs
from ..activations import residual_activations
from ..backends.nnsight import nnsight_model
from ..backends.transformer_lens import bridge_from_chat_model
from ..hookpoints import HOOK_KINDS, hook_names
from ..interventions import ablate, ablation_hook, addition_hook, hooks
from .core import (
    PROMPTS,
    CheckFailed,
    as_tensor,
    call,
    compare,
    generator,
    hook_output,
    is_shape_error,
    learner_check,
    learner_name,
    leaves_unchanged,
    ok,
    projection_mistakes,
    tiny,
)


# ----- 4. interventions ------------------------------------------------------------------------------
@learner_check
def check_project_out(fn: Callable) -> None:
    """fn(x, direction) -> x with its component along the direction removed, in x's dtype."""
    g = generator()
    x, r = torch.randn(3, 5, 16, generator=g), 3.0 * torch.randn(16, generator=g)
    expected = ref_dirs.project_out(x, r)
    try:
        got = call(fn, {"x": x, "direction": r}, dtype=x.dtype,
                    why=" (x's dtype): compute in float64 inside if you like, but return `.to(x.dtype)`; a hook "
                        "that returns float64 breaks a float32 or bfloat16 model")
    except RuntimeError as err:
        if isinstance(err, NotImplementedError) or not is_shape_error(err):
            raise
        raise CheckFailed(f"Shape error for x of shape {tuple(x.shape)} ({err}): the dot product x . r_hat has shape "
                          "(3, 5); keep a trailing axis, `(x @ r_hat)[..., None]` or `.unsqueeze(-1)`, so that it "
                          "broadcasts against r_hat.") from None
    compare("project_out", got, expected, projection_mistakes(x, r))
    ok("check_project_out", "output orthogonal to r, rest unchanged, inputs untouched")


@learner_check
def check_ablation_hooks(fn: Callable) -> None:
    """fn(cm, direction) -> {hook_name: hook_fn} ablating the direction at every block input, attention and MLP
    output."""
    cm = tiny()
    g = generator()
    r = 3 * torch.randn(cm.d_model, dtype=torch.float64, generator=g)
    probe = torch.randn(2, 3, cm.d_model, generator=g)
    # Each hook on a probe activation, with a float64 direction (a float32 one meets a bfloat16 GPU model): the
    # hooks must cast it.
    with leaves_unchanged(fn, {"direction": r}, hooks_too=True):
        hook_fns = fn(cm, r)
        if not isinstance(hook_fns, dict):
            raise CheckFailed(f"Return a dict {{hook_name: hook_fn}}, got {type(hook_fns).__name__}.")
        _check_hook_names(set(hook_fns), cm)
        outs = {name: hook_output(hook_fns[name], probe.clone(), f"at {name}", _cast_fix("direction", "project_out"))
                for name in hook_names(cm)}
    _compare_hooks(outs, probe, r)
    # The model with the hooks, and a direction of its dtype: a cast copies nothing then, so an in-place edit of
    # the direction would reach the caller's.
    r, inputs = r.float(), cm.tokenize(PROMPTS)
    with torch.inference_mode(), ablate(cm, r):
        expected = cm.forward(inputs)
    with leaves_unchanged(fn, {"direction": r}, hooks_too=True), torch.inference_mode(), hooks(cm, fn(cm, r)):
        got = cm.forward(inputs)
    compare("logits under your ablation hooks", got, expected, atol=1e-4)
    ok("check_ablation_hooks", f"{len(outs)} hooks, logits equal the reference ablation")


def _cast_fix(vector: str, helper: str = "") -> str:
    """How to keep a hook's output in the activation's dtype; `helper` is a learner's function the hook calls."""
    also = f", and check that your {helper} returns the dtype of the x it is given" if helper else ""
    return f"Cast the {vector} to the activation's dtype and device inside the hook, `{vector}.to(x)`{also}."


def _check_hook_names(names: set[str], cm) -> None:
    """CheckFailed naming unknown hook points, and which kinds are missing at which layers."""
    expected = hook_names(cm)
    unknown = sorted(names - set(expected))
    if unknown:
        raise CheckFailed(f"Unknown hook names {unknown[:3]}: the hook points are `blocks.<layer>.<kind>` with layer "
                          f"in 0..{cm.n_layers - 1} and kind in {HOOK_KINDS}.")
    missing = {kind: [layer for layer in range(cm.n_layers) if f"blocks.{layer}.{kind}" not in names]
               for kind in HOOK_KINDS}
    described = [f"{kind} at {'every layer' if len(layers) == cm.n_layers else f'layers {layers}'}"
                 for kind, layers in missing.items() if layers]
    if described:
        raise CheckFailed(f"Missing hooks: {'; '.join(described)}. Ablate at every layer: the block input "
                          "(hook_resid_pre) and what attention and the MLP write (hook_attn_out, hook_mlp_out).")


def _compare_hooks(outs: dict[str, Tensor], probe: Tensor, r: Tensor) -> None:
    """Each hook's output on the probe activation against directional ablation, naming a wrong variant."""
    expected = ablation_hook(r)(probe)
    mistakes = {**projection_mistakes(probe, r), "it changed nothing: return the ablated activation (did it forget "
                "`return`?).": probe}
    for name, out in outs.items():
        compare(f"your hook at {name}", out, expected, mistakes, atol=1e-5)


@learner_check
def check_addition_hook(fn: Callable) -> None:
    """fn(vector, coeff) -> hook function adding coeff * vector to an activation."""
    g = generator()
    x = torch.randn(2, 3, 16, generator=g)
    v = 2.5 * torch.randn(16, dtype=torch.float64, generator=g)
    # A float64 vector (as a float32 one meets a bfloat16 GPU model), and once one of x's dtype: its cast copies
    # nothing, so an in-place edit of it would reach the caller's vector.
    for coeff, vector in ((1.0, v), (-1.0, v.float()), (0.5, v)):
        with leaves_unchanged(fn, {"vector": vector}, hooks_too=True):
            hook = fn(vector, coeff)
            if not callable(hook):
                raise CheckFailed(f"Return a function (the hook) that takes an activation and returns it modified; "
                                  f"got {type(hook).__name__}.")
            got = hook_output(hook, x.clone(), f"from addition_hook(vector, {coeff})", _cast_fix("vector"))
        last_only = x.double().clone()
        last_only[:, -1] += coeff * v
        compare(f"addition hook (coeff {coeff})", got, addition_hook(v, coeff)(x), {
            "don't normalise the vector: activation addition adds the difference of means as it is.":
                x + coeff * v / v.norm(),
            "the coefficient is ignored.": x + v,
            "wrong sign of the coefficient.": x - coeff * v,
            "you added the vector at the last position only: add it at every position (x + coeff * vector "
            "broadcasts over batch and sequence).": last_only,
        })
    ok("check_addition_hook")


# ----- 7. weight orthogonalization -------------------------------------------------------------------
@learner_check
def check_orthogonalize(fn: Callable) -> None:
    """fn(weight (d_model, d_in), direction) -> weight whose outputs have no component along the direction."""
    g = generator()
    w, r = torch.randn(16, 24, generator=g), 2.0 * torch.randn(16, generator=g)
    expected = ref_dirs.orthogonalize_matrix(w, r, dim=0)
    try:
        got = call(fn, {"weight": w, "direction": r}, dtype=w.dtype,
                    why=" (the weight's dtype): a weight of another dtype breaks the model it goes back into")
    except RuntimeError as err:
        if isinstance(err, NotImplementedError) or not is_shape_error(err):
            raise
        raise CheckFailed(f"Shape error ({err}). The weight is (d_model=16, d_in=24) and the direction has d_model "
                          "entries: project the outputs, dimension 0, as W - r_hat (r_hat^T W).") from None
    mistakes = {m: variant.T for m, variant in projection_mistakes(w.T, r).items()}
    compare("orthogonalized weight", got, expected, {
        **mistakes,
        "you returned the weight unchanged: remove from it the component of its outputs along r_hat.": w,
        "you returned the transposed weight: keep the shape (d_model, d_in).": expected.T,
    })
    ok("check_orthogonalize", "W' x is orthogonal to r for every x")


# ----- 10. TransformerLens and nnsight ---------------------------------------------------------------
@learner_check
def check_tl_ablation_hooks(fn: Callable) -> None:
    """fn(bridge, direction) -> TransformerLens fwd_hooks [(hook_name, hook_fn(activation, hook))] ablating everywhere."""

    cm = tiny()
    bridge = bridge_from_chat_model(cm)
    g = generator()
    r = 3 * torch.randn(cm.d_model, dtype=torch.float64, generator=g)
    probe = torch.randn(2, 3, cm.d_model, generator=g)
    # Each hook on a probe activation, with a float64 direction that the hooks must cast (as in check_ablation_hooks).
    with leaves_unchanged(fn, {"direction": r}, hooks_too=True):
        hook_fns = _fwd_hooks(fn(bridge, r))
        _check_hook_names(set(hook_fns), cm)
        outs = {name: hook_output(hook_fns[name], probe.clone(), f"at {name}", _cast_fix("direction", "project_out"),
                                   none_is_in_place=True, hook=SimpleNamespace(name=name))
                for name in hook_names(cm)}
    _compare_hooks(outs, probe, r)
    # The bridge with the hooks, and a direction of the model's dtype.
    r, inputs = r.float(), cm.tokenize(PROMPTS)
    with torch.inference_mode(), ablate(cm, r):
        expected = cm.forward(inputs)[:, -1]
    with leaves_unchanged(fn, {"direction": r}, hooks_too=True), torch.no_grad():
        got = bridge.run_with_hooks(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    fwd_hooks=fn(bridge, r))[:, -1]
    compare("last-position logits under your TransformerLens hooks", got, expected, atol=1e-3, rtol=1e-3)
    ok("check_tl_ablation_hooks", "bridge logits equal the main path's ablation")


def _fwd_hooks(fwd_hooks: object) -> dict[str, Callable]:
    """TransformerLens's fwd_hooks, a list of (hook_name, hook_fn) pairs, as a dict; CheckFailed for another format."""
    try:
        if not isinstance(fwd_hooks, (list, tuple)):
            raise TypeError
        return dict(fwd_hooks)
    except (TypeError, ValueError):
        raise CheckFailed("Return a list of (hook_name, hook_function) pairs, TransformerLens's fwd_hooks format; "
                          f"got {type(fwd_hooks).__name__}.") from None


@learner_check
def check_nnsight_resid_pre(fn: Callable) -> None:
    """fn(nn_model, cm, instructions, layer) -> (batch, d_model) residual entering `layer` at the last position."""

    cm = tiny()
    nn_model = nnsight_model(cm)
    inputs = cm.tokenize(PROMPTS)

    def resid(positions: list[int], layer: int) -> Tensor:
        return residual_activations(cm, inputs, positions, [layer])[:, :, 0]

    for layer in (0, 2):
        expected = resid([-1], layer)[:, 0]
        try:
            got = call(fn, {"nn_model": nn_model, "cm": cm, "instructions": list(PROMPTS), "layer": layer})
        except (UnboundLocalError, NameError) as err:
            raise CheckFailed(f"{type(err).__name__}: {err}. A value read inside `nn_model.trace(...)` exists after the "
                              "`with` block only if you call `.save()` on it inside the block.") from None
        got = as_tensor(getattr(got, "value", got), "your nnsight function")
        if got.dtype != expected.dtype:
            raise CheckFailed(f"{learner_name(fn)} returned {got.dtype}; the residual stream is {expected.dtype}, the model's "
                              "dtype: return it as the model computed it.")
        mistakes = {}
        if layer + 1 < cm.n_layers:
            mistakes["that is the block's output: read `.input` (the residual stream entering the block)."] = \
                resid([-1], layer + 1)[:, 0]
        if layer > 0:
            mistakes[f"that is the input of block {layer - 1}: read `nn_model.model.layers[layer]`."] = \
                resid([-1], layer - 1)[:, 0]
        mistakes["take the last position, `[:, -1, :]`, not the first."] = resid([0], layer)[:, 0]
        n = inputs["input_ids"].shape[1]
        mistakes["you returned every position: take the last one, `[:, -1, :]`, shape (batch, d_model)."] = \
            resid(list(range(n)), layer)
        compare(f"nnsight resid_pre at layer {layer}", got, expected, mistakes, atol=1e-4)
    ok("check_nnsight_resid_pre")
