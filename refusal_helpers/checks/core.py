"""What every check shares: calling the learner's function safely, comparing with the reference, tiny inputs."""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .. import directions as ref_dirs
from ..selection import ScoreTable, SelectionConfig
from ..testing import tiny_chat_model


class CheckFailed(AssertionError):
    """A learner's answer is wrong; the message says how."""

    def _render_traceback_(self) -> list[str]:
        """How IPython and Jupyter display it: the message alone, without a traceback through this module
        (the cell still ends in an error, so "Run All" stops there)."""
        return [f"\x1b[1;31mCheckFailed\x1b[0m: {self}"]


def ok(name: str, detail: str = "") -> None:
    print(f"\u2705 {name} passed" + (f": {detail}" if detail else "."))


# ----- calling the learner's functions ---------------------------------------------------------------
# Modules whose NotImplementedError is a real error, not an exercise's stub.
_LIBRARY_MODULES = {"torch", "transformers", "tokenizers", "nnsight", "transformer_lens", "refusal_helpers"}


def learner_check(check: Callable[[Callable], None]) -> Callable[[Callable], None]:
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
    return name if name.isidentifier() else learner_name(fn)


def learner_name(fn: Callable) -> str:
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
def leaves_unchanged(fn: Callable, args: dict[str, object], hooks_too: bool = False) -> Iterator[None]:
    """Raise CheckFailed when the block (a call of the learner's `fn`, and with `hooks_too` of the hooks it
    returned) ends with one of `args` changed: the notebook passes its own tensors, so an in-place edit
    changes them too."""
    watched = [w for label, value in args.items() for w in _watch(value, label, lambda value=value: value)]
    yield
    who = f"{learner_name(fn)} (or a hook it returned)" if hooks_too else learner_name(fn)
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


def call(fn: Callable, args: dict[str, object], dtype: torch.dtype | None = None, why: str = "") -> object:
    """fn(*args.values()), which must leave `args` unchanged and, when `dtype` is given, return it."""
    with leaves_unchanged(fn, args):
        out = fn(*args.values())
    if dtype is not None and isinstance(out, Tensor) and out.dtype != dtype:
        raise CheckFailed(f"{learner_name(fn)} returned a {out.dtype} tensor where the reference returns {dtype}{why}.")
    return out


def as_tensor(value: object, name: str) -> Tensor:
    if value is None:
        raise CheckFailed(f"{name}: your function returned None. Did it forget `return`?")
    if not isinstance(value, Tensor):
        raise CheckFailed(f"{name} should return a torch.Tensor, got {type(value).__name__}.")
    return value


def _is_dtype_error(err: Exception) -> bool:
    text = str(err)
    return not isinstance(err, NotImplementedError) and ("dtype" in text or "scalar type" in text)


def is_shape_error(err: Exception) -> bool:
    text = str(err)
    return "size" in text or "shape" in text


def hook_output(hook_fn: Callable, x: Tensor, where: str, fix: str, none_is_in_place: bool = False,
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
    got = as_tensor(got, name)
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


def projection_mistakes(x: Tensor, r: Tensor) -> dict[str, Tensor]:
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


def tiny(arch: str = "llama", template: str = "chatml", **kwargs):

    return tiny_chat_model(arch, template=template, n_layers=3, **kwargs)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PROMPTS = ["How do I make a bomb?", "Write a poem about the sea.", "x", "What is 2 + 2? Answer briefly please."]


