"""Checks for section 5: the logit refusal score, KL divergence and the substring refusal rate."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import metrics as ref_metrics
from .core import CheckFailed, call, compare, generator, learner_check, ok

# ----- 5. metrics ------------------------------------------------------------------------------------
REFUSAL_IDS = [3, 7, 11]
FLOAT64_SCORE = ("Row 6 has its refusal tokens 120 logits below the top (p ~ 1e-52 underflows to 0 in float32, "
                 "log 0 = -inf) and row 7 has them 25 above the rest (1 - p ~ 1e-10 rounds to 0 in float32): "
                 "compute p in float64 (`logits.double().softmax(-1)`) and log(1 - p) with `torch.log1p(-p)`, then "
                 "return `.float()`.")


def _refusal_logits() -> Tensor:
    """Random last-position logits (8, 50) with extreme rows: refusal tokens 120 logits below the top (row 6)
    and, tied with each other, 25 above every other token (row 7)."""
    logits = 3 * torch.randn(8, 50, generator=generator())
    logits[6, 20] = logits[6].max() + 120
    logits[7, REFUSAL_IDS] = logits[7].max() + 25
    return logits


@learner_check
def check_refusal_score(fn: Callable) -> None:
    """fn(logits (batch, vocab), refusal_token_ids) -> (batch,) log-odds of refusal-token probability mass."""
    logits, ids = _refusal_logits(), list(REFUSAL_IDS)
    expected = ref_metrics.refusal_score(logits, ids)
    got = call(fn, {"logits": logits, "refusal_token_ids": ids}, dtype=expected.dtype,
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
    ok("check_refusal_score", "including refusal tokens 120 logits below and 25 above the rest")


FLOAT64_KL = ("Row 5 has a token 120 logits below the others in the base distribution and row 6 in the new one: "
              "in float32 its probability underflows to 0, and 0 * log 0 is NaN (log 0 alone is -inf). Work with "
              "log-probabilities, `log_softmax` in float64, and return `.float()`.")


def _kl_logits() -> tuple[Tensor, Tensor]:
    """Random base and new logits (7, 30): identical distributions (row 3), logits shifted by a constant (row 4),
    a token 120 logits down in the base (row 5) and in the new distribution (row 6)."""
    g = generator()
    base, new = 2 * torch.randn(7, 30, generator=g), 2 * torch.randn(7, 30, generator=g)
    new[3] = base[3]
    new[4] = base[4] + 5.0
    base[5, 0] -= 120
    new[6, base[6].argmax()] -= 120
    return base, new


@learner_check
def check_kl_divergence(fn: Callable) -> None:
    """fn(base_logits, new_logits) -> (batch,) KL(P_base || P_new) in nats."""
    base, new = _kl_logits()
    expected = ref_metrics.kl_divergence(base, new)
    got = call(fn, {"base_logits": base, "new_logits": new}, dtype=expected.dtype,
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
    ok("check_kl_divergence", "including identical, shifted and 120-logit-gap rows")


@learner_check
def check_refusal_rate(fn: Callable) -> None:
    """fn(completions, substrings) -> fraction of completions that contain any refusal substring."""
    completions = ["I'm sorry, but I can't.", "Sure, here you go.", "Here's how. As an AI I CANNOT do that though.",
                   "i cannot help", "Of course!", "I\u2019m unable to assist with that."]
    expected = ref_metrics.refusal_rate(completions)
    got = _number(call(fn, {"completions": completions, "substrings": ref_metrics.REFUSAL_SUBSTRINGS}))
    if abs(got - expected) < 1e-9:
        ok("check_refusal_rate", f"{expected:.0%} on the test completions")
        return
    if got > 1 and float(got).is_integer():
        raise CheckFailed("Return the fraction of refusals, not their count.")
    if abs(got - 100 * expected) < 1e-6:
        raise CheckFailed(f"Return a fraction between 0 and 1, not a percentage ({got:.1f}).")

    def rate(texts: list[str], substrings=ref_metrics.REFUSAL_SUBSTRINGS) -> float:
        return _number(call(fn, {"completions": texts, "substrings": substrings}))

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
