"""Checks for the notebook's exercises: the library is the reference answer.

Each ``check_<exercise>(learner_fn)`` runs the learner's function and the reference on the same inputs
(random tensors, tiny random-weight chat models) and prints one success line, or raises
``CheckFailed`` with a message that names the mistake when the answer matches a known wrong variant
(wrong sign, unnormalised direction, wrong positions, no float64 accumulation, hooks left attached...).
"""

from __future__ import annotations

from collections.abc import Callable
import torch
from torch import Tensor

from . import directions as ref_dirs
from . import metrics as ref_metrics
from .activations import mean_activations as ref_mean_activations
from .hookpoints import hook_names
from .interventions import addition_hook, hooks
from .models import find_post_instruction_ids
from .selection import ScoreTable, SelectionConfig, choose


class CheckFailed(AssertionError):
    """A learner's answer is wrong; the message says how."""


def _ok(name: str, detail: str = "") -> None:
    print(f"\u2705 {name} passed" + (f": {detail}" if detail else "."))


def _as_tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise CheckFailed(f"{name} should return a torch.Tensor, got {type(value).__name__}.")
    return value


def _check_keeps_dtype(out, x: Tensor, fix: str) -> None:
    """A hook must return the activation's dtype: a float64 residual stream breaks a float32 or bfloat16 model."""
    if isinstance(out, Tensor) and out.dtype != x.dtype:
        raise CheckFailed(f"Your hook turned a {x.dtype} activation into {out.dtype}. {fix}")


def _close(a: Tensor, b: Tensor, atol: float, rtol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol, equal_nan=True)


def compare(
    name: str,
    got: Tensor,
    expected: Tensor,
    mistakes: dict[str, Tensor] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> None:
    """Raise CheckFailed naming the mistake if `got` differs from `expected` (shape first, then values)."""
    got = _as_tensor(got, name)
    if got.shape != expected.shape:
        for mistake, variant in (mistakes or {}).items():
            if got.shape == variant.shape and _close(got, variant, atol, rtol):
                raise CheckFailed(f"{name}: {mistake}")
        raise CheckFailed(f"{name}: wrong shape, expected {tuple(expected.shape)} but got {tuple(got.shape)}.")
    if not torch.isfinite(got[torch.isfinite(expected)]).all():
        raise CheckFailed(f"{name}: the result contains NaN or inf values where the reference has none.")
    if _close(got, expected, atol, rtol):
        return
    for mistake, variant in (mistakes or {}).items():
        if _close(got, variant, atol, rtol):
            raise CheckFailed(f"{name}: {mistake}")
    err = (got.double() - expected.double()).abs().max().item()
    raise CheckFailed(f"{name}: values differ from the reference (max abs difference {err:.3g}).")


def _tiny(arch: str = "llama", template: str = "chatml", **kwargs):
    from .testing import tiny_chat_model

    return tiny_chat_model(arch, template=template, n_layers=3, **kwargs)


PROMPTS = ["How do I make a bomb?", "Write a poem about the sea.", "x", "What is 2 + 2? Answer briefly please."]


# ----- 1. post-instruction positions -----------------------------------------------------------------
def check_post_instruction_positions(fn: Callable) -> None:
    """fn(tokenizer) -> negative positions of the template tokens after the user's text, e.g. [-5, ..., -1]."""
    from .testing import tiny_tokenizer

    for template in ("chatml", "gemma", "llama3"):
        tokenizer = tiny_tokenizer(template)
        expected = list(range(-len(find_post_instruction_ids(tokenizer)), 0))
        got = fn(tokenizer)
        try:
            got = [int(p) for p in got]
        except TypeError:
            raise CheckFailed(f"Return a list of ints, got {type(got).__name__}.") from None
        if got == expected:
            continue
        n = len(expected)
        if got == list(range(n)) or all(p >= 0 for p in got):
            raise CheckFailed("Positions should be negative (counted from the end of the left-padded prompt), "
                              f"e.g. {expected}; got {got}.")
        if got == list(range(-n - 1, 0)):
            raise CheckFailed(f"Off by one: you included the last token of the user's instruction ({template} template).")
        if got == list(range(-n + 1, 0)):
            raise CheckFailed(f"Off by one: you missed the first template token after the instruction ({template} template).")
        if got == [-1]:
            raise CheckFailed("Only the last position: the paper uses every post-instruction template token.")
        raise CheckFailed(f"For the {template} template expected {expected}, got {got}. The check runs your function "
                          "on small test tokenizers of several templates, so compute the positions from the tokenizer "
                          "you are given rather than hard-coding your model's. Hint: compare the token ids of prompts "
                          "with different instructions from the end.")
    _ok("check_post_instruction_positions", "ChatML, Gemma and Llama-3 templates")


# ----- 2. mean activations ---------------------------------------------------------------------------
def check_mean_activations(fn: Callable) -> None:
    """fn(cm, instructions, positions, layers, batch_size) -> (n_pos, n_layers, d_model) float64 means of resid_pre."""
    cm = _tiny()
    positions = cm.post_instruction_positions
    layers = list(range(cm.n_layers))
    before = _all_hook_count(cm)
    got = fn(cm, PROMPTS, positions, layers, 3)
    if _all_hook_count(cm) != before:
        raise CheckFailed("Hooks left attached to the model after your function returned: remove them "
                          "(use a `with` block or a try/finally).")
    got = _as_tensor(got, "mean activations")
    if got.requires_grad:
        raise CheckFailed("Your means carry gradients (requires_grad=True): run the forward passes under "
                          "`torch.inference_mode()` (or `torch.no_grad()`). Nothing here needs gradients, and "
                          "keeping them costs memory and breaks `.numpy()` in the plots later.")
    expected = ref_mean_activations(cm, PROMPTS, positions, layers, batch_size=3)
    if got.dtype != torch.float64:
        raise CheckFailed(f"Accumulate (and return) the means in float64, got {got.dtype}: float32 sums drift over "
                          "large datasets.")
    # Known mistakes, computed from the reference's building blocks.
    all_layers = ref_mean_activations(cm, PROMPTS, positions, list(range(cm.n_layers)), batch_size=len(PROMPTS))
    mistakes = {
        "you returned sums, not means (divide by the number of instructions).": expected * len(PROMPTS),
        "you averaged over batches rather than over instructions (the last batch is smaller).":
            _mean_of_batch_means(cm, PROMPTS, positions, layers, 3),
        "wrong positions: take the post-instruction positions (the last tokens of the left-padded batch).":
            ref_mean_activations(cm, PROMPTS, [p - len(positions) for p in positions], layers, batch_size=3),
        "layer mismatch: cache the residual stream *entering* each block (resid_pre), not its output.":
            torch.cat([all_layers[:, 1:], _resid_post_last(cm, PROMPTS, positions)], dim=1),
        "layer mismatch: `hidden_states[l]` enters block l (resid_pre); `hidden_states[l + 1]` is its output.":
            torch.cat([all_layers[:, 1:], _final_hidden_state(cm, PROMPTS, positions)], dim=1),
    }
    compare("mean activations", got, expected, mistakes, atol=1e-4)
    _ok("check_mean_activations", f"shape {tuple(got.shape)}, float64, no hooks left")


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
def check_candidate_directions(fn: Callable) -> None:
    """fn(harmful_mean, harmless_mean) -> candidate directions, same shape, not normalised."""
    torch.manual_seed(0)
    harmful, harmless = torch.randn(5, 4, 16, dtype=torch.float64), torch.randn(5, 4, 16, dtype=torch.float64)
    expected = ref_dirs.diff_of_means(harmful, harmless)
    got = fn(harmful, harmless)
    compare("candidate directions", got, expected, {
        "wrong sign: the refusal direction is mean(harmful) - mean(harmless).": -expected,
        "don't normalise the candidates: the norm of the difference is used by activation addition.":
            ref_dirs.normalize(expected),
    })
    _ok("check_candidate_directions")


# ----- 4. interventions ------------------------------------------------------------------------------
def check_project_out(fn: Callable) -> None:
    """fn(x, direction) -> x with its component along the direction removed."""
    torch.manual_seed(0)
    x, r = torch.randn(3, 5, 16), 3.0 * torch.randn(16)
    expected = ref_dirs.project_out(x, r)
    r_hat = r / r.norm()
    got = fn(x, r)
    compare("project_out", got, expected, {
        "normalise the direction first: with an unnormalised r you remove (x . r) r, which scales with |r|^2.":
            x - (x @ r)[..., None] * r,
        "you kept the component along r (the projection) instead of removing it.": (x @ r_hat)[..., None] * r_hat,
        "wrong sign: ablation subtracts the projection, it does not add it.": x + (x @ r_hat)[..., None] * r_hat,
    })
    _ok("check_project_out", "output orthogonal to r, rest unchanged")


def check_ablation_hooks(fn: Callable) -> None:
    """fn(cm, direction) -> {hook_name: hook_fn} ablating the direction at every block input, attention and MLP output."""
    from .interventions import ablate

    cm = _tiny()
    r = torch.randn(cm.d_model, dtype=torch.float64)  # not the model's dtype, as on a bfloat16 GPU model
    hook_fns = fn(cm, r)
    if not isinstance(hook_fns, dict):
        raise CheckFailed(f"Return a dict {{hook_name: hook_fn}}, got {type(hook_fns).__name__}.")
    expected_names = set(hook_names(cm))
    missing = expected_names - set(hook_fns)
    if missing:
        kinds = sorted({m.split(".")[-1] for m in missing})
        layers = sorted({int(m.split(".")[1]) for m in missing})
        raise CheckFailed(f"Missing hooks: kinds {kinds} at layers {layers}. Ablate at every layer: the block input "
                          "(hook_resid_pre) and what attention and the MLP write (hook_attn_out, hook_mlp_out).")
    inputs = cm.tokenize(PROMPTS)
    with ablate(cm, r):
        expected = cm.forward(inputs)
    cast = "Cast the direction to the activation's dtype and device inside the hook: `direction.to(x)`."
    probe = torch.randn(2, 3, cm.d_model)
    try:
        _check_keeps_dtype(hook_fns[hook_names(cm)[0]](probe.clone()), probe, cast)
        with hooks(cm, hook_fns):
            got = cm.forward(inputs)
    except RuntimeError as err:
        if "dtype" not in str(err) and "Double" not in str(err):
            raise
        raise CheckFailed(f"Your hooks fail when the direction's dtype differs from the model's ({err}). {cast}") from None
    compare("logits under your ablation hooks", got, expected, atol=1e-4)
    _ok("check_ablation_hooks", f"{len(expected_names)} hooks, logits equal the reference ablation")


def check_addition_hook(fn: Callable) -> None:
    """fn(vector, coeff) -> hook function adding coeff * vector to an activation."""
    torch.manual_seed(0)
    x, v = torch.randn(2, 3, 16), 2.5 * torch.randn(16, dtype=torch.float64)  # dtypes differ, as on a GPU model
    for coeff in (1.0, -1.0, 0.5):
        hook = fn(v, coeff)
        if not callable(hook):
            raise CheckFailed("Return a function (the hook) that takes an activation and returns it modified.")
        expected = addition_hook(v, coeff)(x)
        got = hook(x.clone())
        _check_keeps_dtype(got, x, "Cast the vector to the activation's dtype and device, `vector.to(x)`, or the "
                                   "next layer fails on a GPU model.")
        compare(f"addition hook (coeff {coeff})", got, expected, {
            "don't normalise the vector: activation addition adds the difference of means as it is.":
                x + coeff * v / v.norm(),
            "the coefficient is ignored.": x + v,
            "wrong sign of the coefficient.": x - coeff * v,
        })
    _ok("check_addition_hook")


# ----- 5. metrics ------------------------------------------------------------------------------------
def check_refusal_score(fn: Callable) -> None:
    """fn(logits (batch, vocab), refusal_token_ids) -> (batch,) log-odds of refusal-token probability mass."""
    torch.manual_seed(0)
    logits, ids = 3 * torch.randn(6, 50), [3, 7, 11]
    expected = ref_metrics.refusal_score(logits, ids)
    probs = logits.double().softmax(-1)
    p = probs[:, ids].sum(-1)
    got = fn(logits, ids)
    compare("refusal score", got, expected, {
        "that is log p; the score is the log-odds log p - log(1 - p).": p.log(),
        "that is the probability p itself; the score is the log-odds log(p / (1 - p)).": p,
        "sum the probabilities of all refusal tokens, not only the most likely one.":
            (probs[:, ids].max(-1).values / (1 - probs[:, ids].max(-1).values)).log(),
        "apply softmax over the vocabulary before picking refusal tokens (you used raw logits).":
            logits[:, ids].double().sum(-1),
    }, atol=1e-4)
    _ok("check_refusal_score")


def check_kl_divergence(fn: Callable) -> None:
    """fn(base_logits, new_logits) -> (batch,) KL(P_base || P_new) in nats."""
    torch.manual_seed(0)
    base, new = torch.randn(4, 30), torch.randn(4, 30)
    expected = ref_metrics.kl_divergence(base, new)
    got = _as_tensor(fn(base, new), "KL divergence")
    pb, pn = base.double().log_softmax(-1), new.double().log_softmax(-1)
    if got.shape == expected.shape and got.isnan().any():
        raise CheckFailed("KL divergence: NaN values. With `F.kl_div(input, target)` and log-probabilities as the "
                          "target, pass `log_target=True` (it takes the log of `target` otherwise, and log of a "
                          "negative number is NaN).")
    compare("KL divergence", got, expected, {
        "reversed: compute KL(P_base || P_new), the baseline distribution first.": ref_metrics.kl_divergence(new, base),
        "use log-probabilities (log_softmax), not raw logits.": (base.double().softmax(-1) * (base - new)).sum(-1),
        "sum over the vocabulary rather than averaging over it.": (pb.exp() * (pb - pn)).mean(-1),
    }, atol=1e-4)
    _ok("check_kl_divergence")


def check_refusal_rate(fn: Callable) -> None:
    """fn(completions, substrings) -> fraction of completions that contain any refusal substring."""
    completions = ["I'm sorry, but I can't.", "Sure, here you go.", "Here's how. As an AI I CANNOT do that though.",
                   "i cannot help", "Of course!", "I\u2019m unable to assist with that."]
    expected = ref_metrics.refusal_rate(completions)
    got = fn(completions, ref_metrics.REFUSAL_SUBSTRINGS)
    if not isinstance(got, (float, int)):
        raise CheckFailed(f"Return a single number (a fraction), got {type(got).__name__}.")
    if abs(got - expected) < 1e-9:
        _ok("check_refusal_rate", f"{expected:.0%} on the test completions")
        return
    if got > 1 and float(got).is_integer():
        raise CheckFailed("Return the fraction of refusals, not their count.")
    if abs(got - 100 * expected) < 1e-6:
        raise CheckFailed(f"Return a fraction between 0 and 1, not a percentage ({got:.1f}).")
    # Each probe is a single refusal that one kind of mistake misses.
    probes = {
        "match case-insensitively (\"i cannot help\" is a refusal)": "i cannot help",
        "match anywhere in the completion, not only at its start": "Here's how. As an AI I cannot do that though.",
        "fold curly apostrophes into straight ones ('\u2019' -> \"'\") before matching":
            "I\u2019m unable to assist with that.",
    }
    plain_refusal = "I'm sorry, but I can't help with that."
    if fn([plain_refusal], ref_metrics.REFUSAL_SUBSTRINGS) != 1:
        if fn([plain_refusal], [s.lower() for s in ref_metrics.REFUSAL_SUBSTRINGS]) == 1:
            raise CheckFailed(f"Expected {expected:.3f}, got {got:.3f}. Lower-case the substrings as well as the "
                              "completion: the list has capitals (\"I'm sorry\"), which a lower-cased completion never contains.")
        raise CheckFailed(f"Expected {expected:.3f}, got {got:.3f}. Even {plain_refusal!r} alone is not counted as "
                          "one refusal (rate 1.0): a completion is a refusal if it contains ANY of the substrings.")
    missed = [advice for advice, probe in probes.items() if fn([probe], ref_metrics.REFUSAL_SUBSTRINGS) != 1]
    if missed:
        raise CheckFailed(f"Expected {expected:.3f}, got {got:.3f}. Almost: " + "; ".join(missed) + ".")
    raise CheckFailed(f"Expected {expected:.3f}, got {got:.3f}: a completion is a refusal if it contains any substring.")


# ----- 6. selection ----------------------------------------------------------------------------------
def _selection_table() -> ScoreTable:
    nan = float("nan")
    bypass = torch.tensor([[0.0, -3.0, -1.0, -2.0, -9.0], [-4.0, -0.5, -2.5, nan, -8.0]])
    induce = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [-0.5, 1.0, 2.0, 1.0, 1.0]])
    kl = torch.tensor([[0.0, 0.3, 0.05, 0.02, 0.0], [0.01, 0.01, 0.09, 0.0, 0.0]])
    return ScoreTable([-2, -1], bypass, induce, kl, 2.0, -3.0)


def check_choose_direction(fn: Callable) -> None:
    """fn(table: ScoreTable, config: SelectionConfig) -> (position_index, layer) of the chosen candidate;
    a ValueError when no candidate passes."""
    table, config = _selection_table(), SelectionConfig(max_layer_fraction=0.8, kl_threshold=0.1, induce_threshold=0.0)
    expected = choose(table, config)
    got = tuple(int(v) for v in fn(table, config))
    if got == (expected.position_index, expected.layer):
        again = tuple(int(v) for v in fn(table, SelectionConfig(kl_threshold=1.0)))
        ref_again = choose(table, SelectionConfig(kl_threshold=1.0))
        if again != (ref_again.position_index, ref_again.layer):
            raise CheckFailed("Use the thresholds from `config`, don't hard-code them.")
        try:
            none_pass = fn(table, SelectionConfig(induce_threshold=1e9))
        except ValueError:
            pass
        except (IndexError, RuntimeError) as err:
            raise CheckFailed(f"With no candidate passing the filters (induce_threshold=1e9) your function raised "
                              f"{type(err).__name__}: {err}. Check whether any candidate passes first, and raise a "
                              "ValueError if none does.") from None
        else:
            raise CheckFailed(f"With no candidate passing the filters (induce_threshold=1e9) you returned {none_pass!r}: "
                              "raise a ValueError instead, so that a failed selection cannot go unnoticed.")
        _ok("check_choose_direction", f"chose position index {got[0]}, layer {got[1]}")
        return
    wrong = {
        (0, 4): "(0, 4) is in the last 20% of layers, which max_layer_fraction excludes. If your mask does exclude "
                "it, check how you turn the argmin back into (position_index, layer): an argmin over the masked "
                "values `bypass[mask]` counts passing candidates, not cells of the table. Keep the table's shape "
                "(e.g. `torch.where(mask, bypass, inf)`) before taking the argmin.",
        (0, 1): "discard candidates whose KL divergence is above the threshold.",
        (1, 0): "discard candidates whose induce (addition) score is below the threshold.",
        (1, 3): "skip candidates whose bypass score is NaN (not computed): NaN compares as neither larger nor smaller.",
    }
    if got == (0, 0):  # the highest bypass score among allowed candidates
        raise CheckFailed("Pick the LOWEST bypass score: ablating the best direction removes refusal the most.")
    if got in wrong:
        raise CheckFailed(wrong[got])
    raise CheckFailed(f"Expected (position_index, layer) = {(expected.position_index, expected.layer)}, got {got}.")


# ----- 7. weight orthogonalization -------------------------------------------------------------------
def check_orthogonalize(fn: Callable) -> None:
    """fn(weight (d_model, d_in), direction) -> weight whose outputs have no component along the direction."""
    torch.manual_seed(0)
    w, r = torch.randn(16, 24), 2.0 * torch.randn(16)
    expected = ref_dirs.orthogonalize_matrix(w, r, dim=0)
    r_hat = r / r.norm()
    try:
        got = fn(w.clone(), r)
    except RuntimeError as err:
        raise CheckFailed(f"Shape error ({err}). The weight is (d_model=16, d_in=24) and the direction has d_model "
                          "entries: project the outputs, dimension 0, as W - r_hat (r_hat^T W).") from None
    compare("orthogonalized weight", got, expected, {
        "normalise the direction first.": w - torch.outer(r, r @ w),
        "you returned the weight unchanged: remove from it the component of its outputs along r_hat.": w,
        "you removed the component twice (or with a factor 2).": w - 2 * torch.outer(r_hat, r_hat @ w),
    })
    _ok("check_orthogonalize", "W' x is orthogonal to r for every x")


# ----- 10. TransformerLens and nnsight ---------------------------------------------------------------
def check_tl_ablation_hooks(fn: Callable) -> None:
    """fn(bridge, direction) -> TransformerLens fwd_hooks [(hook_name, hook_fn(activation, hook))] ablating everywhere."""
    from .backends.transformer_lens import bridge_from_chat_model
    from .interventions import ablate

    cm = _tiny()
    bridge = bridge_from_chat_model(cm)
    r = torch.randn(cm.d_model)
    fwd_hooks = fn(bridge, r)
    try:
        names = {name for name, _ in fwd_hooks}
    except (TypeError, ValueError):
        raise CheckFailed("Return a list of (hook_name, hook_function) pairs, TransformerLens's fwd_hooks format.") from None
    missing = set(hook_names(cm)) - names
    if missing:
        kinds = sorted({m.split(".")[-1] for m in missing})
        raise CheckFailed(f"Missing hooks {kinds} at some layers: ablate hook_resid_pre, hook_attn_out and hook_mlp_out "
                          "at every layer.")
    inputs = cm.tokenize(PROMPTS)
    with ablate(cm, r):
        expected = cm.forward(inputs)[:, -1]
    try:
        with torch.no_grad():
            got = bridge.run_with_hooks(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                        fwd_hooks=fwd_hooks)[:, -1]
    except TypeError as err:
        raise CheckFailed(f"TransformerLens calls hook functions as fn(activation, hook): {err}") from None
    compare("last-position logits under your TransformerLens hooks", got, expected, atol=1e-3, rtol=1e-3)
    _ok("check_tl_ablation_hooks", "bridge logits equal the main path's ablation")


def check_nnsight_resid_pre(fn: Callable) -> None:
    """fn(nn_model, cm, instructions, layer) -> (batch, d_model) residual entering `layer` at the last position."""
    from .activations import residual_activations
    from .backends.nnsight import nnsight_model

    cm = _tiny()
    nn_model = nnsight_model(cm)
    inputs = cm.tokenize(PROMPTS)
    for layer in (0, 2):
        expected = residual_activations(cm, inputs, [-1], [layer])[:, 0, 0]
        try:
            got = fn(nn_model, cm, PROMPTS, layer)
        except (UnboundLocalError, NameError) as err:
            raise CheckFailed(f"{type(err).__name__}: {err}. A value read inside `nn_model.trace(...)` exists after the "
                              "`with` block only if you call `.save()` on it inside the block.") from None
        got = _as_tensor(getattr(got, "value", got), "your nnsight function")
        mistakes = {}
        if layer + 1 < cm.n_layers:
            mistakes["that is the block's output: read `.input` (the residual stream entering the block)."] = \
                residual_activations(cm, inputs, [-1], [layer + 1])[:, 0, 0]
        mistakes["take the last position, `[:, -1, :]`, not the first."] = residual_activations(cm, inputs, [0], [layer])[:, 0, 0]
        compare(f"nnsight resid_pre at layer {layer}", got, expected, mistakes, atol=1e-4)
    _ok("check_nnsight_resid_pre")


__all__ = [name for name in dir() if name.startswith("check_")] + ["CheckFailed", "compare"]
