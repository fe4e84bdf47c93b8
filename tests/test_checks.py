"""Every check passes the reference and fails realistic learner mistakes with a message naming them."""

import pytest
import torch

from refusal_helpers import checks
from refusal_helpers.activations import mean_activations, residual_activations
from refusal_helpers.directions import diff_of_means, normalize, orthogonalize_matrix, project_out
from refusal_helpers.interventions import ablation_hook, addition_hook, hook_names
from refusal_helpers.metrics import kl_divergence, refusal_rate, refusal_score
from refusal_helpers.models import find_post_instruction_ids
from refusal_helpers.selection import choose, passing_mask


def fails(check, fn, *fragments):
    with pytest.raises(checks.CheckFailed) as info:
        check(fn)
    message = str(info.value).lower()
    for fragment in fragments:
        assert fragment.lower() in message, message


# ----- post-instruction positions ----------------------------------------------------------------------
def ref_positions(tokenizer):
    return list(range(-len(find_post_instruction_ids(tokenizer)), 0))


def test_positions(capsys):
    checks.check_post_instruction_positions(ref_positions)
    assert "passed" in capsys.readouterr().out
    fails(checks.check_post_instruction_positions, lambda t: [p + len(ref_positions(t)) for p in ref_positions(t)], "negative")
    fails(checks.check_post_instruction_positions, lambda t: [ref_positions(t)[0] - 1] + ref_positions(t), "included the last token")
    fails(checks.check_post_instruction_positions, lambda t: ref_positions(t)[1:], "missed the first")
    fails(checks.check_post_instruction_positions, lambda t: [-1], "only the last")
    # Hard-coding the ChatML answer passes ChatML and fails on another template, naming it.
    chatml = ref_positions(__import__("refusal_helpers.testing", fromlist=["x"]).tiny_tokenizer("chatml"))
    fails(checks.check_post_instruction_positions, lambda t: chatml, "gemma template", "rather than hard-coding")
    fails(checks.check_post_instruction_positions, lambda t: len(ref_positions(t)), "list of ints")


# ----- mean activations --------------------------------------------------------------------------------
def ref_means(cm, instructions, positions, layers, batch_size):
    return mean_activations(cm, instructions, positions, layers, batch_size)


def test_mean_activations():
    checks.check_mean_activations(ref_means)
    fails(checks.check_mean_activations, lambda *a: ref_means(*a).float(), "float64")
    fails(checks.check_mean_activations, lambda cm, ins, *a: ref_means(cm, ins, *a) * len(ins), "sums, not means")

    def batch_means(cm, ins, positions, layers, bs):
        parts = [residual_activations(cm, cm.tokenize(ins[i:i + bs]), positions, layers).double().mean(0)
                 for i in range(0, len(ins), bs)]
        return torch.stack(parts).mean(0)

    fails(checks.check_mean_activations, batch_means, "averaged over batches")

    def leaves_hook(cm, *a):
        cm.blocks[0].register_forward_pre_hook(lambda m, args: None)
        return ref_means(cm, *a)

    fails(checks.check_mean_activations, leaves_hook, "hooks left attached")

    def wrong_positions(cm, ins, positions, layers, bs):
        return ref_means(cm, ins, [p - len(positions) for p in positions], layers, bs)

    fails(checks.check_mean_activations, wrong_positions, "wrong positions")


def hidden_state_means(cm, instructions, positions, layers, batch_size, shift=0, grad=False):
    """A learner's answer without hooks: transformers' `hidden_states[l + shift]` at the positions."""
    total = 0
    for i in range(0, len(instructions), batch_size):
        with torch.enable_grad() if grad else torch.no_grad():
            out = cm.model(**cm.tokenize(instructions[i:i + batch_size]), output_hidden_states=True)
        stacked = torch.stack([out.hidden_states[l + shift] for l in layers], dim=1)  # (batch, layer, seq, d)
        total = total + stacked[:, :, positions].double().sum(0).transpose(0, 1)
    return total / len(instructions)


def test_mean_activations_from_hidden_states():
    # transformers keeps its own output-capturing hooks after output_hidden_states: they are not the learner's.
    checks.check_mean_activations(hidden_state_means)
    fails(checks.check_mean_activations, lambda *a: hidden_state_means(*a, shift=1), "hidden_states[l + 1]")
    fails(checks.check_mean_activations, lambda *a: hidden_state_means(*a, grad=True), "torch.inference_mode()")

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

    fails(checks.check_mean_activations, block_outputs, "(resid_pre), not its output")


# ----- directions and interventions --------------------------------------------------------------------
def test_candidate_directions():
    checks.check_candidate_directions(diff_of_means)
    fails(checks.check_candidate_directions, lambda a, b: b - a, "wrong sign")
    fails(checks.check_candidate_directions, lambda a, b: normalize(a - b), "don't normalise")
    fails(checks.check_candidate_directions, lambda a, b: (a - b).transpose(0, 1), "wrong shape")


def test_project_out():
    checks.check_project_out(project_out)
    fails(checks.check_project_out, lambda x, r: x - (x @ r)[..., None] * r, "normalise")
    fails(checks.check_project_out, lambda x, r: (x @ (r / r.norm()))[..., None] * (r / r.norm()), "kept the component")
    fails(checks.check_project_out, lambda x, r: x + (x @ (r / r.norm()))[..., None] * (r / r.norm()), "wrong sign")
    fails(checks.check_project_out, lambda x, r: x * float("nan"), "nan")


def test_ablation_hooks():
    def ref(cm, r):
        fn = ablation_hook(r)
        return {name: fn for name in hook_names(cm)}

    checks.check_ablation_hooks(ref)
    fails(checks.check_ablation_hooks, lambda cm, r: {n: ablation_hook(r) for n in hook_names(cm, ("hook_resid_pre",))},
          "missing hooks", "hook_attn_out")
    fails(checks.check_ablation_hooks, lambda cm, r: {n: ablation_hook(r) for n in hook_names(cm, layers=[0])}, "missing hooks")
    fails(checks.check_ablation_hooks, lambda cm, r: {n: (lambda x: x - (x @ r.to(x))[..., None] * r.to(x))
                                                     for n in hook_names(cm)}, "values differ")
    # No cast to the activation's dtype: fails (here float32 vs float64; on a GPU, bfloat16 vs float32) or promotes.
    def uncast(x, r):
        r_hat = r / r.norm()
        return x - (x @ r_hat)[..., None] * r_hat

    fails(checks.check_ablation_hooks, lambda cm, r: {n: (lambda x: uncast(x, r)) for n in hook_names(cm)},
          "direction.to(x)")
    fails(checks.check_ablation_hooks, lambda cm, r: {n: (lambda x: uncast(x.double(), r)) for n in hook_names(cm)},
          "into torch.float64", "direction.to(x)")


def test_addition_hook():
    checks.check_addition_hook(addition_hook)
    fails(checks.check_addition_hook, lambda v, c: (lambda x: x + c * (v / v.norm()).to(x)), "don't normalise")
    fails(checks.check_addition_hook, lambda v, c: (lambda x: x + v.to(x)), "coefficient is ignored")
    fails(checks.check_addition_hook, lambda v, c: (lambda x: x - c * v.to(x)), "wrong sign")
    fails(checks.check_addition_hook, lambda v, c: (lambda x: x + c * v), "vector.to(x)")


# ----- metrics -----------------------------------------------------------------------------------------
def test_refusal_score():
    checks.check_refusal_score(refusal_score)
    fails(checks.check_refusal_score, lambda l, ids: l.log_softmax(-1)[:, ids].logsumexp(-1), "log-odds")
    fails(checks.check_refusal_score, lambda l, ids: l.softmax(-1)[:, ids].sum(-1), "probability p itself")
    fails(checks.check_refusal_score, lambda l, ids: l[:, ids].sum(-1), "softmax")

    def max_only(l, ids):
        p = l.double().softmax(-1)[:, ids].max(-1).values
        return (p / (1 - p)).log()

    fails(checks.check_refusal_score, max_only, "sum the probabilities")


def test_kl_divergence():
    checks.check_kl_divergence(kl_divergence)
    fails(checks.check_kl_divergence, lambda b, n: kl_divergence(n, b), "reversed")
    fails(checks.check_kl_divergence, lambda b, n: (b.softmax(-1) * (b - n)).sum(-1), "log_softmax")

    def mean_not_sum(b, n):
        pb, pn = b.log_softmax(-1), n.log_softmax(-1)
        return (pb.exp() * (pb - pn)).mean(-1)

    fails(checks.check_kl_divergence, mean_not_sum, "sum over the vocabulary")
    fails(checks.check_kl_divergence, lambda b, n: torch.nn.functional.kl_div(
        n.log_softmax(-1), b.log_softmax(-1), reduction="none").sum(-1), "log_target=True")


def test_refusal_rate():
    checks.check_refusal_rate(refusal_rate)
    fails(checks.check_refusal_rate, lambda cs, subs: sum(any(s.lower() in c.lower() for s in subs) for c in cs), "count")
    fails(checks.check_refusal_rate, lambda cs, subs: sum(any(c.startswith(s) for s in subs) for c in cs) / len(cs),
          "case-insensitively", "anywhere", "curly")
    fails(checks.check_refusal_rate, lambda cs, subs: sum(any(s in c for s in subs) for c in cs) / len(cs),
          "case-insensitively", "curly")
    fails(checks.check_refusal_rate, lambda cs, subs: 100 * refusal_rate(cs, subs), "not a percentage")
    # the completion lower-cased, the substrings not: "I'm sorry" never matches
    fails(checks.check_refusal_rate, lambda cs, subs: sum(any(s in c.lower().replace("\u2019", "'") for s in subs)
                                                          for c in cs) / len(cs), "lower-case the substrings")
    # `all` for `any`: no probe hint fits, the message says what a refusal is
    fails(checks.check_refusal_rate, lambda cs, subs: sum(all(s.lower() in c.lower() for s in subs) for c in cs) / len(cs),
          "any of the substrings")

    def rate_message(fn) -> str:
        with pytest.raises(checks.CheckFailed) as info:
            checks.check_refusal_rate(fn)
        return str(info.value)

    # Each single mistake is named, and only that one.
    def fold(text):
        return text.replace("\u2019", "'")

    only_case = rate_message(lambda cs, subs: sum(any(s in fold(c) for s in subs) for c in cs) / len(cs))
    assert "case-insensitively" in only_case and "curly" not in only_case and "anywhere" not in only_case
    only_curly = rate_message(lambda cs, subs: sum(any(s.lower() in c.lower() for s in subs) for c in cs) / len(cs))
    assert "curly" in only_curly and "case-insensitively" not in only_curly and "anywhere" not in only_curly
    only_prefix = rate_message(
        lambda cs, subs: sum(any(fold(c).lower().startswith(s.lower()) for s in subs) for c in cs) / len(cs))
    assert "anywhere" in only_prefix and "curly" not in only_prefix and "case-insensitively" not in only_prefix


# ----- selection and orthogonalization ------------------------------------------------------------------
def test_choose_direction():
    import math

    checks.check_choose_direction(lambda t, c: (choose(t, c).position_index, choose(t, c).layer))

    def masked_argmin(t, c, skip_nan=True, raise_when_none=True):
        n_pos, n_layers = t.bypass.shape
        ok = (torch.arange(n_layers) < c.max_layer_fraction * n_layers) & (t.kl <= c.kl_threshold)
        ok &= t.induce >= c.induce_threshold
        if skip_nan:
            ok &= ~t.bypass.isnan()
        if raise_when_none and not ok.any():
            raise ValueError("no candidate passes")
        flat = int(torch.where(ok, t.bypass, torch.tensor(float("inf"))).argmin())
        return flat // n_layers, flat % n_layers

    checks.check_choose_direction(masked_argmin)
    fails(checks.check_choose_direction, lambda t, c: masked_argmin(t, c, skip_nan=False), "nan")
    fails(checks.check_choose_direction, lambda t, c: masked_argmin(t, c, raise_when_none=False), "valueerror")
    fails(checks.check_choose_direction, lambda t, c: masked_argmin(t, c) if passing_mask(t, c).any() else None,
          "you returned none", "raise a valueerror")

    def argmin_of_masked_values(t, c, check_empty=True):  # indexes the passing candidates, not the table
        ok = passing_mask(t, c)
        if check_empty and not ok.any():
            raise ValueError("no candidate passes")
        flat = int(t.bypass[ok].argmin())
        return flat // t.bypass.shape[1], flat % t.bypass.shape[1]

    fails(checks.check_choose_direction, argmin_of_masked_values, "argmin over the masked values")

    def no_empty_check(t, c):  # right on the table, but an empty mask makes argmin raise
        ok = passing_mask(t, c)
        return tuple(int(i) for i in ok.nonzero()[int(t.bypass[ok].argmin())])

    fails(checks.check_choose_direction, no_empty_check, "check whether any candidate passes first")

    def argmin_over(t, mask):
        best = min(((p, l) for p in range(2) for l in range(5) if mask(t, p, l) and not math.isnan(t.bypass[p, l])),
                   key=lambda c: float(t.bypass[c]))
        return best

    fails(checks.check_choose_direction, lambda t, c: argmin_over(t, lambda t, p, l: t.kl[p, l] <= c.kl_threshold
                                                                  and t.induce[p, l] >= c.induce_threshold), "last 20%")
    fails(checks.check_choose_direction, lambda t, c: argmin_over(t, lambda t, p, l: l < 4 and t.induce[p, l] >= 0), "kl")
    fails(checks.check_choose_direction, lambda t, c: argmin_over(t, lambda t, p, l: l < 4 and t.kl[p, l] <= 0.1), "induce")
    fails(checks.check_choose_direction, lambda t, c: argmin_over(t, lambda t, p, l: l < 4 and t.kl[p, l] <= 0.1
                                                                  and t.induce[p, l] >= 0 and t.bypass[p, l] >= 0), "lowest")
    fails(checks.check_choose_direction, lambda t, c: argmin_over(t, lambda t, p, l: l < 4 and t.kl[p, l] <= 0.1
                                                                  and t.induce[p, l] >= 0), "hard-code")


def test_orthogonalize():
    checks.check_orthogonalize(lambda w, r: orthogonalize_matrix(w, r, dim=0))
    fails(checks.check_orthogonalize, lambda w, r: w - torch.outer(r, r @ w), "normalise")
    fails(checks.check_orthogonalize, lambda w, r: w, "unchanged")
    # the input side: W - (W r_hat) r_hat^T needs d_in == d_model and fails on this (16, 24) weight
    fails(checks.check_orthogonalize, lambda w, r: w - torch.outer(w @ (r / r.norm()), r / r.norm()),
          "shape error", "dimension 0")
    fails(checks.check_orthogonalize, lambda w, r: w - 2 * torch.outer(r / r.norm(), (r / r.norm()) @ w), "twice")
    fails(checks.check_orthogonalize, lambda w, r: orthogonalize_matrix(w.T, r, dim=-1), "shape")


# ----- TransformerLens and nnsight ---------------------------------------------------------------------
def test_tl_ablation_hooks():
    from refusal_helpers.backends.transformer_lens import ablation_hooks_tl

    checks.check_tl_ablation_hooks(ablation_hooks_tl)
    kinds = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")

    def only_resid(bridge, r):
        return [(f"blocks.{l}.hook_resid_pre", lambda a, hook: project_out(a, r)) for l in range(bridge.cfg.n_layers)]

    def one_argument(bridge, r):
        return [(f"blocks.{l}.{k}", lambda a: project_out(a, r)) for l in range(bridge.cfg.n_layers) for k in kinds]

    def unnormalised(bridge, r):
        return [(f"blocks.{l}.{k}", lambda a, hook: a - (a @ r)[..., None] * r) for l in range(bridge.cfg.n_layers) for k in kinds]

    fails(checks.check_tl_ablation_hooks, only_resid, "missing hooks", "hook_attn_out")
    fails(checks.check_tl_ablation_hooks, one_argument, "fn(activation, hook)")
    fails(checks.check_tl_ablation_hooks, unnormalised, "values differ")


def test_nnsight_resid_pre():
    import nnsight

    def ref(nn_model, cm, instructions, layer):
        with torch.no_grad(), nn_model.trace(cm.tokenize(instructions)):
            saved = nnsight.save(nn_model.model.layers[layer].input[:, -1, :])
        return saved

    def output_not_input(nn_model, cm, instructions, layer):
        with torch.no_grad(), nn_model.trace(cm.tokenize(instructions)):
            saved = nnsight.save(nn_model.model.layers[layer].output[:, -1, :])
        return saved

    def first_position(nn_model, cm, instructions, layer):
        with torch.no_grad(), nn_model.trace(cm.tokenize(instructions)):
            saved = nnsight.save(nn_model.model.layers[layer].input[:, 0, :])
        return saved

    def whole_sequence(nn_model, cm, instructions, layer):
        with torch.no_grad(), nn_model.trace(cm.tokenize(instructions)):
            saved = nnsight.save(nn_model.model.layers[layer].input)
        return saved

    def unsaved(nn_model, cm, instructions, layer):  # forgot .save(): the value is gone after the trace
        with torch.no_grad(), nn_model.trace(cm.tokenize(instructions)):
            resid = nn_model.model.layers[layer].input[:, -1, :]
        return resid

    checks.check_nnsight_resid_pre(ref)
    fails(checks.check_nnsight_resid_pre, unsaved, ".save()")
    fails(checks.check_nnsight_resid_pre, output_not_input, "read `.input`")
    fails(checks.check_nnsight_resid_pre, first_position, "last position")
    fails(checks.check_nnsight_resid_pre, whole_sequence, "wrong shape")


def test_all_checks_exported():
    defined = {name for name in dir(checks) if name.startswith("check_")}
    assert len(defined) >= 13 and defined <= set(checks.__all__)
