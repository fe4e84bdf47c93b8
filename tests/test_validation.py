"""Bad input gets an error that names what was expected, instead of a silently wrong result."""

import pytest
import torch

from refusal_helpers.activations import collect_activations, mean_activations
from refusal_helpers.batching import batches
from refusal_helpers.devices import resolve_device_dtype
from refusal_helpers.evaluation import last_logits, refusal_scores
from refusal_helpers.interventions import ablate, add
from refusal_helpers.metrics import refusal_rate
from refusal_helpers.selection import SelectionConfig
from refusal_helpers.testing import tiny_chat_model


@pytest.fixture(scope="module")
def cm():
    return tiny_chat_model("llama", n_layers=2)


INSTRUCTION = "Write a haiku about the sea, with a cat in it, and make it rhyme somehow."


@pytest.mark.parametrize("fn", [mean_activations, collect_activations, last_logits, refusal_scores])
def test_one_string_instead_of_a_list_is_an_error(cm, fn):
    # Iterated as a sequence, a string would become one prompt per character (or per slice).
    with pytest.raises(TypeError, match="wrap it in a list"):
        fn(cm, INSTRUCTION)
    with pytest.raises(ValueError, match="non-empty"):
        fn(cm, [])


def test_batches_and_refusal_rate_reject_a_string():
    with pytest.raises(TypeError, match="list"):
        list(batches(INSTRUCTION, 4))
    with pytest.raises(TypeError, match="is_refusal"):
        refusal_rate("I'm sorry, I can't help with that.")


def test_interventions_take_one_vector_or_one_per_sequence(cm):
    candidates = torch.randn(3, cm.n_layers, cm.d_model)  # (pos, layer, d_model): a common slip
    for context in (lambda v: ablate(cm, v), lambda v: add(cm, v, 0)):
        for wrong in (candidates, candidates[0]):
            with pytest.raises(ValueError, match=r"candidates\[pos, layer\]"):
                with context(wrong):
                    pass
    per_sequence = torch.randn(2, 1, cm.d_model)
    per_sequence[1] = 0
    with pytest.raises(ValueError, match="zero norm"):
        with ablate(cm, per_sequence):
            pass
    with ablate(cm, torch.randn(2, 1, cm.d_model)):  # the supported batched form still works
        pass


def test_template_positions_need_prompts_that_end_with_the_template():
    cm = tiny_chat_model("llama", n_layers=2)  # its own copy: the template ids are overridden below
    cm.__dict__["post_instruction_ids"] = [cm.post_instruction_ids[0]] * len(cm.post_instruction_ids)
    with pytest.raises(ValueError, match="does not end with the post-instruction template tokens"):
        mean_activations(cm, ["Hello there."])
    # explicit positions are the caller's choice
    assert mean_activations(cm, ["Hello there."], positions=[-1]).shape == (1, 2, cm.d_model)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_layer_fraction": 80}, r"fraction of the depth in \(0, 1\]"),
    ({"max_layer_fraction": 0}, r"fraction of the depth in \(0, 1\]"),
    ({"kl_threshold": -0.1}, "must be >= 0"),
    ({"kl_threshold": float("nan")}, "must be >= 0"),
    ({"induce_threshold": float("nan")}, "NaN"),
])
def test_selection_config_rejects_thresholds_nothing_could_mean(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectionConfig(**kwargs)


def test_mps_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="float64"):
        resolve_device_dtype("mps", None)


def test_unknown_or_unavailable_devices_are_refused_before_loading(monkeypatch):
    import torch

    with pytest.raises(ValueError, match="Unknown device 'gpu'"):
        resolve_device_dtype("gpu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        resolve_device_dtype("cuda:1", None)


def test_a_one_row_direction_is_taken_as_a_vector(cm):
    r = torch.randn(cm.d_model)
    inputs = cm.tokenize(["Hello there.", "x"])
    with ablate(cm, r):
        expected = cm.forward(inputs)
    with ablate(cm, r[None]):
        torch.testing.assert_close(cm.forward(inputs), expected)


def test_template_mismatch_names_the_instruction():
    cm = tiny_chat_model("llama", n_layers=2)
    cm.__dict__["post_instruction_ids"] = [cm.post_instruction_ids[0]] * len(cm.post_instruction_ids)
    with pytest.raises(ValueError, match="'Second one.'"):
        mean_activations(cm, ["Second one."])


def test_tiny_fixtures_name_what_they_support():
    from refusal_helpers.testing import tiny_tokenizer

    with pytest.raises(ValueError, match="expected one of"):
        tiny_tokenizer("mistral")
    with pytest.raises(ValueError, match="Unknown test architecture"):
        tiny_chat_model("bert")
