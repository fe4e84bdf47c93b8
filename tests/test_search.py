"""The ablation-parameter search: its space, reversible weight edits, Optuna's trials and the comparison."""

import copy

import pytest
import torch

from refusal_helpers.evaluation import last_logits
from refusal_helpers.interventions import ablate
from refusal_helpers.orthogonalize import orthogonalize_weights
from refusal_helpers.search import (
    Ablation,
    WeightEdits,
    best_at_most,
    compare_on_test,
    interpolated_direction,
    paper_ablation,
    plot_pareto,
    search,
)
from refusal_helpers.testing import run_tiny, tiny_chat_model
from tests.conftest import HARMFUL, HARMLESS


def test_the_kernel_is_a_triangle_above_its_floor():
    weights = Ablation(peak=1.2, position=2.0, width=2.0, floor=0.25, direction_layer=0).weights(6)
    assert weights == pytest.approx([0.3, 0.6, 1.2, 0.6, 0.3, 0.3])
    assert paper_ablation(3, 6).weights(6) == [1.0] * 6


def test_interpolation_runs_between_adjacent_layers_candidates():
    at_position = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, -3.0]])
    assert torch.allclose(interpolated_direction(at_position, 0.0), torch.tensor([1.0, 0.0], dtype=torch.float64))
    halfway = interpolated_direction(at_position, 0.5)
    assert torch.allclose(halfway, torch.tensor([1.0, 1.0], dtype=torch.float64) / 2 ** 0.5)
    assert torch.allclose(interpolated_direction(at_position, 2.0), torch.tensor([0.0, -1.0], dtype=torch.float64))


def test_weight_edits_fold_the_paper_ablation_and_are_undone_exactly():
    cm = tiny_chat_model("llama", n_layers=3)
    before = last_logits(cm, HARMLESS)
    state = {k: v.clone() for k, v in cm.model.state_dict().items()}
    direction = torch.randn(cm.d_model)
    edits = WeightEdits(cm)
    with edits.applied(direction, [1.0] * cm.n_layers):
        folded = last_logits(cm, HARMLESS)
    expected = last_logits(orthogonalize_weights(copy.deepcopy(cm), direction), HARMLESS)
    with ablate(cm, direction):
        hooked = last_logits(cm, HARMLESS)
    torch.testing.assert_close(folded, expected)
    torch.testing.assert_close(folded, hooked, atol=1e-4, rtol=1e-4)  # weight 1 everywhere: the paper's ablation
    assert all(torch.equal(v, state[k]) for k, v in cm.model.state_dict().items() if k in state)  # restored exactly
    torch.testing.assert_close(last_logits(cm, HARMLESS), before)
    with edits.applied(direction, [0.0] * cm.n_layers):
        torch.testing.assert_close(last_logits(cm, HARMLESS), before)  # weight 0: no edit
    with edits.applied(direction, [0.5] * cm.n_layers):
        half = last_logits(cm, HARMLESS)
    assert not torch.allclose(half, before) and not torch.allclose(half, folded)


def test_the_search_starts_at_the_papers_point_and_keeps_a_pareto_front(tmp_path):
    cm = tiny_chat_model("llama", n_layers=3)
    at_position = torch.randn(3, cm.d_model)
    result = search(cm, at_position, HARMFUL, HARMLESS, n_trials=5, timeout=None, max_new_tokens=2, paper_layer=1,
                    progress=False)
    assert result["n_trials"] == 5 and len(result["trials"]) == 5
    first = result["trials"][0]
    assert Ablation(**first["params"]) == paper_ablation(1, 3)  # the paper's direction, measured the same way
    base = last_logits(cm, HARMLESS)
    with WeightEdits(cm).applied(interpolated_direction(at_position, 1.0), [1.0] * 3):
        from refusal_helpers.metrics import kl_divergence

        assert first["kl"] == pytest.approx(float(kl_divergence(base, last_logits(cm, HARMLESS)).mean()), abs=1e-5)
    assert set(result["pareto"]) <= {t["number"] for t in result["trials"]} and result["pareto"]
    for t in result["trials"]:  # nothing on the front is dominated
        if t["number"] in result["pareto"]:
            assert not any(o["refused"] <= t["refused"] and o["kl"] < t["kl"] or o["refused"] < t["refused"] and o["kl"] <= t["kl"]
                           for o in result["trials"])
    best = best_at_most(result, first["kl"])
    assert best["kl"] <= first["kl"] and best["refused"] <= first["refused"]
    with pytest.raises(ValueError, match="No trial"):
        best_at_most(result, -1.0)
    side_by_side = compare_on_test(cm, at_position, best, 1, HARMFUL, HARMLESS, max_new_tokens=2)
    assert set(side_by_side) == {"paper", "search"} and side_by_side["paper"]["n"] == len(HARMFUL)
    fig = plot_pareto(result)
    assert [trace.name for trace in fig.data] == ["trials", "Pareto front", "the paper's direction"]


def test_the_search_command_compares_on_the_runs_test_prompts(tiny_folder, tmp_path, capsys):
    from refusal_helpers.__main__ import main

    run = tmp_path / "run"
    assert run_tiny(tiny_folder, run, "--random-controls", "0") == 0
    capsys.readouterr()
    assert main(["search", "--run", str(run), "--out", str(tmp_path / "search"), "--trials", "4", "--n-val", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("4 trials in") and "the run's direction:" in printed
    result = __import__("json").loads((tmp_path / "search" / "search.json").read_text())
    assert result["chosen"]["kl"] <= result["trials"][0]["kl"] and (tmp_path / "search" / "pareto.html").is_file()
    from refusal_helpers.runs import RunFolder

    assert result["model_version"] == RunFolder(run).identity()["model_version"] is not None  # the weights searched
