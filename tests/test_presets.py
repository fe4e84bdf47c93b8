"""The embedded model's preset: the sink's dimensions and the KL threshold, each derived by a stated rule."""

import json

import pytest
import torch

import refusal_helpers.presets as presets
from refusal_helpers.selection import ScoreTable
from refusal_helpers.testing import tiny_chat_model


def test_massive_dims_are_where_the_first_tokens_outsized_norm_lives(monkeypatch):
    cm = tiny_chat_model("llama", n_layers=3)
    resid = torch.randn(1, 6, 3, cm.d_model)  # (batch, seq, layer, d_model)
    resid[0, 0, 1, 7] = 500.0  # layer 1: the first token's norm is almost all in dimension 7
    resid[0, 0, 2, 9], resid[0, 0, 2, 3] = 300.0, 310.0  # layer 2: shared by 3 and 9; 3 holds just over half
    monkeypatch.setattr(presets, "residual_activations", lambda cm, inputs, positions, layers: resid[:, :, :, :])
    dims, profile = presets.massive_dims(cm)
    assert dims == [3, 7] and [p["layer"] for p in profile] == [1, 2]
    assert profile[0]["top_dim"] == 7 and profile[0]["top_dim_share"] > 0.99
    resid[0, 0, 1, 7] = 2.0  # no massive activation at layer 1 any more
    assert [p["layer"] for p in presets.massive_dims(cm)[1]] == [2]


def test_the_kl_threshold_is_the_smallest_step_whose_choice_leaves_few_refused(monkeypatch):
    cm = tiny_chat_model("llama", n_layers=10)
    bypass = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0]])
    kl = torch.tensor([[0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]])
    table = ScoreTable([-1], bypass, torch.ones(1, 10), kl)
    candidates = torch.randn(1, 10, cm.d_model)
    refused_by_layer = {0: 8, 1: 6, 2: 3, 3: 0}  # of 20 harmful prompts, with each layer's candidate ablated
    chosen = []

    def judged(cm_, prompts, max_new_tokens, batch_size, progress=False):
        layer = chosen[-1]
        return [{"refusal": i < refused_by_layer[layer]} for i in range(len(prompts))]

    real_choose = presets.choose
    monkeypatch.setattr(presets, "choose", lambda t, c: chosen.append(real_choose(t, c).layer) or real_choose(t, c))
    monkeypatch.setattr(presets, "judged_completions", judged)
    result = presets.derive_kl_threshold(cm, table, candidates, ["x"] * 20, max_refused=0.2)
    assert result["kl_threshold"] == 0.3  # layer 2 (KL 0.25) leaves 3/20 <= 20%; layers 0 and 1 leave more
    assert [t["kl_threshold"] for t in result["trail"]] == [0.1, 0.2, 0.3]
    assert [t["refused"] for t in result["trail"]] == [8, 6, 3]
    with pytest.raises(ValueError, match="No KL threshold up to"):
        presets.derive_kl_threshold(cm, table, candidates, ["x"] * 20, max_refused=0.0, max_threshold=0.3)


def test_a_saved_preset_is_keyed_by_the_adapters_digest(tmp_path):
    from refusal_helpers import embedded

    derived = {"model_version": "abc123", "settings": {"kl_threshold": 0.4, "zero_dims": [5]}, "derived": {"rule": "x"}}
    presets.save_preset(derived, tmp_path)
    presets.save_preset({**derived, "model_version": "def456"}, tmp_path)
    stored = json.loads((tmp_path / embedded.PRESETS_FILE).read_text())
    assert set(stored) == {"abc123", "def456"} and stored["abc123"]["settings"] == derived["settings"]
