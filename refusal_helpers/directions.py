"""Pure tensor math on directions: difference of means, normalisation, projection, geometry.

Nothing here touches a model, so every function can be checked on small synthetic tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

ZERO_NORM = 1e-8


def diff_of_means(
    harmful_mean: Float[Tensor, "pos layer d_model"], harmless_mean: Float[Tensor, "pos layer d_model"]
) -> Float[Tensor, "pos layer d_model"]:
    """Candidate refusal directions r = mean(harmful) - mean(harmless), one per (position, layer)."""
    if harmful_mean.shape != harmless_mean.shape:
        raise ValueError(
            f"Mean activations must have the same shape, got harmful {tuple(harmful_mean.shape)} and "
            f"harmless {tuple(harmless_mean.shape)}."
        )
    return harmful_mean - harmless_mean


def check_float_tensor(x: object, name: str = "direction") -> None:
    """Raise a clear error unless `x` is a floating-point torch tensor (not a list, numpy array or int tensor)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}: convert it with "
                        "torch.as_tensor(x, dtype=torch.float32).")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}: use .float().")


def check_direction(direction: Tensor, d_model: int | None = None, name: str = "direction") -> None:
    """Raise a clear error for a direction that is not a finite, non-zero float vector of the expected size."""
    check_float_tensor(direction, name)
    if direction.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of shape (d_model,), got shape {tuple(direction.shape)}.")
    if d_model is not None and direction.shape[0] != d_model:
        raise ValueError(f"{name} has {direction.shape[0]} entries, expected d_model = {d_model}.")
    if not torch.isfinite(direction).all():
        raise ValueError(f"{name} contains NaN or inf values.")
    if direction.norm() <= ZERO_NORM:
        raise ValueError(f"{name} has (near-)zero norm and cannot be normalised.")


def normalize(
    directions: Float[Tensor, "*batch d_model"], eps: float = ZERO_NORM
) -> Float[Tensor, "*batch d_model"]:
    """Unit vectors along `directions`; vectors with norm <= eps stay exactly zero (no NaN)."""
    norms = directions.norm(dim=-1, keepdim=True)
    return torch.where(norms > eps, directions / norms.clamp_min(eps), torch.zeros_like(directions))


def zero_dims(
    directions: Float[Tensor, "*batch d_model"], dims: Sequence[int]
) -> Float[Tensor, "*batch d_model"]:
    """`directions` with their entries on `dims` set to zero (a copy).

    Meant for a model's massive-activation dimensions: ablating a direction with an entry there moves the
    attention sink's outsized residual, which every later token reads. Not part of the paper's method.
    """
    d_model = directions.shape[-1]
    if any(not 0 <= i < d_model for i in dims):
        raise ValueError(f"dims to zero must lie in 0..{d_model - 1} (d_model = {d_model}), got {list(dims)}.")
    out = directions.clone()
    out[..., list(dims)] = 0
    return out


def random_directions(n: int, d_model: int, seed: int = 0) -> Float[Tensor, "n d_model"]:
    """`n` unit vectors drawn uniformly on the sphere, reproducibly from `seed` (controls for an ablation)."""
    if n < 0 or d_model < 1:
        raise ValueError(f"Expected n >= 0 and d_model >= 1, got n={n}, d_model={d_model}.")
    generator = torch.Generator().manual_seed(seed)
    return normalize(torch.randn(n, d_model, generator=generator))


def project_out(
    x: Float[Tensor, "... d_model"], direction: Float[Tensor, "*dir d_model"]
) -> Float[Tensor, "... d_model"]:
    """Directional ablation: x - (x . r_hat) r_hat, with r_hat the unit vector along `direction`.

    `direction` is (d_model,) for one direction, or (batch, 1, d_model) to ablate a different direction
    from each sequence of a (batch, seq, d_model) activation.
    """
    return project_out_unit(x, normalize(direction.to(dtype=x.dtype, device=x.device)))


def project_out_unit(
    x: Float[Tensor, "... d_model"], r_hat: Float[Tensor, "*dir d_model"]
) -> Float[Tensor, "... d_model"]:
    """x - (x . r_hat) r_hat for an already unit-norm `r_hat` of x's dtype and device."""
    return x - (x * r_hat).sum(-1, keepdim=True) * r_hat


def add_vector(
    x: Float[Tensor, "... d_model"], vector: Float[Tensor, "*dir d_model"], coeff: float = 1.0
) -> Float[Tensor, "... d_model"]:
    """Activation addition: x + coeff * vector (the vector is used as given, not normalised)."""
    return x + coeff * vector.to(dtype=x.dtype, device=x.device)


def projection(
    x: Float[Tensor, "... d_model"], direction: Float[Tensor, " d_model"]
) -> Float[Tensor, "..."]:
    """Scalar projection of activations onto the unit direction."""
    return x @ normalize(direction.to(dtype=x.dtype, device=x.device))


def cosine_similarity_matrix(
    a: Float[Tensor, "n d_model"], b: Float[Tensor, "m d_model"] | None = None
) -> Float[Tensor, "n m"]:
    """Pairwise cosine similarities; zero vectors give 0 rather than NaN."""
    a_hat = normalize(a.double())
    b_hat = a_hat if b is None else normalize(b.double())
    return a_hat @ b_hat.T


def orthogonalize_matrix(
    weight: Float[Tensor, "... d_model"], direction: Float[Tensor, " d_model"], dim: int = -1
) -> Float[Tensor, "... d_model"]:
    """Remove the component along r_hat from every vector of `weight` taken along `dim` (size d_model).

    For a Linear layer writing to the residual stream (weight of shape (d_model, d_in)) use dim=0,
    for an embedding (vocab, d_model) or a GPT-2 Conv1D (d_in, d_model) use dim=-1.
    """
    moved = weight.movedim(dim, -1)
    return project_out(moved, direction).movedim(-1, dim)
