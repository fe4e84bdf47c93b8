import pytest
import torch

from refusal_helpers.activations import collect_activations, mean_activations
from tests.conftest import HARMFUL, HARMLESS


def brute_force_means(cm, instructions):
    """One prompt at a time, full hidden states, no hooks: the reference."""
    n = len(cm.post_instruction_ids)
    total = 0
    for instruction in instructions:
        inputs = cm.tokenize([instruction])
        out = cm.model(**inputs, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states[: cm.n_layers], dim=1)[0]  # (layer, seq, d): block inputs
        total = total + hidden[:, -n:, :].transpose(0, 1).double()
    return total / len(instructions)


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_mean_activations_equal_brute_force(llama, batch_size):
    prompts = HARMFUL + HARMLESS
    means = mean_activations(llama, prompts, batch_size=batch_size)
    assert means.dtype == torch.float64
    assert means.shape == (len(llama.post_instruction_ids), llama.n_layers, llama.d_model)
    torch.testing.assert_close(means, brute_force_means(llama, prompts), atol=1e-4, rtol=1e-4)


def test_mean_activations_subset_of_positions_and_layers(llama):
    full = mean_activations(llama, HARMFUL)
    part = mean_activations(llama, HARMFUL, positions=[-1], layers=[0, 2])
    torch.testing.assert_close(part, full[-1:, [0, 2]])


def test_collect_activations_average_to_the_mean(llama):
    acts = collect_activations(llama, HARMLESS, batch_size=2)
    assert acts.shape[0] == len(HARMLESS)
    torch.testing.assert_close(acts.double().mean(0), mean_activations(llama, HARMLESS), atol=1e-5, rtol=1e-5)


def test_empty_dataset_is_a_clear_error(llama):
    with pytest.raises(ValueError, match="non-empty"):
        mean_activations(llama, [])
