import pytest
import torch

from refusal_helpers.directions import (
    add_vector,
    check_direction,
    cosine_similarity_matrix,
    diff_of_means,
    normalize,
    orthogonalize_matrix,
    project_out,
    projection,
)


def test_diff_of_means_shape_and_sign():
    a, b = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    torch.testing.assert_close(diff_of_means(a, b), a - b)
    with pytest.raises(ValueError, match="same shape"):
        diff_of_means(a, b[:, :2])


def test_normalize_keeps_zero_vectors_zero():
    x = torch.zeros(2, 5)
    x[1] = torch.tensor([3.0, 4.0, 0, 0, 0])
    out = normalize(x)
    assert torch.isfinite(out).all()
    assert out[0].abs().sum() == 0
    torch.testing.assert_close(out[1].norm(), torch.tensor(1.0))


def test_project_out_removes_exactly_the_component():
    r = torch.randn(16)
    x = torch.randn(4, 7, 16)
    out = project_out(x, r * 5.0)  # scale must not matter
    assert (out @ (r / r.norm())).abs().max() < 1e-5
    # the orthogonal part is untouched
    r_hat = r / r.norm()
    torch.testing.assert_close(out, x - (x @ r_hat)[..., None] * r_hat)


def test_project_out_per_sequence_directions():
    x, dirs = torch.randn(3, 5, 8), torch.randn(3, 1, 8)
    out = project_out(x, dirs)
    for i in range(3):
        torch.testing.assert_close(out[i], project_out(x[i], dirs[i, 0]))


def test_add_vector_and_projection():
    x, v = torch.randn(2, 3, 8), torch.randn(8)
    torch.testing.assert_close(add_vector(x, v, -2.0) - x, (-2.0 * v).expand_as(x))
    torch.testing.assert_close(projection(x, v), x @ (v / v.norm()))


def test_check_direction_errors():
    with pytest.raises(ValueError, match="NaN"):
        check_direction(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="zero norm"):
        check_direction(torch.zeros(4))
    with pytest.raises(ValueError, match="expected d_model = 8"):
        check_direction(torch.ones(4), d_model=8)
    with pytest.raises(ValueError, match="1-D"):
        check_direction(torch.ones(2, 4))


def test_cosine_similarity_matrix():
    a = torch.tensor([[1.0, 0], [0, 2.0], [0, 0]])
    sim = cosine_similarity_matrix(a)
    torch.testing.assert_close(sim, torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 0]], dtype=torch.float64))


def test_orthogonalize_matrix_along_output_dim():
    w, r = torch.randn(8, 5), torch.randn(8)  # Linear weight (d_model, d_in)
    out = orthogonalize_matrix(w, r, dim=0)
    assert (r @ out).abs().max() < 1e-5
    x = torch.randn(5)
    torch.testing.assert_close(out @ x, project_out(w @ x, r), atol=1e-5, rtol=1e-5)


def test_random_directions_are_reproducible_unit_vectors():
    from refusal_helpers.directions import random_directions

    r = random_directions(5, 32, seed=3)
    assert r.shape == (5, 32)
    assert torch.allclose(r.norm(dim=-1), torch.ones(5))
    assert torch.equal(r, random_directions(5, 32, seed=3))
    assert not torch.allclose(r, random_directions(5, 32, seed=4))
    assert (cosine_similarity_matrix(r) - torch.eye(5)).abs().max() < 0.9  # five different directions
    assert random_directions(0, 32).shape == (0, 32)
    with pytest.raises(ValueError, match="n >= 0"):
        random_directions(-1, 32)


def test_zero_dims_zeroes_only_those_entries_of_every_direction_and_copies():
    from refusal_helpers.directions import zero_dims

    x = torch.randn(2, 3, 8) + 5  # no entry is zero to begin with
    out = zero_dims(x, [1, 6])
    assert (out[..., [1, 6]] == 0).all()
    keep = [i for i in range(8) if i not in (1, 6)]
    assert torch.equal(out[..., keep], x[..., keep])
    assert (x[..., [1, 6]] != 0).all()  # the input is left as it was
    assert torch.equal(zero_dims(x, []), x) and zero_dims(x, []) is not x
    with pytest.raises(ValueError, match=r"0\.\.7 \(d_model = 8\)"):
        zero_dims(x, [8])
    with pytest.raises(ValueError, match="d_model = 8"):
        zero_dims(x, [-1])
