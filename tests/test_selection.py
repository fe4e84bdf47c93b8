import pytest
import torch

from refusal_helpers.activations import mean_activations
from refusal_helpers.directions import diff_of_means
from refusal_helpers.evaluation import last_logits, refusal_scores
from refusal_helpers.interventions import ablate, active_hook_count, add
from refusal_helpers.metrics import kl_divergence
from refusal_helpers.selection import (
    ScoreTable,
    SelectionConfig,
    candidate_order,
    choose,
    passing_mask,
    score_candidates,
    select_direction,
)
from tests.conftest import HARMFUL, HARMLESS

NAN = float("nan")


def crafted_table():
    # 2 positions x 5 layers; with max_layer_fraction 0.8, layer 4 is excluded.
    bypass = torch.tensor([[0.0, -3.0, -1.0, -2.0, -9.0], [-4.0, -0.5, -2.5, NAN, -8.0]])
    induce = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [-0.5, 1.0, 2.0, 1.0, 1.0]])
    kl = torch.tensor([[0.0, 0.3, 0.05, 0.02, 0.0], [0.01, 0.01, 0.09, 0.0, 0.0]])
    return ScoreTable([-2, -1], bypass, induce, kl, 2.0, -3.0)


def test_choose_applies_every_filter():
    table = crafted_table()
    config = SelectionConfig(max_layer_fraction=0.8, kl_threshold=0.1, induce_threshold=0.0)
    # layer 4 (-9, -8) is too late; (0,1) has KL 0.3; (1,0) has induce -0.5; best remaining: (1,2) = -2.5
    selection = choose(table, config)
    assert (selection.position_index, selection.layer, selection.position) == (1, 2, -1)
    assert selection.bypass == -2.5
    mask = passing_mask(table, config)
    assert mask.sum() == 5 and not mask[:, 4].any() and not mask[0, 1] and not mask[1, 0] and not mask[1, 3]


def test_choose_thresholds_are_parameters():
    table = crafted_table()
    assert choose(table, SelectionConfig(kl_threshold=1.0)).layer == 1  # (0,1) now passes with -3
    assert choose(table, SelectionConfig(induce_threshold=-1.0)).position_index == 1  # (1,0) = -4
    assert choose(table, SelectionConfig(max_layer_fraction=1.0)).bypass == -9.0
    with pytest.raises(ValueError, match="No candidate") as info:
        choose(table, SelectionConfig(induce_threshold=5.0))
    assert "Highest induce among allowed layers: 2.000; lowest KL among allowed layers: 0.000" in str(info.value)


def test_no_passing_candidate_in_a_lazy_table_says_why_kl_is_missing():
    table = crafted_table()
    table.kl[:] = NAN  # lazy scoring computes KL only where the induce filter passed
    with pytest.raises(ValueError, match="KL was not computed") as info:
        choose(table, SelectionConfig(induce_threshold=5.0))
    assert "--induce-threshold" in str(info.value) and "--selection-mode exhaustive" in str(info.value)


def test_score_table_round_trips_through_dict():
    table = crafted_table()
    again = ScoreTable.from_dict(table.to_dict())
    torch.testing.assert_close(again.bypass, table.bypass, equal_nan=True)
    assert again.positions == table.positions


@pytest.fixture(scope="module")
def candidates(llama):
    return diff_of_means(mean_activations(llama, HARMFUL), mean_activations(llama, HARMLESS)).float()


def test_scores_equal_straightforward_computation(llama, candidates):
    table = score_candidates(llama, candidates, HARMFUL, HARMLESS, mode="exhaustive", batch_size=3, progress=False)
    base = last_logits(llama, HARMLESS)
    for p, l in [(0, 1), (len(table.positions) - 1, 3), (2, 2)]:
        r = candidates[p, l]
        with ablate(llama, r):
            bypass = refusal_scores(llama, HARMFUL).mean()
            kl = kl_divergence(base, last_logits(llama, HARMLESS)).mean()
        with add(llama, r, layer=l):
            induce = refusal_scores(llama, HARMLESS).mean()
        assert abs(table.bypass[p, l] - bypass) < 1e-3
        assert abs(table.kl[p, l] - kl) < 1e-4
        assert abs(table.induce[p, l] - induce) < 1e-3
    assert torch.isnan(table.bypass[:, 0]).all()  # layer 0: zero directions at template positions
    assert active_hook_count(llama) == 0


def test_lazy_and_exhaustive_choose_the_same(llama, candidates):
    config = SelectionConfig(kl_threshold=10.0, induce_threshold=-100.0)
    lazy_sel, direction, lazy = select_direction(llama, candidates, HARMFUL, HARMLESS, config, mode="lazy", progress=False)
    full_sel, _, full = select_direction(llama, candidates, HARMFUL, HARMLESS, config, mode="exhaustive", progress=False)
    assert (lazy_sel.position_index, lazy_sel.layer) == (full_sel.position_index, full_sel.layer)
    torch.testing.assert_close(direction, candidates[lazy_sel.position_index, lazy_sel.layer])
    assert torch.isnan(lazy.kl).sum() > torch.isnan(full.kl).sum()  # lazy computed less


@pytest.fixture(scope="module")
def full_table(llama, candidates):
    return score_candidates(llama, candidates, HARMFUL, HARMLESS, mode="exhaustive", progress=False)


def _midpoint_below(values, v):
    """A threshold between v and the largest of `values` below it."""
    below = [x for x in values if x < v]
    assert below, "the table has no value below the first candidate's"
    return (v + max(below)) / 2


@pytest.mark.parametrize("filtered_by", ["kl", "induce"])
def test_lazy_skips_candidates_that_fail_a_filter(llama, candidates, full_table, filtered_by):
    """Thresholds from the full table reject the lowest-bypass candidate: lazy must go on to the one choose() picks."""
    in_layers = passing_mask(full_table, SelectionConfig(kl_threshold=float("inf"), induce_threshold=-float("inf")))
    order = [c for c in candidate_order(full_table.bypass) if in_layers[c]]
    first = order[0]
    if filtered_by == "kl":  # reject every candidate with a KL at least the first one's
        kls = [float(full_table.kl[c]) for c in order]
        config = SelectionConfig(kl_threshold=_midpoint_below(kls, kls[0]), induce_threshold=-float("inf"))
    else:  # reject every candidate with an induce score at most the first one's
        negated = [-float(full_table.induce[c]) for c in order]
        config = SelectionConfig(kl_threshold=float("inf"), induce_threshold=-_midpoint_below(negated, negated[0]))
    expected = choose(full_table, config)
    chosen = (expected.position_index, expected.layer)
    assert chosen != first
    selection, _, lazy = select_direction(llama, candidates, HARMFUL, HARMLESS, config, mode="lazy", progress=False)
    assert (selection.position_index, selection.layer) == chosen
    # lazy measured the first candidate, rejected it, and stopped at the chosen one
    assert not torch.isnan(lazy.induce[first])
    checked = [c for c in order if not torch.isnan(lazy.induce[c])]
    assert checked == order[: order.index(chosen) + 1]
    for c in checked:
        assert abs(lazy.induce[c] - full_table.induce[c]) < 1e-4
        if not torch.isnan(lazy.kl[c]):
            assert abs(lazy.kl[c] - full_table.kl[c]) < 1e-6


def test_bad_candidates_are_clear_errors(llama, candidates):
    with pytest.raises(ValueError, match="shape"):
        score_candidates(llama, candidates[:, :2], HARMFUL, HARMLESS, progress=False)
    bad = candidates.clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        score_candidates(llama, bad, HARMFUL, HARMLESS, progress=False)
    with pytest.raises(ValueError, match="non-empty"):
        score_candidates(llama, candidates, [], HARMLESS, progress=False)
