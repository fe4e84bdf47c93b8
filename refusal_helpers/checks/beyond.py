"""Checks for the sections beyond the paper: where the direction comes from, and how a jailbreak suppresses it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import directions as ref_dirs
from ..jailbreak import head_projections as ref_head_projections
from .core import CheckFailed, call, compare, generator, learner_check, ok


# ----- 9. formation ----------------------------------------------------------------------------------
@learner_check
def check_cosine_to_final(fn: Callable) -> None:
    """fn(trajectory (checkpoint, layer, d_model), final (d_model,)) -> (checkpoint, layer) cosine similarities."""
    g = generator()
    trajectory, final = torch.randn(4, 6, 16, generator=g), 3 * torch.randn(16, generator=g)
    trajectory[1, 2] = 0.0  # a zero candidate (layer 0 at template positions is exactly zero): cosine 0, not NaN
    trajectory[2, 3] = -2.5 * final  # opposite: -1
    expected = ref_dirs.cosine_similarity_matrix(trajectory.flatten(0, 1), final[None]).view(4, 6).float()
    got = call(fn, {"trajectory": trajectory, "final": final}, dtype=torch.float32)
    dots = trajectory @ final
    compare("cosines", got, expected, {
        "those are dot products: divide by both norms (cosine = a . b / (|a| |b|)).": dots,
        "you divided by the trajectory's norms only: divide by the final direction's norm too.":
            dots / trajectory.norm(dim=-1).clamp_min(1e-12),
        "you divided by the final direction's norm only: divide by each candidate's norm too.": dots / final.norm(),
        "you compared every checkpoint with the first one, not with the final direction.":
            F.cosine_similarity(trajectory, trajectory[:1], dim=-1),
    }, atol=1e-4)
    if torch.isnan(got).any():
        raise CheckFailed("A zero candidate gave NaN: a zero vector's cosine is 0 (clamp the norms, as "
                          "`torch.nn.functional.cosine_similarity` does).")
    ok("check_cosine_to_final", "including a zero and an opposite candidate")


# ----- 10. jailbreaks ---------------------------------------------------------------------------------
@learner_check
def check_head_projections(fn: Callable) -> None:
    """fn(z (..., n_heads * head_dim), w_o (d_model, n_heads * head_dim), r_hat (d_model,), n_heads) -> (..., n_heads)."""
    g = generator()
    n_heads, head_dim, d_model = 4, 3, 10
    z, w_o = torch.randn(2, 5, n_heads * head_dim, generator=g), torch.randn(d_model, n_heads * head_dim, generator=g)
    r_hat = ref_dirs.normalize(torch.randn(d_model, generator=g))
    expected = ref_head_projections(z, w_o, r_hat, n_heads)
    got = call(fn, {"z": z, "w_o": w_o, "r_hat": r_hat, "n_heads": n_heads}, dtype=torch.float32)
    blocks = w_o.unflatten(-1, (n_heads, head_dim))  # (d_model, head, head_dim)
    wrong_split = z.unflatten(-1, (head_dim, n_heads)).transpose(-1, -2)
    total = (z @ w_o.T) @ r_hat
    compare("per-head projections", got, expected, {
        "heads are contiguous blocks of head_dim columns: z.view(..., n_heads, head_dim), not (head_dim, n_heads).":
            torch.einsum("...hd,mhd,m->...h", wrong_split, blocks, r_hat),
        "you split the whole output's projection equally between the heads: project each head's own output, "
        "W_O[:, h] z_h.": (total / n_heads)[..., None].expand_as(expected),
        "you summed over the heads: return one contribution per head.": expected.sum(-1, keepdim=True).expand_as(expected),
        "wrong sign: the contribution is r̂ᵀ W_O[:, h] z_h.": -expected,
    }, atol=1e-4)
    if not torch.allclose(got.sum(-1), total, atol=1e-4):
        raise CheckFailed("Your per-head contributions do not add up to the whole output's projection on r̂.")
    ok("check_head_projections", "the heads add up to the out-projection's output along r̂")
