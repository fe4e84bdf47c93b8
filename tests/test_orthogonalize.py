import copy

import pytest
import torch

from refusal_helpers.interventions import ablate
from refusal_helpers.loading import load_model
from refusal_helpers.orthogonalize import NotFoldableError, orthogonalize_weights
from refusal_helpers.testing import tiny_chat_model
from tests.conftest import HARMFUL, HARMLESS

FOLDABLE = [("llama", False), ("llama", True), ("mistral", False), ("qwen2", False), ("qwen3", False),
            ("gemma", True), ("phi3", False), ("gpt2", True)]


@pytest.mark.parametrize("arch, tie", FOLDABLE)
def test_orthogonalized_weights_equal_hook_ablation(arch, tie):
    cm = tiny_chat_model(arch, n_layers=3, tie=tie)
    r = torch.randn(cm.d_model)
    inputs = cm.tokenize(HARMFUL + HARMLESS)
    plain = cm.forward(inputs, logits_to_keep=0)
    with ablate(cm, r):
        hooked = cm.forward(inputs, logits_to_keep=0)
    edited = copy.deepcopy(cm)
    orthogonalize_weights(edited, r)
    folded = edited.forward(inputs, logits_to_keep=0)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(folded[mask], hooked[mask], atol=1e-4, rtol=1e-4)
    assert (plain[mask] - hooked[mask]).abs().max() > 1e-3  # the ablation did something
    if tie:  # the unembedding kept the original weights
        torch.testing.assert_close(edited.unembed.weight, cm.unembed.weight)
        assert edited.unembed.weight.data_ptr() != edited.embed.weight.data_ptr()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_post_norm_models_refuse_to_fold(arch):
    cm = tiny_chat_model(arch, n_layers=2)
    with pytest.raises(NotFoldableError, match="post-norms"):
        orthogonalize_weights(cm, torch.randn(cm.d_model))


def test_saved_orthogonalized_model_reloads(tmp_path):
    cm = tiny_chat_model("llama", n_layers=2, tie=True)
    r = torch.randn(cm.d_model)
    inputs = cm.tokenize(HARMFUL)
    with ablate(cm, r):
        hooked = cm.forward(inputs)
    orthogonalize_weights(cm, r)
    cm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    torch.testing.assert_close(reloaded.forward(inputs), hooked, atol=1e-4, rtol=1e-4)
