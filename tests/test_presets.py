"""The embedded model's preset: the sink's dimensions and the KL threshold, each derived by a stated rule."""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import refusal_helpers.presets as presets
import refusal_helpers.sweep as sweep
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


def _derive(monkeypatch, refused_by_layer: dict[int, int], ce_by_layer: dict[int, float], **kwargs) -> dict:
    """`derive_kl_threshold` on a one-position table whose layer l has bypass -(l + 1) and KL 0.045 + 0.1 l, with
    each layer's ablation leaving `refused_by_layer[l]` of 20 harmful prompts refused and raising the CE of the
    harmless completions by `ce_by_layer[l]`; refusals it generates are logged in `generated`."""
    cm = tiny_chat_model("llama", n_layers=10)
    bypass = -torch.arange(1.0, 11.0)[None]
    kl = torch.tensor([[0.045 + 0.1 * layer for layer in range(10)]])
    table = ScoreTable([-1], bypass, torch.ones(1, 10), kl)
    candidates = torch.randn(1, 10, cm.d_model)
    ablated = []

    @contextmanager
    def ablate(cm_, r, spare_first_token=False):
        ablated.append(next(layer for layer in range(10) if torch.equal(candidates[0, layer], r)))
        yield
        ablated.pop()

    def loss(cm_, instructions, completions, progress=False):
        assert completions == ["fine"] * 4
        return 1.0 + (ce_by_layer[ablated[-1]] if ablated else 0.0)

    def judged(cm_, prompts, max_new_tokens, batch_size, progress=False):
        generated.append(ablated[-1])
        return [{"refusal": i < refused_by_layer[ablated[-1]]} for i in range(len(prompts))]

    generated: list[int] = []
    monkeypatch.setattr(sweep, "ablate", ablate)  # each candidate's cost is measured by sweep.ablation_cost
    monkeypatch.setattr(sweep, "completion_loss", loss)
    monkeypatch.setattr(sweep, "judged_completions", judged)
    monkeypatch.setattr(presets, "completion_loss", loss)  # the baseline
    harmless = [{"instruction": "hi", "completion": "fine"}] * 4
    result = presets.derive_kl_threshold(cm, table, candidates, ["x"] * 20, harmless, **kwargs)
    return {**result, "generated": generated}


def test_the_kl_threshold_is_the_smallest_whose_choice_leaves_few_refused(monkeypatch):
    result = _derive(monkeypatch, {0: 8, 1: 6, 2: 3, 3: 0}, dict.fromkeys(range(10), 0.05), max_refused=0.2)
    assert result["kl_threshold"] == 0.25  # layer 2 (KL 0.245) leaves 3/20 <= 20%; layers 0 and 1 leave more
    trail = result["trail"]  # one entry per change of choice, at the smallest threshold making it
    assert [t["kl_threshold"] for t in trail] == [0.01, 0.05, 0.15, 0.25] and trail[0]["chosen"] is None
    assert [t["chosen"]["layer"] for t in trail[1:]] == [0, 1, 2]
    assert [t["refused"] for t in trail[1:]] == [8, 6, 3]
    assert result["baseline_ce"] == 1.0 and trail[1]["ce_increase"] == pytest.approx(0.05)


def test_a_choice_that_costs_too_much_ce_is_passed_over_without_generating(monkeypatch):
    ce = {0: 0.05, 1: 0.3, 2: 0.15, 3: 0.08, 4: 0.0}
    result = _derive(monkeypatch, {0: 8, 1: 0, 2: 0, 3: 1}, ce, max_refused=0.1, max_ce_increase=0.1)
    assert result["kl_threshold"] == 0.35  # layers 1 and 2 leave none refused but cost more CE than 0.1
    assert result["generated"] == [0, 3]
    assert [t["refused"] for t in result["trail"][1:]] == [8, None, None, 1]
    assert [round(t["ce_increase"], 6) for t in result["trail"][1:]] == [0.05, 0.3, 0.15, 0.08]


def test_no_threshold_meeting_both_bounds_is_an_error_that_shows_the_trail(monkeypatch):
    with pytest.raises(presets.NoThreshold, match="No KL threshold up to 0.3 .* CE by at most 0.1") as error:
        _derive(monkeypatch, dict.fromkeys(range(10), 0), dict.fromkeys(range(10), 0.2), max_threshold=0.3)
    trail = error.value.trail  # what each choice cost, for the record a failed derivation writes
    assert [t["chosen"]["layer"] for t in trail[1:]] == [0, 1, 2]
    assert [round(t["ce_increase"], 6) for t in trail[1:]] == [0.2] * 3 and error.value.baseline_ce == 1.0


def test_a_failed_derivation_is_never_stored_as_a_preset(tmp_path):
    derived = {"model_version": "abc123", "settings": None, "derived": {"failure": "No KL threshold up to 3.0"}}
    with pytest.raises(ValueError, match="No preset to store for adapter abc123: No KL threshold"):
        presets.save_preset(derived, tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_preset_is_derived_for_the_embedded_model_only():
    with pytest.raises(ValueError, match="embedded model .* not 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        presets.derive_preset(model="HuggingFaceTB/SmolLM2-135M-Instruct")


def test_each_adapter_derives_its_preset_in_its_own_run_folder(tmp_path):
    trial = tmp_path / "gaps-once"
    trial.mkdir()
    (trial / "adapter_model.safetensors").write_bytes(b"")
    assert presets.preset_folder() == Path("runs/preset")
    assert presets.preset_folder(plain=True) == Path("runs/preset-plain")
    assert presets.preset_folder(f"embedded:{trial}") == Path("runs/preset-gaps-once")
    assert presets.preset_folder(f"embedded:{trial}/", plain=True) == Path("runs/preset-gaps-once-plain")


def test_a_saved_preset_is_keyed_by_the_adapters_digest(tmp_path):
    from refusal_helpers import embedded

    derived = {"model_version": "abc123", "settings": {"kl_threshold": 0.4, "zero_dims": [5]}, "derived": {"rule": "x"}}
    presets.save_preset(derived, tmp_path)
    presets.save_preset({**derived, "model_version": "def456"}, tmp_path)
    stored = json.loads((tmp_path / embedded.PRESETS_FILE).read_text())
    assert set(stored) == {"abc123", "def456"} and stored["abc123"]["settings"] == derived["settings"]


def test_without_a_ce_bound_every_choice_is_generated_until_one_leaves_few_refused(monkeypatch):
    ce = {0: 0.05, 1: 0.3, 2: 0.15, 3: 0.08}
    result = _derive(monkeypatch, {0: 8, 1: 0, 2: 0, 3: 1}, ce, max_refused=0.1, max_ce_increase=None)
    assert result["kl_threshold"] == 0.15 and result["generated"] == [0, 1]  # layer 1: none refused, CE ignored
    assert result["trail"][-1]["ce_increase"] == pytest.approx(0.3)
