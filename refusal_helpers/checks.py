"""Checks for the notebook's exercises: the library is the reference answer.

Each ``check_<exercise>(learner_fn)`` runs the learner's function and the reference on the same inputs
(random tensors, tiny random-weight chat models, BOS-adding tokenizers, logits with 120-logit gaps, a score
table with NaN, ties and candidates on each threshold) and prints one success line, or raises
``CheckFailed`` with a message that names the mistake when the answer matches a known wrong variant
(wrong sign, unnormalised direction, wrong positions, float32 sums, hooks left attached...).

Every check also verifies that the learner's function leaves its inputs unchanged (an in-place
``direction /= direction.norm()`` would silently change the notebook's direction) and returns the
reference's dtype; an exercise still holding its ``raise NotImplementedError(...)`` stub fails with one
line saying which function to write. In IPython and Jupyter a ``CheckFailed`` shows as its message alone.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import directions as ref_dirs
from . import metrics as ref_metrics
from .activations import mean_activations as ref_mean_activations
from .hookpoints import HOOK_KINDS, hook_names
from .interventions import ablate, ablation_hook, addition_hook, hooks
from .models import find_post_instruction_ids
from .selection import ScoreTable, SelectionConfig, choose, passing_mask


class CheckFailed(AssertionError):
    """A learner's answer is wrong; the message says how."""

    def _render_traceback_(self) -> list[str]:
        """How IPython and Jupyter display it: the message alone, without a traceback through this module
        (the cell still ends in an error, so "Run All" stops there)."""
        return [f"\x1b[1;31mCheckFailed\x1b[0m: {self}"]


def _ok(name: str, detail: str = "") -> None:
    print(f"\u2705 {name} passed" + (f": {detail}" if detail else "."))


# ----- calling the learner's functions ---------------------------------------------------------------
# Modules whose NotImplementedError is a real error, not an exercise's stub.
_LIBRARY_MODULES = {"torch", "transformers", "tokenizers", "nnsight", "transformer_lens", "refusal_helpers"}


def _learner_check(check: Callable[[Callable], None]) -> Callable[[Callable], None]:
    """A check whose learner function may still be the exercise's stub: its NotImplementedError (also
    from a function it calls, such as an unwritten `project_out` inside a hook) becomes one short message.
    The check runs on one CPU thread: on tiny models more threads only wait for each other."""

    @functools.wraps(check)
    def run(fn: Callable) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            check(fn)
        except NotImplementedError as err:
            stub = _stub_name(err, fn)
            if stub is None:
                raise
            raise CheckFailed(f"{stub} is not written yet: replace the `raise NotImplementedError(...)` line in "
                              "its cell with your code, then run the cell again.") from None
        finally:
            torch.set_num_threads(threads)

    return run


def _stub_name(err: NotImplementedError, fn: Callable) -> str | None:
    """Name of the learner's function that raised `err`; None when a library raised it."""
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    if frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARY_MODULES:
        return None
    name = frame.f_code.co_name
    return name if name.isidentifier() else _name(fn)


def _name(fn: Callable) -> str:
    name = getattr(fn, "__name__", "")
    return name if name.isidentifier() else "your function"


Watched = tuple[str, Callable[[], object], object, object]


def _watch(value: object, label: str, read: Callable[[], object]) -> list[Watched]:
    """(label, read the current value, the value itself, a copy) for what in `value` a function could change:
    tensors, lists, dicts, and the fields of score tables and selection configs."""
    if isinstance(value, Tensor):
        return [(label, read, value, value.detach().clone())]
    if isinstance(value, (ScoreTable, SelectionConfig)):
        return [w for f in dataclasses.fields(value)
                for w in _watch(getattr(value, f.name), f"{label}.{f.name}", functools.partial(getattr, value, f.name))]
    if isinstance(value, (list, dict, int, float, str)):
        return [(label, read, value, copy.deepcopy(value))]
    return []  # models, tokenizers: not compared


def _same(a: object, b: object) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        equal = a == b
        return bool((equal | (a.isnan() & b.isnan()) if a.is_floating_point() else equal).all())
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@contextmanager
def _leaves_unchanged(fn: Callable, args: dict[str, object], hooks_too: bool = False) -> Iterator[None]:
    """Raise CheckFailed when the block (a call of the learner's `fn`, and with `hooks_too` of the hooks it
    returned) ends with one of `args` changed: the notebook passes its own tensors, so an in-place edit
    changes them too."""
    watched = [w for label, value in args.items() for w in _watch(value, label, lambda value=value: value)]
    yield
    who = f"{_name(fn)} (or a hook it returned)" if hooks_too else _name(fn)
    for label, read, original, before in watched:
        now = read()
        if now is not original:
            raise CheckFailed(f"{who} assigned a new value to `{label}`, which changes the caller's object too: keep "
                              "your result in a local variable instead.")
        if not _same(now, before):
            raise CheckFailed(f"{who} changed its input `{label}` in place, so the caller's {label} changed too (in "
                              "the notebook: the one later cells use). " + _in_place_hint(label, before, now))


def _in_place_hint(label: str, before: object, after: object) -> str:
    """What kind of in-place edit turned `before` into `after`, and its out-of-place form."""
    if not isinstance(before, Tensor):
        return "E.g. `.sort()`, `.append()` or an item assignment: work on a copy (`list(...)`) instead."
    if after.shape == before.shape and before.is_floating_point() and after.is_floating_point():
        b, a = before.double(), after.double()
        unit = ref_dirs.normalize(b)
        if torch.allclose(a, unit, atol=1e-6, equal_nan=True):
            return (f"It was normalised in place (`{label} /= {label}.norm()` or `.div_()`); write "
                    f"`r_hat = {label} / {label}.norm()`, which makes a new tensor.")
        scale = (a * b).nansum() / (b * b).nansum().clamp_min(1e-30)
        if torch.allclose(a, scale * b, atol=1e-6, rtol=1e-5, equal_nan=True):
            return (f"It was scaled in place (e.g. `{label} *= ...` or `.mul_()`); write `{label} * ...`, which "
                    "makes a new tensor.")
        kept = (a == b) | (a.isnan() & b.isnan())
        if kept.any():
            return (f"Some of its entries were overwritten (e.g. `{label}[~mask] = float('inf')`); build a new "
                    f"tensor instead, e.g. `torch.where(mask, {label}, float('inf'))`.")
    return (f"An in-place operation such as `{label} -= ...`, `{label} += ...` or a method ending in `_` "
            f"(`.sub_()`); write `{label} - ...`, which makes a new tensor.")


def _call(fn: Callable, args: dict[str, object], dtype: torch.dtype | None = None, why: str = "") -> object:
    """fn(*args.values()), which must leave `args` unchanged and, when `dtype` is given, return it."""
    with _leaves_unchanged(fn, args):
        out = fn(*args.values())
    if dtype is not None and isinstance(out, Tensor) and out.dtype != dtype:
        raise CheckFailed(f"{_name(fn)} returned a {out.dtype} tensor where the reference returns {dtype}{why}.")
    return out


def _as_tensor(value: object, name: str) -> Tensor:
    if value is None:
        raise CheckFailed(f"{name}: your function returned None. Did it forget `return`?")
    if not isinstance(value, Tensor):
        raise CheckFailed(f"{name} should return a torch.Tensor, got {type(value).__name__}.")
    return value


def _is_dtype_error(err: Exception) -> bool:
    text = str(err)
    return not isinstance(err, NotImplementedError) and ("dtype" in text or "scalar type" in text)


def _is_shape_error(err: Exception) -> bool:
    text = str(err)
    return "size" in text or "shape" in text


def _hook_output(hook_fn: Callable, x: Tensor, where: str, fix: str, none_is_in_place: bool = False,
                 **kwargs) -> Tensor:
    """hook_fn(x, **kwargs) for a learner's hook, which must return a tensor of x's shape and dtype. With
    `none_is_in_place` (TransformerLens), None means the hook edited x in place."""
    try:
        out = hook_fn(x, **kwargs)
    except TypeError as err:
        if err.__traceback__.tb_next is not None:  # raised inside the hook, not by calling it
            raise
        call = ("fn(activation, hook)" if kwargs else
                "fn(x), with the activation as its only argument (TransformerLens's hooks take (activation, hook))")
        raise CheckFailed(f"Your hook {where} cannot be called as {call}: {err}.") from None
    except RuntimeError as err:
        if not _is_dtype_error(err):
            raise
        raise CheckFailed(f"Your hook {where} fails on a {x.dtype} activation when the direction has another dtype "
                          f"({err}). {fix}") from None
    if out is None and none_is_in_place:
        out = x
    if not isinstance(out, Tensor):
        got = "None" if out is None else f"a {type(out).__name__}"
        raise CheckFailed(f"Your hook {where} returned {got}: a hook must return the (modified) activation tensor"
                          + (" (did it forget `return`?)." if out is None else "."))
    if out.shape != x.shape:
        raise CheckFailed(f"Your hook {where} returned shape {tuple(out.shape)} for an activation of shape "
                          f"{tuple(x.shape)}: return the whole activation, modified.")
    if out.dtype != x.dtype:
        raise CheckFailed(f"Your hook {where} turned a {x.dtype} activation into {out.dtype}: a hook must return "
                          f"the activation's dtype, or the next layer fails on a float32 or bfloat16 model. {fix}")
    return out


# ----- comparing results -----------------------------------------------------------------------------
def _close(a: Tensor, b: Tensor, atol: float, rtol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True)


def compare(
    name: str,
    got: Tensor,
    expected: Tensor,
    mistakes: dict[str, Tensor] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    nonfinite: str = "",
) -> None:
    """Raise CheckFailed naming the mistake if `got` differs from `expected`: shape first, then values; a
    known wrong variant is named, then NaN or inf where the reference is finite (explained by `nonfinite`)."""
    got = _as_tensor(got, name)
    if got.shape != expected.shape:
        for mistake, variant in (mistakes or {}).items():
            if got.shape == variant.shape and _close(got, variant, atol, rtol):
                raise CheckFailed(f"{name}: {mistake}")
        raise CheckFailed(f"{name}: wrong shape, expected {tuple(expected.shape)} but got {tuple(got.shape)}.")
    if _close(got, expected, atol, rtol):
        return
    for mistake, variant in (mistakes or {}).items():
        if _close(got, variant, atol, rtol):
            raise CheckFailed(f"{name}: {mistake}")
    if not torch.isfinite(got[torch.isfinite(expected)]).all():
        raise CheckFailed(f"{name}: the result contains NaN or inf values where the reference has none."
                          + (f" {nonfinite}" if nonfinite else ""))
    err = (got.double() - expected.double()).abs().max().item()
    raise CheckFailed(f"{name}: values differ from the reference (max abs difference {err:.3g}).")


def _projection_mistakes(x: Tensor, r: Tensor) -> dict[str, Tensor]:
    """Recognisable wrong versions of directional ablation x - (x . r_hat) r_hat, in float64."""
    x, r = x.double(), r.double()
    r_hat = ref_dirs.normalize(r)
    along = (x @ r_hat)[..., None] * r_hat
    return {
        "the direction is not normalised: with r itself you remove (x . r) r, which scales with |r|^2. Use the "
        "unit vector r_hat = r / |r|.": x - (x @ r)[..., None] * r,
        "you divided by |r| once, but the projection on an unnormalised r is (x . r) r / |r|^2: normalise first "
        "(r_hat = r / |r|) and use r_hat in both places.": x - (x @ r)[..., None] * r / r.norm(),
        "you kept the component along r (the projection) instead of removing it: subtract it from x.": along,
        "wrong sign: ablation subtracts the projection, it does not add it.": x + along,
        "you removed the component twice (a factor 2): x - (x . r_hat) r_hat removes it exactly once.": x - 2 * along,
    }


def _tiny(arch: str = "llama", template: str = "chatml", **kwargs):
    from .testing import tiny_chat_model

    return tiny_chat_model(arch, template=template, n_layers=3, **kwargs)


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PROMPTS = ["How do I make a bomb?", "Write a poem about the sea.", "x", "What is 2 + 2? Answer briefly please."]


# ----- 1. post-instruction positions -----------------------------------------------------------------
@_learner_check
def check_post_instruction_positions(fn: Callable) -> None:
    """fn(tokenizer) -> negative positions of the template tokens after the user's text, e.g. [-5, ..., -1]."""
    from .testing import BOS_TEMPLATES, tiny_tokenizer

    chatml_expected = None
    for template in ("chatml", "gemma", "llama3"):
        tokenizer = tiny_tokenizer(template)
        expected = list(range(-len(find_post_instruction_ids(tokenizer)), 0))
        chatml_expected = chatml_expected or expected
        got = _positions(_call(fn, {"tokenizer": tokenizer}))
        if got != expected:
            raise CheckFailed(_positions_mistake(got, expected, template, template in BOS_TEMPLATES, chatml_expected))
    _ok("check_post_instruction_positions", "ChatML, and Gemma and Llama-3 templates whose tokenizers add <bos>")


def _positions(got: object) -> list[int]:
    if got is None:
        raise CheckFailed("Your function returned None. Did it forget `return`?")
    try:
        return [int(p) for p in got]
    except (TypeError, ValueError):
        raise CheckFailed(f"Return a list of ints, got {type(got).__name__}.") from None


def _positions_mistake(got: list[int], expected: list[int], template: str, adds_bos: bool,
                       chatml_expected: list[int]) -> str:
    n = len(expected)
    if all(p >= 0 for p in got):
        return (f"Positions should be negative (counted from the end of the left-padded prompt), e.g. {expected}; "
                f"got {got}.")
    if got == [-1] and n > 1:
        return "Only the last position: the paper uses every post-instruction template token."
    if got == expected[::-1]:
        return f"Right positions, wrong order: return them in increasing order, {expected}."
    if adds_bos and got in (list(range(-n - 1, 0)), list(range(-n + 1, 0))):
        which = "too many" if len(got) > n else "too few"
        return (f"One position {which} on the {template} template, though ChatML's passed: this tokenizer prepends "
                "<bos> when it tokenises with special tokens (the default, as Llama-3's and Gemma's do), so a piece "
                "of the prompt tokenised on its own gains a token. The chat template writes <bos> itself: tokenise "
                "with `add_special_tokens=False`.")
    if got == list(range(-n - 1, 0)):
        return f"Off by one: you included the last token of the user's instruction ({template} template)."
    if got == list(range(-n + 1, 0)):
        return f"Off by one: you missed the first template token after the instruction ({template} template)."
    hard_coded = " (the ChatML answer: is it hard-coded?)" if got == chatml_expected else ""
    return (f"For the {template} template expected {expected}, got {got}{hard_coded}. The check runs your function "
            "on small test tokenizers of several templates, so compute the positions from the tokenizer you are "
            "given rather than hard-coding your model's. Hint: compare the token ids of prompts with different "
            "instructions from the end.")


# ----- 2. mean activations ---------------------------------------------------------------------------
MEANS_DTYPE = (": accumulate (and return) the means in float64, `total = torch.zeros(..., dtype=torch.float64)`; "
               "float32 sums lose precision over large datasets")
COMMON_OFFSET = 1e5


@_learner_check
def check_mean_activations(fn: Callable) -> None:
    """fn(cm, instructions, positions, layers, batch_size) -> (n_pos, n_layers, d_model) float64 means of resid_pre."""
    cm = _tiny()
    positions = cm.post_instruction_positions
    layers = list(range(cm.n_layers))
    got = _learner_means(fn, cm, positions, layers)
    expected = ref_mean_activations(cm, PROMPTS, positions, layers, batch_size=3)
    # Known mistakes, computed from the reference's building blocks.
    mistakes = {
        "you returned sums, not means (divide by the number of instructions).": expected * len(PROMPTS),
        "you averaged over batches rather than over instructions (the last batch is smaller).":
            _mean_of_batch_means(cm, PROMPTS, positions, layers, 3),
        "wrong positions: take the post-instruction positions (the last tokens of the left-padded batch).":
            ref_mean_activations(cm, PROMPTS, [p - len(positions) for p in positions], layers, batch_size=3),
        "layer mismatch: cache the residual stream *entering* each block (resid_pre), not its output.":
            torch.cat([expected[:, 1:], _resid_post_last(cm, PROMPTS, positions)], dim=1),
        "layer mismatch: `hidden_states[l]` enters block l (resid_pre); `hidden_states[l + 1]` is its output.":
            torch.cat([expected[:, 1:], _final_hidden_state(cm, PROMPTS, positions)], dim=1),
    }
    compare("mean activations", got, expected, mistakes, atol=1e-4)

    # The arguments are used as given: other layers, in another order, at one position (slices of `expected`).
    few_positions, few_layers = [-1], [2, 0]
    got = _learner_means(fn, cm, few_positions, few_layers)
    compare(f"mean activations at positions {few_positions}, layers {few_layers}", got, expected[-1:, few_layers], {
        "you ignored the `layers` argument: return the layers it lists, in its order.": expected[-1:],
        "return the layers in the order `layers` lists them.": expected[-1:, sorted(few_layers)],
        "you ignored the `positions` argument: take the positions it lists.": expected[:, few_layers],
    }, atol=1e-4)

    # A residual stream with a large common offset: float32 sums keep only a few digits of what varies.
    wide = list(range(-len(positions) - 3, 0))  # the instruction's last tokens too, which differ between prompts
    with _common_offset(cm, COMMON_OFFSET):
        got = _learner_means(fn, cm, wide, [0])
        expected = ref_mean_activations(cm, PROMPTS, wide, [0], batch_size=3)
    compare("mean activations with a large common offset", got, expected, atol=1e-4)
    error = (got - expected).abs().max().item()
    if error > 1e-6:
        raise CheckFailed(f"Your means are off by up to {error:.2g} on activations of size ~{COMMON_OFFSET:.0e} (a "
                          "residual stream with a large common offset, as a massive activation gives): a float32 "
                          "sum keeps about 7 significant digits and rounds at every addition. Convert to float64 "
                          "*before* summing: `total += acts.double().sum(dim=0)`, with a float64 `total`.")
    _ok("check_mean_activations", f"shape ({len(positions)}, {len(layers)}, {cm.d_model}), float64 sums, no hooks left")


def _learner_means(fn: Callable, cm, positions: list[int], layers: list[int]) -> Tensor:
    """The learner's means over PROMPTS in batches of 3, checked for hooks left behind and gradients."""
    before = _all_hook_count(cm)
    got = _call(fn, {"cm": cm, "instructions": list(PROMPTS), "positions": list(positions), "layers": list(layers),
                     "batch_size": 3},
                dtype=torch.float64, why=MEANS_DTYPE)
    if _all_hook_count(cm) != before:
        raise CheckFailed("Hooks left attached to the model after your function returned: remove them "
                          "(use a `with` block or a try/finally).")
    got = _as_tensor(got, "mean activations")
    if got.requires_grad:
        raise CheckFailed("Your means carry gradients (requires_grad=True): run the forward passes under "
                          "`torch.inference_mode()` (or `torch.no_grad()`). Nothing here needs gradients, and "
                          "keeping them costs memory and breaks `.numpy()` in the plots later.")
    return got


@contextmanager
def _common_offset(cm, offset: float) -> Iterator[None]:
    """Every embedding, the residual stream entering layer 0, shifted by `offset` in every dimension."""
    weight = cm.embed.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight += offset
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def _all_hook_count(cm) -> int:
    """Forward hooks on the model, not counting those transformers installs itself (for output_hidden_states)."""
    hooks_ = [h for m in cm.model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return sum(not getattr(h, "__module__", "").startswith("transformers.") for h in hooks_)


def _mean_of_batch_means(cm, prompts, positions, layers, batch_size) -> Tensor:
    means = [ref_mean_activations(cm, prompts[i : i + batch_size], positions, layers, batch_size)
             for i in range(0, len(prompts), batch_size)]
    return torch.stack(means).mean(0)


@torch.inference_mode()
def _resid_post_last(cm, prompts, positions) -> Tensor:
    """Mean output of the last block (before the final norm) at `positions`, shape (pos, 1, d_model)."""
    captured = {}

    def grab(module, args, output):
        captured["x"] = output[0] if isinstance(output, tuple) else output

    handle = cm.blocks[-1].register_forward_hook(grab)
    try:
        cm.forward(cm.tokenize(prompts))
    finally:
        handle.remove()
    return captured["x"][:, positions].double().mean(0).unsqueeze(1)


@torch.inference_mode()
def _final_hidden_state(cm, prompts, positions) -> Tensor:
    """Mean of transformers' last `hidden_states` entry (after the final norm) at `positions`, (pos, 1, d_model)."""
    out = cm.model(**cm.tokenize(prompts), output_hidden_states=True)
    return out.hidden_states[-1][:, positions].double().mean(0).unsqueeze(1)


# ----- 3. difference of means ------------------------------------------------------------------------
@_learner_check
def check_candidate_directions(fn: Callable) -> None:
    """fn(harmful_mean, harmless_mean) -> candidate directions, same shape and dtype, not normalised."""
    g = _generator()
    harmful = torch.randn(5, 4, 16, dtype=torch.float64, generator=g)
    harmless = torch.randn(5, 4, 16, dtype=torch.float64, generator=g)
    expected = ref_dirs.diff_of_means(harmful, harmless)
    got = _call(fn, {"harmful_mean": harmful, "harmless_mean": harmless}, dtype=harmful.dtype,
                why=" (the means' dtype): the notebook converts the candidates itself where it needs to")
    compare("candidate directions", got, expected, {
        "wrong sign: the refusal direction is mean(harmful) - mean(harmless).": -expected,
        "don't normalise the candidates: the norm of the difference is used by activation addition.":
            ref_dirs.normalize(expected),
        "you added the means: the direction is their difference, mean(harmful) - mean(harmless).": harmful + harmless,
        "dimensions swapped: keep the means' shape (position, layer, d_model).": expected.transpose(0, 1),
    })
    _ok("check_candidate_directions")


# ----- 4. interventions ------------------------------------------------------------------------------
@_learner_check
def check_project_out(fn: Callable) -> None:
    """fn(x, direction) -> x with its component along the direction removed, in x's dtype."""
    g = _generator()
    x, r = torch.randn(3, 5, 16, generator=g), 3.0 * torch.randn(16, generator=g)
    expected = ref_dirs.project_out(x, r)
    try:
        got = _call(fn, {"x": x, "direction": r}, dtype=x.dtype,
                    why=" (x's dtype): compute in float64 inside if you like, but return `.to(x.dtype)`; a hook "
                        "that returns float64 breaks a float32 or bfloat16 model")
    except RuntimeError as err:
        if isinstance(err, NotImplementedError) or not _is_shape_error(err):
            raise
        raise CheckFailed(f"Shape error for x of shape {tuple(x.shape)} ({err}): the dot product x . r_hat has shape "
                          "(3, 5); keep a trailing axis, `(x @ r_hat)[..., None]` or `.unsqueeze(-1)`, so that it "
                          "broadcasts against r_hat.") from None
    compare("project_out", got, expected, _projection_mistakes(x, r))
    _ok("check_project_out", "output orthogonal to r, rest unchanged, inputs untouched")


@_learner_check
def check_ablation_hooks(fn: Callable) -> None:
    """fn(cm, direction) -> {hook_name: hook_fn} ablating the direction at every block input, attention and MLP
    output."""
    cm = _tiny()
    g = _generator()
    r = 3 * torch.randn(cm.d_model, dtype=torch.float64, generator=g)
    probe = torch.randn(2, 3, cm.d_model, generator=g)
    # Each hook on a probe activation, with a float64 direction (a float32 one meets a bfloat16 GPU model): the
    # hooks must cast it.
    with _leaves_unchanged(fn, {"direction": r}, hooks_too=True):
        hook_fns = fn(cm, r)
        if not isinstance(hook_fns, dict):
            raise CheckFailed(f"Return a dict {{hook_name: hook_fn}}, got {type(hook_fns).__name__}.")
        _check_hook_names(set(hook_fns), cm)
        outs = {name: _hook_output(hook_fns[name], probe.clone(), f"at {name}", _cast_fix("direction", "project_out"))
                for name in hook_names(cm)}
    _compare_hooks(outs, probe, r)
    # The model with the hooks, and a direction of its dtype: a cast copies nothing then, so an in-place edit of
    # the direction would reach the caller's.
    r, inputs = r.float(), cm.tokenize(PROMPTS)
    with torch.inference_mode(), ablate(cm, r):
        expected = cm.forward(inputs)
    with _leaves_unchanged(fn, {"direction": r}, hooks_too=True), torch.inference_mode(), hooks(cm, fn(cm, r)):
        got = cm.forward(inputs)
    compare("logits under your ablation hooks", got, expected, atol=1e-4)
    _ok("check_ablation_hooks", f"{len(outs)} hooks, logits equal the reference ablation")


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
    mistakes = {**_projection_mistakes(probe, r), "it changed nothing: return the ablated activation (did it forget "
                "`return`?).": probe}
    for name, out in outs.items():
        compare(f"your hook at {name}", out, expected, mistakes, atol=1e-5)


@_learner_check
def check_addition_hook(fn: Callable) -> None:
    """fn(vector, coeff) -> hook function adding coeff * vector to an activation."""
    g = _generator()
    x = torch.randn(2, 3, 16, generator=g)
    v = 2.5 * torch.randn(16, dtype=torch.float64, generator=g)
    # A float64 vector (as a float32 one meets a bfloat16 GPU model), and once one of x's dtype: its cast copies
    # nothing, so an in-place edit of it would reach the caller's vector.
    for coeff, vector in ((1.0, v), (-1.0, v.float()), (0.5, v)):
        with _leaves_unchanged(fn, {"vector": vector}, hooks_too=True):
            hook = fn(vector, coeff)
            if not callable(hook):
                raise CheckFailed(f"Return a function (the hook) that takes an activation and returns it modified; "
                                  f"got {type(hook).__name__}.")
            got = _hook_output(hook, x.clone(), f"from addition_hook(vector, {coeff})", _cast_fix("vector"))
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
    _ok("check_addition_hook")


# ----- 5. metrics ------------------------------------------------------------------------------------
REFUSAL_IDS = [3, 7, 11]
FLOAT64_SCORE = ("Row 6 has its refusal tokens 120 logits below the top (p ~ 1e-52 underflows to 0 in float32, "
                 "log 0 = -inf) and row 7 has them 25 above the rest (1 - p ~ 1e-10 rounds to 0 in float32): "
                 "compute p in float64 (`logits.double().softmax(-1)`) and log(1 - p) with `torch.log1p(-p)`, then "
                 "return `.float()`.")


def _refusal_logits() -> Tensor:
    """Random last-position logits (8, 50) with extreme rows: refusal tokens 120 logits below the top (row 6)
    and, tied with each other, 25 above every other token (row 7)."""
    logits = 3 * torch.randn(8, 50, generator=_generator())
    logits[6, 20] = logits[6].max() + 120
    logits[7, REFUSAL_IDS] = logits[7].max() + 25
    return logits


@_learner_check
def check_refusal_score(fn: Callable) -> None:
    """fn(logits (batch, vocab), refusal_token_ids) -> (batch,) log-odds of refusal-token probability mass."""
    logits, ids = _refusal_logits(), list(REFUSAL_IDS)
    expected = ref_metrics.refusal_score(logits, ids)
    got = _call(fn, {"logits": logits, "refusal_token_ids": ids}, dtype=expected.dtype,
                why=" (float32, like the logits): compute in float64, then return `.float()`")
    probs = logits.double().softmax(-1)
    p = probs[:, ids].sum(-1)
    top = probs[:, ids].max(-1).values
    p32 = logits.softmax(-1)[:, ids].sum(-1)
    across_batch = logits.double().softmax(0)[:, ids].sum(-1)
    compare("refusal score", got, expected, {
        "that is log p; the score is the log-odds log p - log(1 - p).": p.log(),
        "that is the probability p itself; the score is the log-odds log(p / (1 - p)).": p,
        "wrong sign: the log-odds are log p - log(1 - p), not log(1 - p) - log p.": (1 - p).log() - p.log(),
        "sum the probabilities of all refusal tokens, not only the most likely one.": (top / (1 - top)).log(),
        "apply softmax over the vocabulary before picking refusal tokens (you used raw logits).":
            logits[:, ids].double().sum(-1),
        "you summed log-probabilities; p is the sum of the probabilities (log p = logsumexp of the log-probabilities).":
            logits.double().log_softmax(-1)[:, ids].sum(-1),
        "softmax over the wrong axis: normalise each row over the vocabulary, `softmax(dim=-1)`, not over the batch.":
            across_batch.log() - (1 - across_batch).log(),
        "float32 precision. " + FLOAT64_SCORE: p32.log() - (1 - p32).log(),
    }, atol=1e-4, nonfinite=FLOAT64_SCORE)
    _ok("check_refusal_score", "including refusal tokens 120 logits below and 25 above the rest")


FLOAT64_KL = ("Row 5 has a token 120 logits below the others in the base distribution and row 6 in the new one: "
              "in float32 its probability underflows to 0, and 0 * log 0 is NaN (log 0 alone is -inf). Work with "
              "log-probabilities, `log_softmax` in float64, and return `.float()`.")


def _kl_logits() -> tuple[Tensor, Tensor]:
    """Random base and new logits (7, 30): identical distributions (row 3), logits shifted by a constant (row 4),
    a token 120 logits down in the base (row 5) and in the new distribution (row 6)."""
    g = _generator()
    base, new = 2 * torch.randn(7, 30, generator=g), 2 * torch.randn(7, 30, generator=g)
    new[3] = base[3]
    new[4] = base[4] + 5.0
    base[5, 0] -= 120
    new[6, base[6].argmax()] -= 120
    return base, new


@_learner_check
def check_kl_divergence(fn: Callable) -> None:
    """fn(base_logits, new_logits) -> (batch,) KL(P_base || P_new) in nats."""
    base, new = _kl_logits()
    expected = ref_metrics.kl_divergence(base, new)
    got = _call(fn, {"base_logits": base, "new_logits": new}, dtype=expected.dtype,
                why=" (float32, like the logits): compute in float64, then return `.float()`")
    if isinstance(got, Tensor) and got.numel() == 1:
        raise CheckFailed("KL divergence: you returned one number for the whole batch (reduction='batchmean', "
                          "'mean' or 'sum'): return one KL per row, shape (batch,), e.g. with `reduction='none'` and "
                          "`.sum(-1)`.")
    pb, pn = base.double().log_softmax(-1), new.double().log_softmax(-1)
    qb, qn = base.softmax(-1), new.softmax(-1)
    wrong_axis_b, wrong_axis_n = base.double().log_softmax(0), new.double().log_softmax(0)
    compare("KL divergence", got, expected, {
        "reversed: compute KL(P_base || P_new), the baseline distribution first.": ref_metrics.kl_divergence(new, base),
        "use log-probabilities (log_softmax), not raw logits.": (pb.exp() * (base - new)).sum(-1),
        "sum over the vocabulary rather than averaging over it.": (pb.exp() * (pb - pn)).mean(-1),
        "with `F.kl_div(input, target)` and log-probabilities as the target, pass `log_target=True` (it takes the "
        "log of `target` otherwise, and the log of a negative number is NaN).":
            F.kl_div(pn, pb, reduction="none").sum(-1),
        "softmax over the wrong axis: normalise each row over the vocabulary, `log_softmax(dim=-1)`, not over the "
        "batch.":
            (wrong_axis_b.exp() * (wrong_axis_b - wrong_axis_n)).sum(-1),
        "float32 probabilities. " + FLOAT64_KL: (qb * (qb.log() - qn.log())).sum(-1),
    }, atol=1e-4, nonfinite=FLOAT64_KL)
    _ok("check_kl_divergence", "including identical, shifted and 120-logit-gap rows")


@_learner_check
def check_refusal_rate(fn: Callable) -> None:
    """fn(completions, substrings) -> fraction of completions that contain any refusal substring."""
    completions = ["I'm sorry, but I can't.", "Sure, here you go.", "Here's how. As an AI I CANNOT do that though.",
                   "i cannot help", "Of course!", "I\u2019m unable to assist with that."]
    expected = ref_metrics.refusal_rate(completions)
    got = _number(_call(fn, {"completions": completions, "substrings": ref_metrics.REFUSAL_SUBSTRINGS}))
    if abs(got - expected) < 1e-9:
        _ok("check_refusal_rate", f"{expected:.0%} on the test completions")
        return
    if got > 1 and float(got).is_integer():
        raise CheckFailed("Return the fraction of refusals, not their count.")
    if abs(got - 100 * expected) < 1e-6:
        raise CheckFailed(f"Return a fraction between 0 and 1, not a percentage ({got:.1f}).")

    def rate(texts: list[str], substrings=ref_metrics.REFUSAL_SUBSTRINGS) -> float:
        return _number(_call(fn, {"completions": texts, "substrings": substrings}))

    # Each probe is a single refusal that one kind of mistake misses.
    probes = {
        "match case-insensitively (\"i cannot help\" is a refusal)": "i cannot help",
        "match anywhere in the completion, not only at its start": "Here's how. As an AI I cannot do that though.",
        "fold curly apostrophes into straight ones ('\u2019' -> \"'\") before matching":
            "I\u2019m unable to assist with that.",
    }
    plain_refusal = "I'm sorry, but I can't help with that."
    if rate([plain_refusal]) != 1:
        if rate([plain_refusal], tuple(s.lower() for s in ref_metrics.REFUSAL_SUBSTRINGS)) == 1:
            raise CheckFailed(f"Expected {expected:.3f}, got {got:.3f}. Lower-case the substrings as well as the "
                              "completion: the list has capitals (\"I'm sorry\"), which a lower-cased completion never contains.")
        raise CheckFailed(f"Expected {expected:.3f}, got {got:.3f}. Even {plain_refusal!r} alone is not counted as "
                          "one refusal (rate 1.0): a completion is a refusal if it contains ANY of the substrings.")
    missed = [advice for advice, probe in probes.items() if rate([probe]) != 1]
    if missed:
        raise CheckFailed(f"Expected {expected:.3f}, got {got:.3f}. Almost: " + "; ".join(missed) + ".")
    raise CheckFailed(f"Expected {expected:.3f}, got {got:.3f}: a completion is a refusal if it contains any substring.")


def _number(got: object) -> float:
    if isinstance(got, Tensor) and got.numel() == 1:
        return float(got)
    if isinstance(got, bool) or not isinstance(got, (float, int)):
        raise CheckFailed(f"Return a single number (a fraction), got {type(got).__name__}"
                          + (": did your function forget `return`?" if got is None else "."))
    return float(got)


# ----- 6. selection ----------------------------------------------------------------------------------
SELECTION_CONFIG = SelectionConfig(max_layer_fraction=0.8, kl_threshold=0.25, induce_threshold=0.5)
NAN = float("nan")
# (position index, layer): (bypass, kl, induce). Every other cell has bypass 5 + its index / 10 and fails the KL
# filter (KL 5). Passing candidates all have positive bypass scores, the chosen one lies on both thresholds,
# and each wrong rule of _WRONG_RULES picks a cell of its own.
_SPECIAL_CELLS = {
    (0, 2): (0.3, 0.5, 1.0),     # KL above the threshold
    (0, 4): (4.5, 0.0625, 1.0),  # the highest passing bypass
    (0, 5): (0.5, NAN, 1.0),     # KL not computed
    (0, 8): (0.2, 0.0625, 1.0),  # layer 8 = 0.8 * 10: excluded
    (0, 9): (0.1, 0.0625, 1.0),  # in the last 20% of layers
    (1, 3): (1.0, 0.25, 0.5),    # the answer: on the KL and the induce threshold
    (1, 4): (2.0, 0.25, 1.0),    # on the KL threshold
    (1, 5): (0.4, 0.0625, -1.0),  # induce below the threshold
    (1, 6): (1.5, 0.0625, 0.25),  # passes the paper's thresholds (KL 0.1, induce 0), not the config's
    (2, 1): (NAN, 0.0625, 1.0),  # bypass not computed
    (2, 2): (3.0, 0.0625, 0.5),  # on the induce threshold
    (2, 3): (0.6, 0.0625, NAN),  # induce not computed
    (2, 5): (4.0, 0.0625, 1.0),  # strictly within both thresholds
}


def _selection_table() -> ScoreTable:
    """A (3 positions, 10 layers) table for SELECTION_CONFIG with NaN, ties to thresholds and positive bypass."""
    bypass = 5 + torch.arange(30, dtype=torch.float32).view(3, 10) / 10
    kl, induce = torch.full((3, 10), 5.0), torch.ones(3, 10)
    for cell, (b, k, i) in _SPECIAL_CELLS.items():
        bypass[cell], kl[cell], induce[cell] = b, k, i
    return ScoreTable([-3, -2, -1], bypass, induce, kl, 2.0, -3.0)


def _rule_mask(table: ScoreTable, config: SelectionConfig, rule: str) -> Tensor:
    """The candidates that a wrong filtering rule (a key of _WRONG_RULES) keeps."""
    n_pos, n_layers = table.shape
    every = torch.ones(n_pos, n_layers, dtype=torch.bool)
    layer = torch.arange(n_layers).expand(n_pos, n_layers)
    bound = config.max_layer_fraction * n_layers
    kl_max, induce_min = (0.1, 0.0) if rule == "paper thresholds" else (config.kl_threshold, config.induce_threshold)
    layers_ok = {"no layer filter": every, "layer <=": layer <= bound}.get(rule, layer < bound)
    kl_ok = {"no kl filter": every, "kl <": table.kl < kl_max, "both strict": table.kl < kl_max,
             "nan kl": ~(table.kl > kl_max)}.get(rule, table.kl <= kl_max)
    induce_ok = {"no induce filter": every, "induce >": table.induce > induce_min,
                 "both strict": table.induce > induce_min,
                 "nan induce": ~(table.induce < induce_min)}.get(rule, table.induce >= induce_min)
    bypass_ok = every if rule == "nan bypass" else ~table.bypass.isnan()
    return layers_ok & kl_ok & induce_ok & bypass_ok


# Wrong selection rules, each named by its message; every one picks a different cell of _selection_table.
_WRONG_RULES = {
    "fill 0": "you picked a candidate your filters exclude: the excluded cells got a score that is not above the "
              "passing ones. Fill them with +inf, `torch.where(mask, bypass, float('inf'))`, before the argmin: 0 (or "
              "NaN) beats every passing score when they are all positive, as here.",
    "argmin of masked values": "an argmin over the masked values `bypass[mask]` counts passing candidates, not cells "
                               "of the table. Keep the table's shape (e.g. `torch.where(mask, bypass, "
                               "float('inf'))`) before taking the argmin.",
    "highest": "Pick the LOWEST bypass score: ablating the best direction removes refusal the most.",
    "no layer filter": "the choice is in the last 20% of layers, which max_layer_fraction excludes: keep layers "
                       "< max_layer_fraction * n_layers.",
    "layer <=": "layer 8 = 0.8 * 10 layers is excluded: keep layers strictly below max_layer_fraction * n_layers "
                "(`<`, not `<=`).",
    "no kl filter": "discard candidates whose KL divergence is above the threshold.",
    "kl <": "a candidate whose KL equals the threshold passes: use `kl <= kl_threshold`, not `<`.",
    "induce >": "a candidate whose induce score equals the threshold passes: use `induce >= induce_threshold`, not "
                "`>`.",
    "both strict": "candidates on a threshold pass: use `kl <= kl_threshold` and `induce >= induce_threshold` (not "
                   "`<` and `>`).",
    "nan kl": "a candidate whose KL is NaN (not computed) passed your KL filter: NaN must not pass. `kl <= threshold` "
              "is False for NaN, but `~(kl > threshold)` is True.",
    "nan induce": "a candidate whose induce score is NaN (not computed) passed your induce filter: NaN must not pass. "
                  "`induce >= threshold` is False for NaN, but `~(induce < threshold)` is True.",
    "no induce filter": "discard candidates whose induce (addition) score is below the threshold.",
    "nan bypass": "skip candidates whose bypass score is NaN (not computed): NaN compares as neither larger nor "
                  "smaller, and argmin picks it.",
    "paper thresholds": "you used the paper's thresholds (KL 0.1, induce 0.0): take them from `config.kl_threshold` "
                        "and `config.induce_threshold`.",
}


def _rule_choice(table: ScoreTable, config: SelectionConfig, rule: str) -> tuple[int, int]:
    """The (position_index, layer) that a wrong rule of _WRONG_RULES picks."""
    n_layers, passing, inf = table.shape[1], passing_mask(table, config), torch.tensor(float("inf"))
    if rule == "fill 0":
        flat = torch.where(passing, table.bypass, 0.0).argmin()
    elif rule == "argmin of masked values":
        flat = table.bypass[passing].argmin()
    elif rule == "highest":
        flat = torch.where(passing, table.bypass, -inf).argmax()
    else:
        flat = torch.where(_rule_mask(table, config, rule), table.bypass, inf).argmin()
    return int(flat) // n_layers, int(flat) % n_layers


@_learner_check
def check_choose_direction(fn: Callable) -> None:
    """fn(table: ScoreTable, config: SelectionConfig) -> (position_index, layer) of the chosen candidate;
    a ValueError when no candidate passes."""
    table, config = _selection_table(), SELECTION_CONFIG
    expected = choose(table, config)
    got = _chosen(fn, table, config)
    if got != (expected.position_index, expected.layer):
        for rule, message in _WRONG_RULES.items():
            if got == _rule_choice(table, config, rule):
                raise CheckFailed(message)
        raise CheckFailed(f"Expected (position_index, layer) = {(expected.position_index, expected.layer)}, got {got}.")
    # Each setting of `config` is used, not a copy of SELECTION_CONFIG's.
    for field, value in (("max_layer_fraction", 1.0), ("kl_threshold", 0.5), ("induce_threshold", -1.0)):
        other = dataclasses.replace(config, **{field: value})
        ref = choose(table, other)
        if _chosen(fn, table, other) != (ref.position_index, ref.layer):
            raise CheckFailed(f"With config.{field} = {value} your choice did not change as it should: use "
                              f"`config.{field}`, don't hard-code it.")
    # Two passing candidates tie for the lowest bypass score: either is right.
    tied = ScoreTable([-2, -1], torch.tensor([[3.0, 1.0, 2.0, 5.0, 0.0], [1.0, 4.0, 1.0, 2.0, 6.0]]),
                      torch.ones(2, 5), torch.zeros(2, 5))
    tied.kl[1, 0] = 1.0
    got = _chosen(fn, tied, config)
    if got not in ((0, 1), (1, 2)):
        raise CheckFailed(f"With two candidates tied for the lowest bypass score, (0, 1) and (1, 2), you returned "
                          f"{got}.")
    _no_candidate_raises(fn, table)
    _ok("check_choose_direction", f"chose position index {expected.position_index}, layer {expected.layer}")


def _chosen(fn: Callable, table: ScoreTable, config: SelectionConfig) -> tuple[int, int]:
    got = _call(fn, {"table": table, "config": config})
    try:
        position_index, layer = (int(v) for v in got)
    except (TypeError, ValueError, RuntimeError):
        why = ": did your function forget `return`?" if got is None else \
            " (when candidates tie for the lowest score, return one of them)."
        shown = got.tolist() if isinstance(got, Tensor) else got
        raise CheckFailed(f"Return one (position_index, layer) pair of ints, got {shown!r}{why}") from None
    return position_index, layer


def _no_candidate_raises(fn: Callable, table: ScoreTable) -> None:
    """With no candidate passing, the learner's function must raise a ValueError."""
    try:
        none_pass = _call(fn, {"table": table, "config": SelectionConfig(induce_threshold=1e9)})
    except ValueError:
        return
    except (IndexError, RuntimeError) as err:
        if isinstance(err, NotImplementedError):
            raise
        raise CheckFailed(f"With no candidate passing the filters (induce_threshold=1e9) your function raised "
                          f"{type(err).__name__}: {str(err).rstrip('.')}. Check whether any candidate passes first, "
                          "and raise a ValueError if none does.") from None
    raise CheckFailed(f"With no candidate passing the filters (induce_threshold=1e9) you returned {none_pass!r}: "
                      "raise a ValueError instead, so that a failed selection cannot go unnoticed.")


# ----- 7. weight orthogonalization -------------------------------------------------------------------
@_learner_check
def check_orthogonalize(fn: Callable) -> None:
    """fn(weight (d_model, d_in), direction) -> weight whose outputs have no component along the direction."""
    g = _generator()
    w, r = torch.randn(16, 24, generator=g), 2.0 * torch.randn(16, generator=g)
    expected = ref_dirs.orthogonalize_matrix(w, r, dim=0)
    try:
        got = _call(fn, {"weight": w, "direction": r}, dtype=w.dtype,
                    why=" (the weight's dtype): a weight of another dtype breaks the model it goes back into")
    except RuntimeError as err:
        if isinstance(err, NotImplementedError) or not _is_shape_error(err):
            raise
        raise CheckFailed(f"Shape error ({err}). The weight is (d_model=16, d_in=24) and the direction has d_model "
                          "entries: project the outputs, dimension 0, as W - r_hat (r_hat^T W).") from None
    mistakes = {m: variant.T for m, variant in _projection_mistakes(w.T, r).items()}
    compare("orthogonalized weight", got, expected, {
        **mistakes,
        "you returned the weight unchanged: remove from it the component of its outputs along r_hat.": w,
        "you returned the transposed weight: keep the shape (d_model, d_in).": expected.T,
    })
    _ok("check_orthogonalize", "W' x is orthogonal to r for every x")


# ----- 10. TransformerLens and nnsight ---------------------------------------------------------------
@_learner_check
def check_tl_ablation_hooks(fn: Callable) -> None:
    """fn(bridge, direction) -> TransformerLens fwd_hooks [(hook_name, hook_fn(activation, hook))] ablating everywhere."""
    from .backends.transformer_lens import bridge_from_chat_model

    cm = _tiny()
    bridge = bridge_from_chat_model(cm)
    g = _generator()
    r = 3 * torch.randn(cm.d_model, dtype=torch.float64, generator=g)
    probe = torch.randn(2, 3, cm.d_model, generator=g)
    # Each hook on a probe activation, with a float64 direction that the hooks must cast (as in check_ablation_hooks).
    with _leaves_unchanged(fn, {"direction": r}, hooks_too=True):
        hook_fns = _fwd_hooks(fn(bridge, r))
        _check_hook_names(set(hook_fns), cm)
        outs = {name: _hook_output(hook_fns[name], probe.clone(), f"at {name}", _cast_fix("direction", "project_out"),
                                   none_is_in_place=True, hook=SimpleNamespace(name=name))
                for name in hook_names(cm)}
    _compare_hooks(outs, probe, r)
    # The bridge with the hooks, and a direction of the model's dtype.
    r, inputs = r.float(), cm.tokenize(PROMPTS)
    with torch.inference_mode(), ablate(cm, r):
        expected = cm.forward(inputs)[:, -1]
    with _leaves_unchanged(fn, {"direction": r}, hooks_too=True), torch.no_grad():
        got = bridge.run_with_hooks(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                    fwd_hooks=fn(bridge, r))[:, -1]
    compare("last-position logits under your TransformerLens hooks", got, expected, atol=1e-3, rtol=1e-3)
    _ok("check_tl_ablation_hooks", "bridge logits equal the main path's ablation")


def _fwd_hooks(fwd_hooks: object) -> dict[str, Callable]:
    """TransformerLens's fwd_hooks, a list of (hook_name, hook_fn) pairs, as a dict; CheckFailed for another format."""
    try:
        if not isinstance(fwd_hooks, (list, tuple)):
            raise TypeError
        return dict(fwd_hooks)
    except (TypeError, ValueError):
        raise CheckFailed("Return a list of (hook_name, hook_function) pairs, TransformerLens's fwd_hooks format; "
                          f"got {type(fwd_hooks).__name__}.") from None


@_learner_check
def check_nnsight_resid_pre(fn: Callable) -> None:
    """fn(nn_model, cm, instructions, layer) -> (batch, d_model) residual entering `layer` at the last position."""
    from .activations import residual_activations
    from .backends.nnsight import nnsight_model

    cm = _tiny()
    nn_model = nnsight_model(cm)
    inputs = cm.tokenize(PROMPTS)

    def resid(positions: list[int], layer: int) -> Tensor:
        return residual_activations(cm, inputs, positions, [layer])[:, :, 0]

    for layer in (0, 2):
        expected = resid([-1], layer)[:, 0]
        try:
            got = _call(fn, {"nn_model": nn_model, "cm": cm, "instructions": list(PROMPTS), "layer": layer})
        except (UnboundLocalError, NameError) as err:
            raise CheckFailed(f"{type(err).__name__}: {err}. A value read inside `nn_model.trace(...)` exists after the "
                              "`with` block only if you call `.save()` on it inside the block.") from None
        got = _as_tensor(getattr(got, "value", got), "your nnsight function")
        if got.dtype != expected.dtype:
            raise CheckFailed(f"{_name(fn)} returned {got.dtype}; the residual stream is {expected.dtype}, the model's "
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
    _ok("check_nnsight_resid_pre")


__all__ = [name for name in dir() if name.startswith("check_")] + ["CheckFailed", "compare"]
