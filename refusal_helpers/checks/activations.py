"""Checks for sections 1-3: post-instruction positions, mean activations, difference of means."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .. import directions as ref_dirs
from ..activations import mean_activations as ref_mean_activations
from ..models import find_post_instruction_ids
from ..testing import BOS_TEMPLATES, tiny_tokenizer
from .core import (
    PROMPTS,
    CheckFailed,
    as_tensor,
    call,
    compare,
    generator,
    learner_check,
    ok,
    tiny,
)


# ----- 1. post-instruction positions -----------------------------------------------------------------
@learner_check
def check_post_instruction_positions(fn: Callable) -> None:
    """fn(tokenizer) -> negative positions of the template tokens after the user's text, e.g. [-5, ..., -1]."""

    chatml_expected = None
    for template in ("chatml", "gemma", "llama3"):
        tokenizer = tiny_tokenizer(template)
        expected = list(range(-len(find_post_instruction_ids(tokenizer)), 0))
        chatml_expected = chatml_expected or expected
        got = _positions(call(fn, {"tokenizer": tokenizer}))
        if got != expected:
            raise CheckFailed(_positions_mistake(got, expected, template, template in BOS_TEMPLATES, chatml_expected))
    ok("check_post_instruction_positions", "ChatML, and Gemma and Llama-3 templates whose tokenizers add <bos>")


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


@learner_check
def check_mean_activations(fn: Callable) -> None:
    """fn(cm, instructions, positions, layers, batch_size) -> (n_pos, n_layers, d_model) float64 means of resid_pre."""
    cm = tiny()
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
    ok("check_mean_activations", f"shape ({len(positions)}, {len(layers)}, {cm.d_model}), float64 sums, no hooks left")


def _learner_means(fn: Callable, cm, positions: list[int], layers: list[int]) -> Tensor:
    """The learner's means over PROMPTS in batches of 3, checked for hooks left behind and gradients."""
    before = _all_hook_count(cm)
    got = call(fn, {"cm": cm, "instructions": list(PROMPTS), "positions": list(positions), "layers": list(layers),
                     "batch_size": 3},
                dtype=torch.float64, why=MEANS_DTYPE)
    if _all_hook_count(cm) != before:
        raise CheckFailed("Hooks left attached to the model after your function returned: remove them "
                          "(use a `with` block or a try/finally).")
    got = as_tensor(got, "mean activations")
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
@learner_check
def check_candidate_directions(fn: Callable) -> None:
    """fn(harmful_mean, harmless_mean) -> candidate directions, same shape and dtype, not normalised."""
    g = generator()
    harmful = torch.randn(5, 4, 16, dtype=torch.float64, generator=g)
    harmless = torch.randn(5, 4, 16, dtype=torch.float64, generator=g)
    expected = ref_dirs.diff_of_means(harmful, harmless)
    got = call(fn, {"harmful_mean": harmful, "harmless_mean": harmless}, dtype=harmful.dtype,
                why=" (the means' dtype): the notebook converts the candidates itself where it needs to")
    compare("candidate directions", got, expected, {
        "wrong sign: the refusal direction is mean(harmful) - mean(harmless).": -expected,
        "don't normalise the candidates: the norm of the difference is used by activation addition.":
            ref_dirs.normalize(expected),
        "you added the means: the direction is their difference, mean(harmful) - mean(harmless).": harmful + harmless,
        "dimensions swapped: keep the means' shape (position, layer, d_model).": expected.transpose(0, 1),
    })
    ok("check_candidate_directions")
