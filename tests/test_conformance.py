"""The library's selection against the paper's own definitions (`refusal_helpers.reference`), on tiny models."""

import pytest
import torch

from refusal_helpers.activations import mean_activations
from refusal_helpers.data import load_instructions
from refusal_helpers.directions import diff_of_means
from refusal_helpers.reference import paper_choice, paper_kl, paper_refusal_score, paper_scores
from refusal_helpers.selection import SelectionConfig, allowed_layers, choose, layer_mask, score_candidates
from refusal_helpers.testing import tiny_chat_model

# depth -> the first layer the paper's code prunes, int(0.8 * n_layers); the bound `layer < 0.8 * n_layers` would
# keep that layer too wherever 0.8 * n_layers is not a whole number (every depth here but 30)
PAPER_FIRST_PRUNED = {18: 14, 24: 19, 26: 20, 28: 22, 30: 24, 32: 25, 36: 28, 42: 33, 48: 38}


@pytest.mark.parametrize("n_layers, first_pruned", PAPER_FIRST_PRUNED.items())
def test_layer_pruning_is_the_papers_int_rule(n_layers, first_pruned):
    assert allowed_layers(n_layers, 0.8) == first_pruned == int(n_layers * (1.0 - 0.2))
    mask = layer_mask(1, n_layers, 0.8)[0]
    assert mask[: first_pruned].all() and not mask[first_pruned:].any()
    if n_layers != 30:  # where the float bound 0.8 * n_layers is not a whole number, it would keep one more layer
        assert first_pruned < 0.8 * n_layers


def test_the_papers_formulas_agree_with_the_librarys_metrics_away_from_their_epsilons():
    from refusal_helpers.metrics import kl_divergence, refusal_score

    torch.manual_seed(0)
    logits, other = torch.randn(5, 50), torch.randn(5, 50)  # every probability far above the epsilons
    torch.testing.assert_close(paper_refusal_score(logits, [1, 2]).float(), refusal_score(logits, [1, 2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paper_kl(logits, other).float(), kl_divergence(logits, other), atol=1e-4, rtol=1e-3)
    # where Q puts less than the epsilon on a token P favours, the paper's KL is capped; the library's is not
    favoured, starved = torch.zeros(1, 50), torch.zeros(1, 50)
    favoured[0, 0], starved[0, 0] = 30.0, -30.0  # P puts almost all its mass on token 0, Q about 1e-15
    exact, capped = float(kl_divergence(favoured, starved)), float(paper_kl(favoured, starved))
    assert capped == pytest.approx(-torch.log(torch.tensor(1e-6)).item(), abs=0.1)  # -log(0 + 1e-6)
    assert exact > capped + 15  # about 34 nats against the capped 14


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setting(request):
    cm = tiny_chat_model(request.param, n_layers=4, seed=3)
    harmful, harmless = load_instructions("harmful", "train", 8), load_instructions("harmless", "train", 8)
    candidates = diff_of_means(mean_activations(cm, harmful), mean_activations(cm, harmless)).float()
    candidates = 40 * candidates / candidates.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # large enough to matter
    val = load_instructions("harmful", "val", 5), load_instructions("harmless", "val", 5)
    table = score_candidates(cm, candidates, *val, SelectionConfig(), mode="exhaustive", batch_size=4, progress=False)
    nonzero = [(p, l) for p in range(candidates.shape[0]) for l in range(4) if candidates[p, l].norm() > 0]
    return cm, candidates, table, paper_scores(cm, candidates, *val, nonzero)


def test_every_score_is_the_papers(setting):
    _, _, table, paper = setting
    for (p, layer), s in paper.items():
        assert float(table.bypass[p, layer]) == pytest.approx(s["bypass"], abs=2e-4, rel=1e-4), (p, layer)
        assert float(table.induce[p, layer]) == pytest.approx(s["induce"], abs=2e-4, rel=1e-4), (p, layer)
        assert float(table.kl[p, layer]) == pytest.approx(s["kl"], abs=2e-4, rel=1e-3), (p, layer)
    assert len(paper) > 10 and len({round(s["bypass"], 3) for s in paper.values()}) > 5  # scores that differ


def test_the_pick_is_the_papers_at_every_threshold(setting):
    cm, _, table, paper = setting
    kls = sorted({round(s["kl"], 4) for s in paper.values()})
    inductions = sorted({round(s["induce"], 4) for s in paper.values()})
    picks = set()
    for kl_threshold in kls[::2] + [1e9]:
        for induce_threshold in (inductions[0] - 1, inductions[len(inductions) // 2]):
            config = SelectionConfig(kl_threshold=kl_threshold, induce_threshold=induce_threshold)
            try:
                expected = paper_choice(paper, cm.n_layers, kl_threshold, induce_threshold)
            except ValueError:
                with pytest.raises(ValueError, match="No candidate"):
                    choose(table, config)
                continue
            chosen = choose(table, config)
            assert (chosen.position_index, chosen.layer) == expected, (kl_threshold, induce_threshold)
            picks.add(expected)
    assert len(picks) >= 2  # the thresholds really changed the choice
