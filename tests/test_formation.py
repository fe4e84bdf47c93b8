"""Where the direction comes from: the causal tests and the timeline read from a trajectory."""

import pytest
import torch

from refusal_helpers.organism.formation import causal_tests, first_step, timeline, untuned_direction
from refusal_helpers.testing import tiny_chat_model


def test_first_step_is_where_a_series_first_reaches_its_threshold():
    assert first_step([0, 10, 20, 30], [0.0, 0.4, 0.9, 0.95], 0.9) == 20
    assert first_step([0, 10], [0.1, 0.2], 0.5) is None


def trajectory_record():
    steps = [0, 5, 10]
    record = {"positions": [-2, -1], "checkpoints": [
        {"step": s, "refusal_rate": {"harmful": r, "harmless": 0.0}} for s, r in zip(steps, (0.0, 0.6, 0.95))],
        "final": {"position": -1, "layer": 1, "cosine": [[0.0, 0.8], [0.0, 0.92], [0.0, 1.0]]}}
    candidates = torch.zeros(3, 2, 2, 4)
    candidates[:, 1, 1, 0] = torch.tensor([1.0, 6.0, 10.0])  # the selected cell's norm grows
    return record, candidates


def test_the_timeline_reads_when_refusal_norm_and_cosine_arrive():
    record, candidates = trajectory_record()
    t = timeline(record, candidates)
    assert t["steps"] == [0, 5, 10] and t["norm"] == pytest.approx([1.0, 6.0, 10.0])
    assert (t["refusal_half"], t["refusal_90"]) == (5, 10)
    assert (t["norm_half"], t["norm_90"]) == (5, 10) and (t["cosine_90"], t["cosine_95"]) == (5, 10)


def test_the_untuned_direction_is_step_zeros_cell_with_the_runs_dims_zeroed():
    record, candidates = trajectory_record()
    candidates[0, 1, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert untuned_direction(record, candidates, -1, 1, [2]).tolist() == [1.0, 2.0, 0.0, 4.0]
    record["checkpoints"][0]["step"] = 3
    with pytest.raises(ValueError, match="step 0"):
        untuned_direction(record, candidates, -1, 1, [])


def test_causal_tests_swap_directions_between_models_at_the_final_norm(monkeypatch):
    import refusal_helpers.organism.formation as formation

    seen = []
    monkeypatch.setattr(formation, "add", lambda cm, vector, layer: seen.append((cm, float(vector.norm()), layer))
                        or __import__("contextlib").nullcontext())
    tuned, untuned = tiny_chat_model("llama", n_layers=2), tiny_chat_model("llama", n_layers=2, seed=1)
    final, early = 3 * torch.ones(tuned.d_model), torch.randn(tuned.d_model)
    result = causal_tests(tuned, untuned, final, early, layer=1, n_prompts=2, max_new_tokens=2)
    assert result["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(final, early, dim=0)))
    norms = {round(norm, 4) for _, norm, _ in seen}
    assert norms == {round(float(final.norm()), 4)}  # the untuned direction is added at the final norm
    assert [cm is tuned for cm, _, _ in seen] == [False, False, True, True]
    assert set(result["tuned"]) >= {"harmless_final_added", "harmless_untuned_added", "harmful_untuned_ablated"}
    assert all(v["n"] == 2 for side in ("tuned", "untuned") for v in result[side].values())
