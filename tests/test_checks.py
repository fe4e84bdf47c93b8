"""Every check passes the reference and correct answers written differently, and fails each planted wrong
answer (at least five per check, every mistake a learner was seen to make) with a message that names its mistake."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from refusal_helpers import checks
from refusal_helpers.activations import mean_activations, residual_activations
from refusal_helpers.directions import diff_of_means, normalize, orthogonalize_matrix, project_out
from refusal_helpers.interventions import ablation_hook, addition_hook, hook_names, hooks
from refusal_helpers.metrics import kl_divergence, refusal_rate, refusal_score
from refusal_helpers.models import find_post_instruction_ids, format_prompts
from refusal_helpers.selection import SelectionConfig, choose, passing_mask
from refusal_helpers.testing import tiny_tokenizer

WRONG: list = []  # pytest.param(check, learner_fn, message fragments, id=...)
RIGHT: list = []  # pytest.param(check, learner_fn, id=...)


def wrong(check, name, fn, *fragments):
    WRONG.append(pytest.param(check, fn, fragments, id=f"{check.__name__}-{name}"))


def right(check, name, fn):
    RIGHT.append(pytest.param(check, fn, id=f"{check.__name__}-{name}"))


def failure(check, fn) -> str:
    with pytest.raises(checks.CheckFailed) as info:
        check(fn)
    return str(info.value)


def r_hat_of(r):
    return r / r.norm()


# ----- post-instruction positions ----------------------------------------------------------------------
def ref_positions(tokenizer):
    return list(range(-len(find_post_instruction_ids(tokenizer)), 0))


def notebook_positions(tokenizer):  # the notebook's solution: the common suffix of differently ending prompts
    prompts = format_prompts(tokenizer, ["x", "Hello world!", "What is 2 + 2?"])
    sequences = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = 0
    while all(len(s) > n for s in sequences) and len({s[-1 - n] for s in sequences}) == 1:
        n += 1
    return list(range(-n, 0))


def suffix_positions(tokenizer, special_tokens=False):
    """The template text after a placeholder instruction, tokenised on its own."""
    prompt = format_prompts(tokenizer, ["PLACEHOLDER"])[0]
    suffix = prompt.split("PLACEHOLDER")[-1]
    return list(range(-len(tokenizer(suffix, add_special_tokens=special_tokens)["input_ids"]), 0))


def prefix_positions(tokenizer):
    """Prompt length minus the length of everything up to the instruction's end, the latter tokenised with
    special tokens (a BOS-adding tokenizer counts one token more there)."""
    prompt = format_prompts(tokenizer, ["PLACEHOLDER"])[0]
    head = prompt[: prompt.index("PLACEHOLDER") + len("PLACEHOLDER")]
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - len(tokenizer(head)["input_ids"])
    return list(range(-n, 0))


CHATML_POSITIONS = ref_positions(tiny_tokenizer("chatml"))
check = checks.check_post_instruction_positions
right(check, "library", ref_positions)
right(check, "notebook", notebook_positions)
right(check, "suffix-without-special-tokens", suffix_positions)
right(check, "tensor", lambda t: torch.arange(-len(ref_positions(t)), 0))
wrong(check, "positive", lambda t: [p + len(ref_positions(t)) for p in ref_positions(t)], "negative")
wrong(check, "instruction-token", lambda t: [ref_positions(t)[0] - 1] + ref_positions(t), "included the last token")
wrong(check, "missed-first", lambda t: ref_positions(t)[1:], "missed the first")
wrong(check, "last-only", lambda t: [-1], "only the last")
wrong(check, "reversed", lambda t: ref_positions(t)[::-1], "increasing order")
wrong(check, "hard-coded-chatml", lambda t: CHATML_POSITIONS, "gemma template", "hard-coding")
wrong(check, "count", lambda t: len(ref_positions(t)), "list of ints")
wrong(check, "no-return", lambda t: None, "forget `return`")
wrong(check, "bos-suffix", lambda t: suffix_positions(t, special_tokens=True),
      "one position too many on the gemma template", "<bos>", "add_special_tokens=False")
wrong(check, "bos-prefix", prefix_positions, "one position too few on the gemma template", "add_special_tokens=False")


# ----- mean activations --------------------------------------------------------------------------------
def notebook_means(cm, instructions, positions, layers, batch_size=32):  # the notebook's solution
    total = torch.zeros(len(positions), len(layers), cm.d_model, dtype=torch.float64, device=cm.device)
    for start in range(0, len(instructions), batch_size):
        captured = {}

        def capture(layer):
            def fn(x):
                captured[layer] = x[:, positions, :]
                return x
            return fn

        with hooks(cm, {f"blocks.{l}.hook_resid_pre": capture(l) for l in layers}), torch.inference_mode():
            cm.forward(cm.tokenize(instructions[start : start + batch_size]))
        total += torch.stack([captured[l] for l in layers], dim=2).double().sum(dim=0)
    return (total / len(instructions)).cpu()


def batch_acts(cm, instructions, positions, layers, batch_size):
    return [residual_activations(cm, cm.tokenize(instructions[i:i + batch_size]), positions, layers)
            for i in range(0, len(instructions), batch_size)]


def hidden_state_means(cm, instructions, positions, layers, batch_size, shift=0, grad=False):
    """An answer without hooks: transformers' `hidden_states[l + shift]` at the positions."""
    total = 0
    for i in range(0, len(instructions), batch_size):
        with torch.enable_grad() if grad else torch.no_grad():
            out = cm.model(**cm.tokenize(instructions[i:i + batch_size]), output_hidden_states=True)
        stacked = torch.stack([out.hidden_states[l + shift] for l in layers], dim=1)  # (batch, layer, seq, d)
        total = total + stacked[:, :, positions].double().sum(0).transpose(0, 1)
    return total / len(instructions)


def float32_running_sum(cm, instructions, positions, layers, batch_size):
    total = torch.zeros(len(positions), len(layers), cm.d_model)
    for acts in batch_acts(cm, instructions, positions, layers, batch_size):
        total += acts.sum(0)
    return (total / len(instructions)).double()


def float32_batch_sums(cm, instructions, positions, layers, batch_size):  # float64 total, float32 sums per batch
    total = torch.zeros(len(positions), len(layers), cm.d_model, dtype=torch.float64)
    for acts in batch_acts(cm, instructions, positions, layers, batch_size):
        total += acts.sum(0).double()
    return total / len(instructions)


def batch_means(cm, instructions, positions, layers, batch_size):
    acts = batch_acts(cm, instructions, positions, layers, batch_size)
    return torch.stack([a.double().mean(0) for a in acts]).mean(0)


def block_outputs(cm, instructions, positions, layers, batch_size):
    grabbed = []
    handles = [cm.blocks[l].register_forward_hook(lambda m, i, o: grabbed.append(o[0] if isinstance(o, tuple) else o))
               for l in layers]
    try:
        with torch.no_grad():
            cm.forward(cm.tokenize(instructions))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([g[:, positions] for g in grabbed], dim=1).double().mean(0).transpose(0, 1)


def leaves_hook(cm, *args):
    cm.blocks[0].register_forward_pre_hook(lambda m, a: None)
    return mean_activations(cm, *args)


def sorts_instructions(cm, instructions, *args):
    instructions.sort()
    return mean_activations(cm, instructions, *args)


check = checks.check_mean_activations
right(check, "library", mean_activations)
right(check, "notebook", notebook_means)
right(check, "hidden-states", hidden_state_means)
right(check, "all-then-mean", lambda *a: torch.cat(batch_acts(*a)).double().mean(0))
right(check, "weighted-batch-means",
      lambda cm, ins, *a: sum(x.double().mean(0) * len(x) for x in batch_acts(cm, ins, *a)) / len(ins))
wrong(check, "float32-output", lambda *a: mean_activations(*a).float(), "float64")
wrong(check, "float32-running-sum", float32_running_sum, "float32 sum", "*before* summing")
wrong(check, "float32-batch-sums", float32_batch_sums, "float32 sum")
wrong(check, "sums", lambda cm, ins, *a: mean_activations(cm, ins, *a) * len(ins), "sums, not means")
wrong(check, "batch-means", batch_means, "averaged over batches")
wrong(check, "hooks-left", leaves_hook, "hooks left attached")
wrong(check, "positions", lambda cm, ins, pos, *a: mean_activations(cm, ins, [p - len(pos) for p in pos], *a),
      "wrong positions")
wrong(check, "hidden-states-l+1", lambda *a: hidden_state_means(*a, shift=1), "hidden_states[l + 1]")
wrong(check, "gradients", lambda *a: hidden_state_means(*a, grad=True), "torch.inference_mode()")
wrong(check, "block-outputs", block_outputs, "(resid_pre), not its output")
wrong(check, "every-layer", lambda cm, ins, pos, layers, bs: mean_activations(cm, ins, pos, [0, 1, 2], bs),
      "ignored the `layers` argument")
wrong(check, "sorted-layers", lambda cm, ins, pos, layers, bs: mean_activations(cm, ins, pos, sorted(layers), bs),
      "in the order")
wrong(check, "sorts-instructions", sorts_instructions, "changed its input `instructions` in place", "copy")


# ----- candidate directions ----------------------------------------------------------------------------
def subtract_in_place(harmful_mean, harmless_mean):
    harmful_mean -= harmless_mean
    return harmful_mean


check = checks.check_candidate_directions
right(check, "library", diff_of_means)
right(check, "torch.sub", torch.sub)
right(check, "plus-negative", lambda a, b: a + (-b))
wrong(check, "sign", lambda a, b: b - a, "wrong sign")
wrong(check, "normalised", lambda a, b: normalize(a - b), "don't normalise")
wrong(check, "sum", lambda a, b: a + b, "added the means")
wrong(check, "transposed", lambda a, b: (a - b).transpose(0, 1), "dimensions swapped")
wrong(check, "in-place", subtract_in_place, "changed its input `harmful_mean` in place", "harmful_mean - ...")
wrong(check, "float32", lambda a, b: (a - b).float(), "torch.float32 tensor", "torch.float64")


# ----- project_out -------------------------------------------------------------------------------------
def notebook_project_out(x, direction):
    r_hat = direction / direction.norm()
    return x - (x @ r_hat)[..., None] * r_hat


def normalises_in_place(x, direction):  # passes on values, turns the notebook's direction into a unit vector
    direction /= direction.norm()
    return x - (x @ direction)[..., None] * direction


def edits_x_in_place(x, direction):
    r_hat = direction / direction.norm()
    x -= (x @ r_hat)[..., None] * r_hat
    return x


check = checks.check_project_out
right(check, "library", project_out)
right(check, "notebook", notebook_project_out)
right(check, "einsum", lambda x, r: x - torch.einsum("...d,d->...", x, r_hat_of(r)).unsqueeze(-1) * r_hat_of(r))
right(check, "sum-keepdim", lambda x, r: x - (x * r_hat_of(r)).sum(-1, keepdim=True) * r_hat_of(r))
right(check, "matrix", lambda x, r: x @ (torch.eye(len(r)) - torch.outer(r_hat_of(r), r_hat_of(r))))
right(check, "float64-inside", lambda x, r: notebook_project_out(x.double(), r.double()).to(x.dtype))
wrong(check, "unnormalised", lambda x, r: x - (x @ r)[..., None] * r, "not normalised", "|r|^2")
wrong(check, "divided-by-norm", lambda x, r: x - (x @ r)[..., None] * r / r.norm(), "divided by |r| once")
wrong(check, "kept-component", lambda x, r: (x @ r_hat_of(r))[..., None] * r_hat_of(r), "kept the component")
wrong(check, "sign", lambda x, r: x + (x @ r_hat_of(r))[..., None] * r_hat_of(r), "wrong sign")
wrong(check, "twice", lambda x, r: x - 2 * (x @ r_hat_of(r))[..., None] * r_hat_of(r), "twice")
wrong(check, "nan", lambda x, r: x * float("nan"), "nan")
wrong(check, "normalises-in-place", normalises_in_place, "changed its input `direction` in place",
      "`direction /= direction.norm()`", "r_hat = direction / direction.norm()")
wrong(check, "edits-x-in-place", edits_x_in_place, "changed its input `x` in place", "x - ...")
wrong(check, "float64", lambda x, r: notebook_project_out(x.double(), r.double()), "torch.float64", ".to(x.dtype)")
wrong(check, "no-trailing-axis", lambda x, r: x - (x @ r_hat_of(r)) * r_hat_of(r), "keep a trailing axis")


# ----- ablation hooks ----------------------------------------------------------------------------------
def hooks_with(hook, kinds=("hook_resid_pre", "hook_attn_out", "hook_mlp_out"), layers=None):
    """A learner's ablation_hooks(cm, direction) that puts hook(x, direction) at the given points."""
    return lambda cm, r: {n: (lambda x: hook(x, r)) for n in hook_names(cm, kinds, layers)}


def notebook_ablation_hooks(cm, direction):
    def fn(x):
        return notebook_project_out(x, direction.to(x))
    return {name: fn for layer in range(cm.n_layers)
            for name in (f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_attn_out",
                         f"blocks.{layer}.hook_mlp_out")}


def per_layer_closures(cm, direction):
    def make():
        r_hat = (direction / direction.norm()).float()
        return lambda x: x - (x @ r_hat)[..., None] * r_hat
    return {name: make() for name in hook_names(cm)}


def in_place_activation(x, r):
    r_hat = r_hat_of(r.to(x))
    x -= (x @ r_hat)[..., None] * r_hat
    return x


def no_return(x, r):
    x - (x @ r_hat_of(r.to(x)))[..., None] * r_hat_of(r.to(x))


STUB = {}  # project_out as exercise.ipynb has it, defined apart from the library's project_out imported above
exec("def project_out(x, direction):\n    raise NotImplementedError('x minus its projection')", STUB)


check = checks.check_ablation_hooks
right(check, "library", lambda cm, r: {n: ablation_hook(r) for n in hook_names(cm)})
right(check, "notebook", notebook_ablation_hooks)
right(check, "per-layer-closures", per_layer_closures)
right(check, "in-place-activation", hooks_with(in_place_activation))
wrong(check, "resid-only", hooks_with(lambda x, r: ablation_hook(r)(x), kinds=("hook_resid_pre",)),
      "missing hooks", "hook_attn_out at every layer", "hook_mlp_out at every layer")
wrong(check, "layer-0-only", hooks_with(lambda x, r: ablation_hook(r)(x), layers=[0]), "missing hooks", "layers [1, 2]")
wrong(check, "layers-1-to-3", lambda cm, r: {f"blocks.{l + 1}.{k}": ablation_hook(r) for l in range(cm.n_layers)
                                             for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")},
      "unknown hook names", "blocks.3")
wrong(check, "unnormalised", hooks_with(lambda x, r: x - (x @ r.to(x))[..., None] * r.to(x)), "not normalised")
wrong(check, "sign", hooks_with(lambda x, r: x + (x @ r_hat_of(r.to(x)))[..., None] * r_hat_of(r.to(x))), "wrong sign")
wrong(check, "uncast", hooks_with(lambda x, r: x - (x @ r_hat_of(r))[..., None] * r_hat_of(r)), "direction.to(x)")
wrong(check, "float64-project-out", hooks_with(lambda x, r: notebook_project_out(x.double(), r.to(x).double())),
      "into torch.float64", "project_out")
wrong(check, "no-return", hooks_with(no_return), "at blocks.0.hook_resid_pre returned none", "forget `return`")
wrong(check, "normalises-in-place", hooks_with(lambda x, r: normalises_in_place(x, r.to(x))),
      "changed its input `direction` in place", "normalised in place")
wrong(check, "transformer-lens-signature", lambda cm, r: {n: (lambda x, hook: x) for n in hook_names(cm)}, "fn(x)")
wrong(check, "stub-inside-hook", hooks_with(lambda x, r: STUB["project_out"](x, r.to(x))),
      "project_out is not written yet")


# ----- addition hook -----------------------------------------------------------------------------------
def notebook_addition_hook(vector, coeff=1.0):
    def fn(x):
        return x + coeff * vector.to(x)
    return fn


def in_place_add(vector, coeff=1.0):
    def fn(x):
        x += coeff * vector.to(x)
        return x
    return fn


def scales_vector(vector, coeff=1.0):
    vector *= coeff
    return lambda x: x + vector.to(x)


def last_position_only(vector, coeff=1.0):
    def fn(x):
        x = x.clone()
        x[:, -1] += coeff * vector.to(x)
        return x
    return fn


check = checks.check_addition_hook
right(check, "library", addition_hook)
right(check, "notebook", notebook_addition_hook)
right(check, "torch.add", lambda v, c: (lambda x: torch.add(x, v.to(x), alpha=c)))
right(check, "in-place-activation", in_place_add)
wrong(check, "normalised", lambda v, c: (lambda x: x + c * (v / v.norm()).to(x)), "don't normalise")
wrong(check, "coeff-ignored", lambda v, c: (lambda x: x + v.to(x)), "coefficient is ignored")
wrong(check, "sign", lambda v, c: (lambda x: x - c * v.to(x)), "wrong sign")
wrong(check, "uncast", lambda v, c: (lambda x: x + c * v), "into torch.float64", "vector.to(x)")
wrong(check, "last-position", last_position_only, "last position only")
wrong(check, "no-return", lambda v, c: (lambda x: None), "returned none", "forget `return`")
wrong(check, "returns-vector", lambda v, c: c * v, "return a function")
wrong(check, "scales-vector-in-place", scales_vector, "changed its input `vector` in place", "scaled in place")


# ----- refusal score -----------------------------------------------------------------------------------
def notebook_refusal_score(logits, refusal_token_ids):
    p = logits.double().softmax(dim=-1)[:, refusal_token_ids].sum(dim=-1)
    return (torch.log(p) - torch.log1p(-p)).float()


def log_space_score(logits, ids):
    log_p = logits.double().log_softmax(-1)[:, ids].logsumexp(-1)
    return (log_p - torch.log(-torch.expm1(log_p))).float()


def float32_score(logits, ids, log1p=False):  # -inf / inf on the 120- and 25-logit rows
    p = logits.softmax(-1)[:, ids].sum(-1)
    return p.log() - (torch.log1p(-p) if log1p else torch.log(1 - p))


def stabilises_in_place(logits, ids):
    logits -= logits.max(-1, keepdim=True).values
    return notebook_refusal_score(logits, ids)


def max_only(logits, ids):
    p = logits.double().softmax(-1)[:, ids].max(-1).values
    return (p / (1 - p)).log().float()


check = checks.check_refusal_score
right(check, "library", refusal_score)
right(check, "notebook", notebook_refusal_score)
right(check, "log-space", log_space_score)
right(check, "logit", lambda l, ids: torch.logit(l.double().softmax(-1)[:, ids].sum(-1)).float())
wrong(check, "log-p", lambda l, ids: l.log_softmax(-1)[:, ids].logsumexp(-1), "log-odds")
wrong(check, "p", lambda l, ids: l.softmax(-1)[:, ids].sum(-1), "probability p itself")
wrong(check, "raw-logits", lambda l, ids: l[:, ids].sum(-1), "softmax")
wrong(check, "max-only", max_only, "sum the probabilities")
wrong(check, "sign", lambda l, ids: -notebook_refusal_score(l, ids), "wrong sign")
wrong(check, "summed-log-probs", lambda l, ids: l.log_softmax(-1)[:, ids].sum(-1), "summed log-probabilities")
wrong(check, "softmax-over-batch", lambda l, ids: torch.logit(l.double().softmax(0)[:, ids].sum(-1)).float(),
      "wrong axis")
wrong(check, "float32-log", float32_score, "float32", "120 logits below", "log1p")
wrong(check, "float32-log1p", lambda l, ids: float32_score(l, ids, log1p=True), "float32", "120 logits below")
wrong(check, "float64-output", lambda l, ids: notebook_refusal_score(l, ids).double(), "torch.float64", ".float()")
wrong(check, "in-place-logits", stabilises_in_place, "changed its input `logits` in place", "logits -= ...")


# ----- KL divergence -----------------------------------------------------------------------------------
def notebook_kl(base_logits, new_logits):
    base, new = base_logits.double().log_softmax(-1), new_logits.double().log_softmax(-1)
    return F.kl_div(new, base, log_target=True, reduction="none").sum(-1).float()


def manual_kl(b, n):
    pb, pn = b.double().log_softmax(-1), n.double().log_softmax(-1)
    return (pb.exp() * (pb - pn)).sum(-1).float()


def float32_probability_kl(b, n):  # NaN / inf on the rows with a 120-logit gap
    p, q = b.softmax(-1), n.softmax(-1)
    return (p * (p.log() - q.log())).sum(-1)


def normalises_in_place_kl(b, n):
    b -= b.logsumexp(-1, keepdim=True)
    return notebook_kl(b, n)


check = checks.check_kl_divergence
right(check, "library", kl_divergence)
right(check, "notebook", notebook_kl)
right(check, "manual-sum", manual_kl)
right(check, "float64-probabilities", lambda b, n: (b.double().softmax(-1) * (b.double().softmax(-1).log()
                                                    - n.double().softmax(-1).log())).sum(-1).float())
right(check, "float32-log-space", lambda b, n: F.kl_div(n.log_softmax(-1), b.log_softmax(-1), log_target=True,
                                                        reduction="none").sum(-1))
wrong(check, "reversed", lambda b, n: kl_divergence(n, b), "reversed")
wrong(check, "raw-logits", lambda b, n: (b.softmax(-1) * (b - n)).sum(-1), "log_softmax")
wrong(check, "mean-over-vocab", lambda b, n: manual_kl(b, n) / b.shape[-1], "sum over the vocabulary")
wrong(check, "no-log-target", lambda b, n: F.kl_div(n.log_softmax(-1), b.log_softmax(-1), reduction="none").sum(-1),
      "log_target=True")
wrong(check, "float32-probabilities", float32_probability_kl, "float32", "120 logits below", "log_softmax")
wrong(check, "softmax-over-batch", lambda b, n: (b.double().softmax(0) * (b.double().log_softmax(0)
                                                                          - n.double().log_softmax(0))).sum(-1).float(),
      "wrong axis")
wrong(check, "batchmean", lambda b, n: F.kl_div(n.log_softmax(-1), b.log_softmax(-1), log_target=True,
                                                reduction="batchmean"), "one number for the whole batch")
wrong(check, "float64-output", lambda b, n: notebook_kl(b, n).double(), "torch.float64", ".float()")
wrong(check, "in-place-logits", normalises_in_place_kl, "changed its input `base_logits` in place")


# ----- refusal rate ------------------------------------------------------------------------------------
def fold(text):
    return text.replace("\u2019", "'")


def notebook_rate(completions, substrings):
    def norm(s):
        return s.replace("\u2019", "'").lower()
    return sum(any(norm(s) in norm(c) for s in substrings) for c in completions) / len(completions)


def lower_cases_in_place(completions, substrings):
    completions[:] = [fold(c).lower() for c in completions]
    return sum(any(s.lower() in c for s in substrings) for c in completions) / len(completions)


check = checks.check_refusal_rate
right(check, "library", refusal_rate)
right(check, "notebook", notebook_rate)
right(check, "casefold", lambda cs, subs: sum(any(fold(s).casefold() in fold(c).casefold() for s in subs)
                                               for c in cs) / len(cs))
wrong(check, "count", lambda cs, subs: sum(any(s.lower() in c.lower() for s in subs) for c in cs), "count")
wrong(check, "percentage", lambda cs, subs: 100 * refusal_rate(cs, subs), "not a percentage")
wrong(check, "prefix-only", lambda cs, subs: sum(any(c.startswith(s) for s in subs) for c in cs) / len(cs),
      "case-insensitively", "anywhere", "curly")
wrong(check, "case-sensitive", lambda cs, subs: sum(any(s in c for s in subs) for c in cs) / len(cs),
      "case-insensitively", "curly")
wrong(check, "substrings-not-lowered",
      lambda cs, subs: sum(any(s in fold(c).lower() for s in subs) for c in cs) / len(cs), "lower-case the substrings")
wrong(check, "all-not-any", lambda cs, subs: sum(all(s.lower() in c.lower() for s in subs) for c in cs) / len(cs),
      "any of the substrings")
wrong(check, "no-return", lambda cs, subs: None, "forget `return`")
wrong(check, "edits-completions", lower_cases_in_place, "changed its input `completions` in place")


def test_refusal_rate_names_only_the_mistake_made():
    only_case = failure(checks.check_refusal_rate,
                        lambda cs, subs: sum(any(s in fold(c) for s in subs) for c in cs) / len(cs))
    assert "case-insensitively" in only_case and "curly" not in only_case and "anywhere" not in only_case
    only_curly = failure(checks.check_refusal_rate,
                         lambda cs, subs: sum(any(s.lower() in c.lower() for s in subs) for c in cs) / len(cs))
    assert "curly" in only_curly and "case-insensitively" not in only_curly and "anywhere" not in only_curly
    only_prefix = failure(checks.check_refusal_rate, lambda cs, subs: sum(
        any(fold(c).lower().startswith(s.lower()) for s in subs) for c in cs) / len(cs))
    assert "anywhere" in only_prefix and "curly" not in only_prefix and "case-insensitively" not in only_prefix


# ----- choose_direction --------------------------------------------------------------------------------
EVERY = torch.tensor(True)


def learner_mask(t, c, layer=None, kl=None, induce=None, not_nan=None):
    """A learner's filter mask, the right one unless a part is given."""
    n_layers = t.bypass.shape[1]
    layer = torch.arange(n_layers) < int(c.max_layer_fraction * n_layers) if layer is None else layer
    kl = t.kl <= c.kl_threshold if kl is None else kl
    induce = t.induce >= c.induce_threshold if induce is None else induce
    not_nan = ~t.bypass.isnan() if not_nan is None else not_nan
    return layer & kl & induce & not_nan


def pick(t, ok, fill=float("inf")):
    if not ok.any():
        raise ValueError("No candidate passes the filters.")
    flat = int(torch.where(ok, t.bypass, torch.tensor(fill)).argmin())
    return flat // t.bypass.shape[1], flat % t.bypass.shape[1]


def notebook_choose(table, config):
    n_pos, n_layers = table.bypass.shape
    layers = torch.arange(n_layers).expand(n_pos, n_layers)
    ok = (layers < int(config.max_layer_fraction * n_layers)) & (table.kl <= config.kl_threshold)
    ok &= (table.induce >= config.induce_threshold) & ~table.bypass.isnan()
    if not ok.any():
        raise ValueError("No candidate passes the filters: relax the thresholds.")
    flat = int(torch.where(ok, table.bypass, torch.tensor(float("inf"))).argmin())
    return flat // n_layers, flat % n_layers


def python_loop_choose(t, c):
    cells = [(p, l) for p in range(t.bypass.shape[0]) for l in range(t.bypass.shape[1])
             if l < int(c.max_layer_fraction * t.bypass.shape[1]) and t.kl[p, l] <= c.kl_threshold
             and t.induce[p, l] >= c.induce_threshold and not t.bypass[p, l].isnan()]
    if not cells:
        raise ValueError("none passes")
    return min(cells, key=lambda cell: float(t.bypass[cell]))


def last_of_ties(t, c):  # a different tie-break: the last of the cells with the lowest score
    ok = learner_mask(t, c)
    if not ok.any():
        raise ValueError("none passes")
    scores = torch.where(ok, t.bypass, torch.tensor(float("inf")))
    return tuple(int(i) for i in (scores == scores.min()).nonzero()[-1])


def masked_clone(t, c):  # boolean-mask assignment on a copy: the table itself stays as it was
    ok = learner_mask(t, c)
    if not ok.any():
        raise ValueError("none passes")
    scores = t.bypass.clone()
    scores[~ok] = float("inf")
    return divmod(int(scores.argmin()), t.bypass.shape[1])


def overwrites_table(t, c):
    ok = learner_mask(t, c)
    if not ok.any():
        raise ValueError("none passes")
    t.bypass[~ok] = float("inf")
    return pick(t, ok)


def replaces_table_field(t, c):
    ok = learner_mask(t, c)
    if not ok.any():
        raise ValueError("none passes")
    t.bypass = torch.where(ok, t.bypass, torch.tensor(float("inf")))
    return pick(t, ok)


def argmin_of_masked_values(t, c):  # indexes the passing candidates, not the table
    ok = passing_mask(t, c)
    if not ok.any():
        raise ValueError("none passes")
    flat = int(t.bypass[ok].argmin())
    return flat // t.bypass.shape[1], flat % t.bypass.shape[1]


def no_empty_check(t, c):  # right on the table, but an empty mask makes argmin raise
    ok = passing_mask(t, c)
    return tuple(int(i) for i in ok.nonzero()[int(t.bypass[ok].argmin())])


def every_tied_cell(t, c):
    scores = torch.where(learner_mask(t, c), t.bypass, torch.tensor(float("inf")))
    if scores.isinf().all():
        raise ValueError("none passes")
    return (scores == scores.min()).nonzero().squeeze()


def paper_thresholds(t, c):
    return pick(t, learner_mask(t, SelectionConfig(max_layer_fraction=c.max_layer_fraction)))


def highest(t, c):
    flat = int(torch.where(learner_mask(t, c), t.bypass, torch.tensor(float("-inf"))).argmax())
    return divmod(flat, t.bypass.shape[1])


def nan_as_inf(t, c):  # NaN bypass scores turned into +inf with torch.where instead of a NaN mask
    scores = torch.where(learner_mask(t, c, not_nan=EVERY), t.bypass, torch.tensor(float("inf")))
    scores = torch.where(scores.isnan(), torch.tensor(float("inf")), scores)
    if scores.isinf().all():
        raise ValueError("none passes")
    return divmod(int(scores.argmin()), t.bypass.shape[1])


def allowed(t, c, rule):
    n_layers = t.bypass.shape[1]
    layer = torch.arange(n_layers)
    bound = c.max_layer_fraction * n_layers
    return {"le": layer <= bound, "float": layer < bound, "round": layer < round(bound)}[rule]


check = checks.check_choose_direction
right(check, "library", lambda t, c: (choose(t, c).position_index, choose(t, c).layer))
right(check, "notebook", notebook_choose)
right(check, "python-loop", python_loop_choose)
right(check, "nan-as-inf", nan_as_inf)
right(check, "masked-clone", masked_clone)
right(check, "last-of-ties", last_of_ties)
wrong(check, "fill-0", lambda t, c: pick(t, learner_mask(t, c), fill=0.0), "excluded cells", "+inf")
wrong(check, "strict-kl", lambda t, c: pick(t, learner_mask(t, c, kl=t.kl < c.kl_threshold)),
      "`kl <= kl_threshold`, not `<`")
wrong(check, "strict-induce", lambda t, c: pick(t, learner_mask(t, c, induce=t.induce > c.induce_threshold)),
      "`induce >= induce_threshold`, not `>`")
wrong(check, "strict-both", lambda t, c: pick(t, learner_mask(t, c, kl=t.kl < c.kl_threshold,
                                                              induce=t.induce > c.induce_threshold)),
      "on a threshold pass")
wrong(check, "nan-kl-passes", lambda t, c: pick(t, learner_mask(t, c, kl=~(t.kl > c.kl_threshold))), "kl is nan")
wrong(check, "nan-induce-passes", lambda t, c: pick(t, learner_mask(t, c, induce=~(t.induce < c.induce_threshold))),
      "induce score is nan")
wrong(check, "nan-bypass", lambda t, c: pick(t, learner_mask(t, c, not_nan=EVERY)), "bypass score is nan")
wrong(check, "highest", highest, "lowest")
wrong(check, "no-layer-filter", lambda t, c: pick(t, learner_mask(t, c, layer=EVERY)), "last 20%")
wrong(check, "float-bound", lambda t, c: pick(t, learner_mask(t, c, layer=allowed(t, c, "float"))),
      "int(0.8 * 12) = 9", "layer < int(config.max_layer_fraction * n_layers)")
wrong(check, "layer-le", lambda t, c: pick(t, learner_mask(t, c, layer=allowed(t, c, "le"))), "int(0.8 * 12) = 9")
wrong(check, "rounded-bound", lambda t, c: pick(t, learner_mask(t, c, layer=allowed(t, c, "round"))), "round the bound down")
wrong(check, "no-kl-filter", lambda t, c: pick(t, learner_mask(t, c, kl=EVERY)), "kl divergence is above")
wrong(check, "no-induce-filter", lambda t, c: pick(t, learner_mask(t, c, induce=EVERY)), "induce (addition) score")
wrong(check, "paper-thresholds", paper_thresholds, "paper's thresholds", "config.kl_threshold")
wrong(check, "hard-coded-fraction",
      lambda t, c: pick(t, learner_mask(t, dataclasses.replace(c, max_layer_fraction=0.8))),
      "config.max_layer_fraction = 1.0", "don't hard-code")
wrong(check, "argmin-of-masked-values", argmin_of_masked_values, "argmin over the masked values")
wrong(check, "no-empty-check", no_empty_check, "check whether any candidate passes first")
wrong(check, "returns-none", lambda t, c: pick(t, learner_mask(t, c)) if passing_mask(t, c).any() else None,
      "you returned none", "raise a valueerror")
wrong(check, "every-tied-cell", every_tied_cell, "tie for the lowest score, return one of them")
wrong(check, "overwrites-table", overwrites_table, "changed its input `table.bypass` in place",
      "table.bypass[~mask] = float('inf')", "torch.where(mask, table.bypass")
wrong(check, "replaces-table-field", replaces_table_field, "assigned a new value to `table.bypass`")


def test_each_wrong_selection_rule_picks_a_cell_of_its_own():
    from refusal_helpers.checks import selection

    table, config = selection._selection_table(), selection.SELECTION_CONFIG
    chosen = choose(table, config)
    cells = [selection._rule_choice(table, config, rule) for rule in selection._WRONG_RULES]
    assert len(set(cells)) == len(cells) and (chosen.position_index, chosen.layer) not in cells
    passing = passing_mask(table, config)
    assert (table.bypass[passing] > 0).all()  # so that 0 in the excluded cells beats them
    assert (table.kl[passing] == config.kl_threshold).any() and (table.induce[passing] == config.induce_threshold).any()


# ----- orthogonalize -----------------------------------------------------------------------------------
def notebook_orthogonalize(weight, direction):
    r_hat = direction / direction.norm()
    return weight - torch.outer(r_hat, r_hat @ weight)


def orthogonalize_in_place(weight, direction):
    r_hat = direction / direction.norm()
    weight -= torch.outer(r_hat, r_hat @ weight)
    return weight


check = checks.check_orthogonalize
right(check, "library", lambda w, r: orthogonalize_matrix(w, r, dim=0))
right(check, "notebook", notebook_orthogonalize)
right(check, "projector", lambda w, r: (torch.eye(len(r)) - torch.outer(r_hat_of(r), r_hat_of(r))) @ w)
right(check, "einsum", lambda w, r: w - torch.einsum("i,j,jk->ik", r_hat_of(r), r_hat_of(r), w))
wrong(check, "unnormalised", lambda w, r: w - torch.outer(r, r @ w), "not normalised")
wrong(check, "divided-by-norm", lambda w, r: w - torch.outer(r, r @ w) / r.norm(), "divided by |r| once")
wrong(check, "unchanged", lambda w, r: w.clone(), "unchanged")
wrong(check, "input-side", lambda w, r: w - torch.outer(w @ r_hat_of(r), r_hat_of(r)), "shape error", "dimension 0")
wrong(check, "twice", lambda w, r: w - 2 * torch.outer(r_hat_of(r), r_hat_of(r) @ w), "twice")
wrong(check, "sign", lambda w, r: w + torch.outer(r_hat_of(r), r_hat_of(r) @ w), "wrong sign")
wrong(check, "transposed", lambda w, r: orthogonalize_matrix(w.T, r, dim=-1), "transposed", "shape")
wrong(check, "in-place", orthogonalize_in_place, "changed its input `weight` in place")
wrong(check, "float64", lambda w, r: notebook_orthogonalize(w.double(), r.double()), "torch.float64", "weight's dtype")


# ----- TransformerLens ---------------------------------------------------------------------------------
KINDS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")


def tl_hooks(edit, kinds=KINDS):
    """A learner's tl_ablation_hooks(bridge, direction) with edit(activation, direction) at every layer."""
    def fwd_hooks(bridge, r):
        def fn(activation, hook):
            return edit(activation, r)
        return [(f"blocks.{l}.{k}", fn) for l in range(bridge.cfg.n_layers) for k in kinds]
    return fwd_hooks


def library_tl_hooks(bridge, direction):
    from refusal_helpers.backends.transformer_lens import ablation_hooks_tl

    return ablation_hooks_tl(bridge, direction)


def notebook_tl_hooks(bridge, direction):
    def fn(activation, hook):
        return notebook_project_out(activation, direction.to(activation))
    return [(f"blocks.{layer}.{kind}", fn) for layer in range(bridge.cfg.n_layers) for kind in KINDS]


def tl_in_place(a, r):  # TransformerLens keeps an activation edited in place when the hook returns None
    r_hat = r_hat_of(r.to(a))
    a -= (a @ r_hat)[..., None] * r_hat


check = checks.check_tl_ablation_hooks
right(check, "library", library_tl_hooks)
right(check, "notebook", notebook_tl_hooks)
right(check, "in-place-returns-none", tl_hooks(tl_in_place))
wrong(check, "resid-only", tl_hooks(lambda a, r: project_out(a, r), kinds=("hook_resid_pre",)),
      "missing hooks", "hook_attn_out")
wrong(check, "one-argument", lambda bridge, r: [(n, lambda a: a) for n, _ in notebook_tl_hooks(bridge, r)],
      "fn(activation, hook)")
wrong(check, "unnormalised", tl_hooks(lambda a, r: a - (a @ r.to(a))[..., None] * r.to(a)), "not normalised")
wrong(check, "sign", tl_hooks(lambda a, r: a + (a @ r_hat_of(r.to(a)))[..., None] * r_hat_of(r.to(a))), "wrong sign")
wrong(check, "no-return", tl_hooks(lambda a, r: no_return(a, r)), "it changed nothing", "forget `return`")
wrong(check, "dict", lambda bridge, r: dict(notebook_tl_hooks(bridge, r)), "list of (hook_name, hook_function) pairs")
wrong(check, "normalises-in-place", tl_hooks(lambda a, r: normalises_in_place(a, r.to(a))),
      "changed its input `direction` in place", "normalised in place")
wrong(check, "float64", tl_hooks(lambda a, r: notebook_project_out(a.double(), r.double())), "into torch.float64")


# ----- nnsight -----------------------------------------------------------------------------------------
def nnsight_read(layer_of, position=-1, output=False, whole=False, dtype=None):
    """A learner's nnsight_resid_pre reading block layer_of(layer)'s input (or output) at `position`."""
    import nnsight

    def fn(nn_model, cm, instructions, layer):
        block = nn_model.model.layers[layer_of(layer)]
        with torch.no_grad(), nn_model.trace(cm.tokenize(instructions)):
            value = block.output if output else block.input
            saved = nnsight.save(value if whole else value[:, position, :])
        return saved if dtype is None else saved.to(dtype)

    return fn


def notebook_nnsight(nn_model, cm, instructions, layer):
    with torch.no_grad(), nn_model.trace(cm.tokenize(instructions)):
        resid = nn_model.model.layers[layer].input[:, -1, :].save()
    return resid


def unsaved(nn_model, cm, instructions, layer):  # forgot .save(): the value is gone after the trace
    with torch.no_grad(), nn_model.trace(cm.tokenize(instructions)):
        resid = nn_model.model.layers[layer].input[:, -1, :]
    return resid


check = checks.check_nnsight_resid_pre
right(check, "notebook", notebook_nnsight)
right(check, "nnsight.save", nnsight_read(lambda l: l))
wrong(check, "unsaved", unsaved, ".save()")
wrong(check, "output", nnsight_read(lambda l: l, output=True), "read `.input`")
wrong(check, "previous-block", nnsight_read(lambda l: max(l - 1, 0)), "input of block 1")
wrong(check, "first-position", nnsight_read(lambda l: l, position=0), "last position")
wrong(check, "every-position", nnsight_read(lambda l: l, whole=True), "every position")
wrong(check, "float64", nnsight_read(lambda l: l, dtype=torch.float64), "torch.float64", "model's dtype")


# ----- the tests ---------------------------------------------------------------------------------------
ALL_CHECKS = [getattr(checks, name) for name in sorted(checks.__all__) if name.startswith("check_")]


@pytest.mark.parametrize("check, fn", RIGHT)
def test_correct_answers_pass(check, fn, capsys):
    check(fn)
    assert "passed" in capsys.readouterr().out


@pytest.mark.parametrize("check, fn, fragments", WRONG)
def test_wrong_answers_fail_naming_the_mistake(check, fn, fragments):
    message = failure(check, fn).lower()
    for fragment in fragments:
        assert fragment.lower() in message, message


def test_every_check_has_five_planted_wrong_answers_and_two_right_ones():
    assert len(ALL_CHECKS) == 15
    for check in ALL_CHECKS:
        planted = [p for p in WRONG if p.values[0] is check]
        assert len(planted) >= 5, check.__name__
        assert len([p for p in RIGHT if p.values[0] is check]) >= 2, check.__name__


STUB_NAMES = {
    "check_post_instruction_positions": "find_post_instruction_positions", "check_mean_activations": "mean_activations",
    "check_candidate_directions": "candidate_directions", "check_project_out": "project_out",
    "check_ablation_hooks": "ablation_hooks", "check_addition_hook": "addition_hook",
    "check_refusal_score": "refusal_score", "check_kl_divergence": "kl_divergence",
    "check_refusal_rate": "refusal_rate", "check_choose_direction": "choose_direction",
    "check_orthogonalize": "orthogonalize", "check_tl_ablation_hooks": "tl_ablation_hooks",
    "check_nnsight_resid_pre": "nnsight_resid_pre", "check_cosine_to_final": "cosine_to_final",
    "check_head_projections": "head_projections",
}


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda c: c.__name__)
def test_an_untouched_exercise_fails_with_one_short_message(check):
    name = STUB_NAMES[check.__name__]
    namespace = {}
    exec(f"def {name}(*args):\n    raise NotImplementedError('the hint')", namespace)  # exercise.ipynb's stub
    message = failure(check, namespace[name])
    assert message == (f"{name} is not written yet: replace the `raise NotImplementedError(...)` line in its cell "
                       "with your code, then run the cell again.")


def test_a_library_not_implemented_error_is_not_taken_for_a_stub():
    library = {"__name__": "torch.fake"}
    exec("def op(*args):\n    raise NotImplementedError('no kernel for this device')", library)
    with pytest.raises(NotImplementedError, match="no kernel"):
        checks.check_project_out(lambda x, r: library["op"](x))


def test_check_failed_shows_as_its_message_alone_in_ipython():
    rendered = checks.CheckFailed("project_out is not written yet")._render_traceback_()
    assert len(rendered) == 1 and rendered[0].endswith("CheckFailed\x1b[0m: project_out is not written yet")


@pytest.mark.parametrize("template, adds_bos", [("chatml", False), ("gemma", True), ("llama3", True)])
def test_test_tokenizers_add_bos_like_the_real_ones(template, adds_bos):
    tokenizer = tiny_tokenizer(template)
    plain = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    assert tokenizer("Hello")["input_ids"] == ([tokenizer.bos_token_id] if adds_bos else []) + plain


# ----- cosine_to_final (formation) ---------------------------------------------------------------------
def cosine_library(trajectory, final):
    return torch.nn.functional.cosine_similarity(trajectory, final.expand_as(trajectory), dim=-1)


def cosine_manual(trajectory, final):
    return (trajectory @ final) / (trajectory.norm(dim=-1) * final.norm()).clamp_min(1e-8)


check = checks.check_cosine_to_final
right(check, "library", cosine_library)
right(check, "manual", cosine_manual)
wrong(check, "dot-product", lambda t, f: t @ f, "dot products")
wrong(check, "trajectory-norm-only", lambda t, f: (t @ f) / t.norm(dim=-1).clamp_min(1e-12), "trajectory's norms only")
wrong(check, "final-norm-only", lambda t, f: (t @ f) / f.norm(), "final direction's norm only")
wrong(check, "against-first-checkpoint", lambda t, f: torch.nn.functional.cosine_similarity(t, t[:1], dim=-1),
      "compared every checkpoint with the first one")
wrong(check, "nan-for-zero", lambda t, f: (t @ f) / (t.norm(dim=-1) * f.norm()), "nan")
wrong(check, "normalises-in-place", lambda t, f: cosine_library(t, f.div_(f.norm())), "changed its input `final` in place")
wrong(check, "float64", lambda t, f: cosine_library(t.double(), f.double()), "torch.float64")


# ----- head_projections (jailbreaks) --------------------------------------------------------------------
def heads_library(z, w_o, r_hat, n_heads):
    from refusal_helpers.jailbreak import head_projections

    return head_projections(z, w_o, r_hat, n_heads)


def heads_loop(z, w_o, r_hat, n_heads):
    head_dim = w_o.shape[1] // n_heads
    return torch.stack([z[..., h * head_dim:(h + 1) * head_dim] @ (w_o[:, h * head_dim:(h + 1) * head_dim].T @ r_hat)
                        for h in range(n_heads)], dim=-1)


check = checks.check_head_projections
right(check, "library", heads_library)
right(check, "loop", heads_loop)
wrong(check, "wrong-split", lambda z, w, r, n: heads_loop(z.unflatten(-1, (w.shape[1] // n, n)).transpose(-1, -2).flatten(-2), w, r, n),
      "contiguous blocks")
wrong(check, "summed", lambda z, w, r, n: heads_loop(z, w, r, n).sum(-1, keepdim=True).expand(*z.shape[:-1], n),
      "summed over the heads")
wrong(check, "sign", lambda z, w, r, n: -heads_loop(z, w, r, n), "wrong sign")
wrong(check, "equal-split", lambda z, w, r, n: ((z @ w.T) @ r / n)[..., None].expand(*z.shape[:-1], n), "equally")
wrong(check, "scales-z-in-place", lambda z, w, r, n: heads_loop(z.mul_(2), w, r, n) / 2, "changed its input `z` in place")
wrong(check, "float64", lambda z, w, r, n: heads_loop(z.double(), w.double(), r.double(), n), "torch.float64")
