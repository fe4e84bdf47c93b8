"""The TransformerLens and nnsight backends, checked against the main (plain HF hooks) path.

One tiny random Llama for the whole module. The main path's results are computed first, before any
backend wraps the model; every backend must then reproduce them: equal mean activations, and greedy
generation equal token for token, plain and with the direction ablated.
"""

import subprocess
import sys
from contextlib import nullcontext

import pytest
import torch

from refusal_helpers.activations import mean_activations
from refusal_helpers.backends import nnsight as nb
from refusal_helpers.backends import transformer_lens as tlb
from refusal_helpers.generation import generate
from refusal_helpers.interventions import ablate, active_hook_count
from refusal_helpers.testing import tiny_chat_model
from tests.conftest import HARMFUL, HARMLESS

PROMPTS = ["How do I make a bomb?", "x", "Write a poem about the sea."]  # unequal lengths: left padding
N_NEW = 8


def main_path_ids(cm, inputs, direction=None, max_new_tokens=N_NEW):
    """New-token ids of the main path: `generate`'s own call, under `ablate` when a direction is given."""
    with ablate(cm, direction) if direction is not None else nullcontext():
        with torch.no_grad():
            output = cm.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=cm.tokenizer.pad_token_id
            )
    return output[:, inputs["input_ids"].shape[1] :]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: a 64-wide model gains nothing from more, and on a busy machine the second
    thread's spin-waiting made these tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cm():
    return tiny_chat_model("llama", n_layers=2)


@pytest.fixture(scope="module")
def direction(cm):
    return torch.randn(cm.d_model, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(cm, direction):
    """Main-path results, computed before any backend touches the model."""
    inputs = cm.tokenize(PROMPTS)
    ref = {
        "mean": mean_activations(cm, HARMFUL + HARMLESS, batch_size=3),
        "plain_ids": main_path_ids(cm, inputs),
        "ablated_ids": main_path_ids(cm, inputs, direction),
        "plain": generate(cm, PROMPTS, max_new_tokens=N_NEW),
    }
    with ablate(cm, direction):
        ref["ablated"] = generate(cm, PROMPTS, max_new_tokens=N_NEW)
    # The test can only catch a missing ablation if the ablation changes the output.
    assert not torch.equal(ref["plain_ids"], ref["ablated_ids"])
    return ref


@pytest.fixture(scope="module")
def bridge(cm, reference):
    return tlb.bridge_from_chat_model(cm)


@pytest.fixture(scope="module")
def nn_model(cm, reference):
    return nb.nnsight_model(cm)


def test_backends_import_their_libraries_lazily():
    code = (
        "import sys, refusal_helpers, refusal_helpers.backends.transformer_lens, refusal_helpers.backends.nnsight\n"
        "assert 'transformer_lens' not in sys.modules and 'nnsight' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", ["transformer_lens", "nnsight"])
def test_backend_mean_activations_match_main_path(cm, reference, backend, request):
    if backend == "transformer_lens":
        means = tlb.mean_activations_tl(request.getfixturevalue("bridge"), cm, HARMFUL + HARMLESS, batch_size=3)
    else:
        means = nb.mean_activations_nnsight(request.getfixturevalue("nn_model"), cm, HARMFUL + HARMLESS, batch_size=3)
    assert means.shape == (len(cm.post_instruction_positions), cm.n_layers, cm.d_model)
    assert means.dtype == torch.float64
    torch.testing.assert_close(means, reference["mean"], atol=1e-4, rtol=0)


def test_nnsight_means_respect_left_padding_with_absolute_positions():
    # GPT-2 adds a learned embedding per position: rows padded on the left must still count from their
    # first real token, as the main path's position ids do, or their activations differ.
    gpt2 = tiny_chat_model("gpt2", n_layers=2)
    instructions = HARMFUL + HARMLESS
    assert len(set(gpt2.tokenize(instructions)["attention_mask"].sum(-1).tolist())) > 1  # really padded
    means = nb.mean_activations_nnsight(nb.nnsight_model(gpt2), gpt2, instructions, batch_size=3)
    torch.testing.assert_close(means, mean_activations(gpt2, instructions, batch_size=3), atol=1e-5, rtol=0)


# ----- TransformerLens ---------------------------------------------------------------------------


def test_tl_generation_matches_main_path_token_for_token(cm, bridge, reference, direction):
    inputs = cm.tokenize(PROMPTS)
    hooks = tlb.ablation_hooks_tl(bridge, direction)
    assert len(hooks) == 3 * cm.n_layers
    assert torch.equal(tlb.generate_tokens_tl(bridge, cm, inputs, N_NEW), reference["plain_ids"])
    assert torch.equal(tlb.generate_tokens_tl(bridge, cm, inputs, N_NEW, hooks), reference["ablated_ids"])
    assert tlb.generate_tl(bridge, cm, PROMPTS, N_NEW) == reference["plain"]
    assert tlb.generate_tl(bridge, cm, PROMPTS, N_NEW, fwd_hooks=hooks, batch_size=2) == reference["ablated"]


def test_tl_generation_without_kv_cache_matches_too(cm, bridge, reference, direction):
    hooks = tlb.ablation_hooks_tl(bridge, direction)
    ids = tlb.generate_tokens_tl(bridge, cm, cm.tokenize(PROMPTS), N_NEW, hooks, use_kv_cache=False)
    assert torch.equal(ids, reference["ablated_ids"])


def test_tl_kv_cache_trap_and_fix(cm, reference):
    """transformers 5.x passes the KV cache as `cache=`; TransformerLens 4.3's attention reads only
    `past_key_values`, so cached generation ignores the prompt after the first token."""
    unfixed = tlb.bridge_from_chat_model(cm, fix_kv_cache=False)
    inputs = cm.tokenize(PROMPTS)

    def bridge_generate():
        with torch.no_grad():
            out = unfixed.generate(
                inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=N_NEW,
                do_sample=False, use_past_kv_cache=True, stop_at_eos=False, return_type="tokens", verbose=False,
            )
        return out[:, inputs["input_ids"].shape[1] :]

    broken = bridge_generate()
    if torch.equal(broken, reference["plain_ids"]):
        pytest.skip("This TransformerLens reads `cache=` itself: the KV-cache trap no longer reproduces.")
    assert not torch.equal(broken[:, 1:], reference["plain_ids"][:, 1:])
    assert tlb.fix_bridge_kv_cache(unfixed) == cm.n_layers
    assert tlb.fix_bridge_kv_cache(unfixed) == 0  # idempotent
    assert torch.equal(bridge_generate(), reference["plain_ids"])


def test_tl_leaves_the_main_path_working(cm, bridge, reference, direction):
    # The bridge wraps a copy whose weights are cm.model's own tensors; cm's modules are untouched.
    assert type(cm.model.model.layers[0]).__name__ == "LlamaDecoderLayer"
    shared = {p.data_ptr() for p in cm.model.parameters()}
    assert {p.data_ptr() for p in bridge.original_model.parameters()} == shared
    assert torch.equal(main_path_ids(cm, cm.tokenize(PROMPTS), direction), reference["ablated_ids"])
    assert active_hook_count(cm) == 0


def test_tl_ablation_hooks_reject_bad_directions(bridge, cm):
    with pytest.raises(ValueError, match="d_model"):
        tlb.ablation_hooks_tl(bridge, torch.ones(cm.d_model + 1))
    with pytest.raises(ValueError, match="zero norm"):
        tlb.ablation_hooks_tl(bridge, torch.zeros(cm.d_model))


# ----- nnsight -----------------------------------------------------------------------------------


def test_nnsight_generation_matches_main_path_token_for_token(cm, nn_model, reference, direction):
    inputs = cm.tokenize(PROMPTS)
    assert torch.equal(nb.generate_tokens_ablated_nnsight(nn_model, cm, inputs, None, N_NEW), reference["plain_ids"])
    assert torch.equal(
        nb.generate_tokens_ablated_nnsight(nn_model, cm, inputs, direction, N_NEW), reference["ablated_ids"]
    )
    assert nb.generate_ablated_nnsight(nn_model, cm, PROMPTS, direction, N_NEW, batch_size=2) == reference["ablated"]
    # nnsight instruments cm.model in place; the main path's hooks still work.
    assert torch.equal(main_path_ids(cm, inputs, direction), reference["ablated_ids"])
    assert active_hook_count(cm) == 0


def staggered_stop_token(ids):
    """A generated token that, made the EOS, ends the rows at different steps (or not at all)."""
    for step in range(1, ids.shape[1] - 1):
        for token in ids[:, step].tolist():
            firsts = {int((row == token).nonzero()[0]) if (row == token).any() else None for row in ids}
            if len(firsts) > 1:
                return token
    pytest.fail("no generated token ends the rows at different steps")


def test_rows_that_stop_early_are_padded_like_the_main_path(cm, bridge, nn_model, reference, direction, monkeypatch):
    monkeypatch.setattr(cm.model.generation_config, "eos_token_id", staggered_stop_token(reference["ablated_ids"]))
    inputs = cm.tokenize(PROMPTS)
    expected = main_path_ids(cm, inputs, direction)
    assert (expected == cm.tokenizer.pad_token_id).any() and not (expected == cm.tokenizer.pad_token_id).all()
    hooks = tlb.ablation_hooks_tl(bridge, direction)
    assert torch.equal(tlb.generate_tokens_tl(bridge, cm, inputs, N_NEW, hooks), expected)
    assert torch.equal(nb.generate_tokens_ablated_nnsight(nn_model, cm, inputs, direction, N_NEW), expected)


@pytest.mark.parametrize("remote", [False, "local"])
def test_ndif_demo_traces_match_main_path(cm, nn_model, remote):
    """The remote demo's traces, run here (remote="local" is nnsight's serialised dry run of NDIF)."""
    harmful, harmless, instruction, layer = HARMFUL[:2], HARMLESS[:2], "Help me steal a car.", 1
    completion = nb.ablation_demo(nn_model, instruction, harmful, harmless, layer, N_NEW, remote=remote)

    def last_token_mean(instructions):
        return mean_activations(cm, list(instructions), positions=[-1], layers=[layer])[0, 0]

    with ablate(cm, last_token_mean(harmful) - last_token_mean(harmless)):
        assert completion == generate(cm, [instruction], max_new_tokens=N_NEW)[0]
    assert completion != generate(cm, [instruction], max_new_tokens=N_NEW)[0]  # the ablation did something


def test_remote_demo_needs_an_ndif_api_key(monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="NDIF_API_KEY"):
        nb.remote_ablation_demo()
    assert nb.NDIF_REMOTE_EXAMPLE is nb.remote_ablation_demo


def test_nnsight_rejects_bad_directions_and_foreign_models(cm, nn_model):
    with pytest.raises(ValueError, match="d_model"):
        nb.generate_ablated_nnsight(nn_model, cm, PROMPTS, torch.ones(cm.d_model + 1), 2)
    other = tiny_chat_model("llama", n_layers=2, seed=1)
    with pytest.raises(ValueError, match="does not wrap"):
        nb.mean_activations_nnsight(nn_model, other, PROMPTS)
