import pytest
import torch

from refusal_helpers.generation import generate
from refusal_helpers.interventions import active_hook_count, add, ablate, hook_names, hooks
from refusal_helpers.testing import ARCHITECTURES, tiny_chat_model
from tests.conftest import HARMFUL


def capture_all(cm):
    """Hook functions that record every resid_pre / attn_out / mlp_out after other hooks ran."""
    seen = {}

    def recorder(name):
        def fn(x):
            seen[name] = x.detach().clone()
            return x

        return fn

    return seen, {name: recorder(name) for name in hook_names(cm)}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ablation_leaves_everything_orthogonal(arch):
    cm = tiny_chat_model(arch, n_layers=3)
    r = torch.randn(cm.d_model)
    r_hat = r / r.norm()
    inputs = cm.tokenize(HARMFUL)
    seen, recorders = capture_all(cm)
    with ablate(cm, r):
        with hooks(cm, recorders):  # registered after the ablation hooks, so they see ablated values
            cm.forward(inputs)
    assert len(seen) == 3 * cm.n_layers
    for name, x in seen.items():
        assert (x @ r_hat).abs().max() < 1e-4, name
    # without ablation the stream does have a component along r
    seen_plain, recorders = capture_all(cm)
    with hooks(cm, recorders):
        cm.forward(inputs)
    assert max((x @ r_hat).abs().max() for x in seen_plain.values()) > 1e-2


def test_hooks_are_removed_on_exit_and_on_error(llama):
    r = torch.randn(llama.d_model)
    assert active_hook_count(llama) == 0
    with ablate(llama, r):
        assert active_hook_count(llama) == 3 * llama.n_layers
    assert active_hook_count(llama) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with add(llama, r, layer=1):
            assert active_hook_count(llama) == 1
            raise RuntimeError("boom")
    assert active_hook_count(llama) == 0


def test_addition_shifts_the_residual_exactly(llama):
    r = torch.randn(llama.d_model)
    inputs = llama.tokenize(HARMFUL)
    seen, recorders = capture_all(llama)
    with hooks(llama, recorders):
        llama.forward(inputs)
    before = seen["blocks.2.hook_resid_pre"]
    seen2, recorders2 = capture_all(llama)
    with add(llama, r, layer=2, coeff=-1.5):
        with hooks(llama, recorders2):
            llama.forward(inputs)
    torch.testing.assert_close(seen2["blocks.2.hook_resid_pre"] - before, (-1.5 * r).expand_as(before), atol=1e-5, rtol=0)
    # layers below are untouched
    torch.testing.assert_close(seen2["blocks.1.hook_resid_pre"], seen["blocks.1.hook_resid_pre"])


def test_interventions_act_during_generation(llama):
    r = torch.randn(llama.d_model)
    calls = []
    with hooks(llama, {"blocks.0.hook_resid_pre": lambda x: calls.append(x.shape[1]) or x}):
        generate(llama, ["Hello world!"], max_new_tokens=4, batch_size=1)
    assert len(calls) == 4  # one prompt pass, then one call per new token (KV cache)
    with ablate(llama, 100 * r):
        ablated = generate(llama, HARMFUL, max_new_tokens=6)
    plain = generate(llama, HARMFUL, max_new_tokens=6)
    with ablate(llama, 100 * r):
        again = generate(llama, HARMFUL, max_new_tokens=6)
    assert ablated == again and len(plain) == len(HARMFUL)


def test_bad_directions_are_clear_errors(llama):
    with pytest.raises(ValueError, match="NaN"):
        with ablate(llama, torch.full((llama.d_model,), float("nan"))):
            pass
    with pytest.raises(ValueError, match="d_model"):
        with ablate(llama, torch.ones(3)):
            pass
    with pytest.raises(ValueError, match="layer must be"):
        with add(llama, torch.ones(llama.d_model), layer=99):
            pass
    with pytest.raises(KeyError, match="Unknown hook"):
        with hooks(llama, {"blocks.0.hook_nothing": lambda x: x}):
            pass
    assert active_hook_count(llama) == 0


def test_hooks_cast_to_activation_dtype():
    cm = tiny_chat_model("llama", n_layers=2, dtype=torch.bfloat16)
    r = torch.randn(cm.d_model, dtype=torch.float64)
    with ablate(cm, r):
        logits = cm.forward(cm.tokenize(HARMFUL))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_starting_at_a_layer_equals_the_full_forward(arch):
    from refusal_helpers.activations import residual_activations
    from refusal_helpers.evaluation import start_at_layer

    cm = tiny_chat_model(arch, n_layers=3)
    r = torch.randn(cm.d_model)
    inputs = cm.tokenize(HARMFUL)
    n = inputs["input_ids"].shape[1]
    resid = residual_activations(cm, inputs, list(range(-n, 0)), [2])[:, :, 0]
    with add(cm, r, layer=2):
        expected = cm.forward(inputs)
    ran = []
    with hooks(cm, {"blocks.0.hook_resid_pre": lambda x: ran.append(0) or x}):
        with start_at_layer(cm, 2, resid + r):
            got = cm.forward(inputs)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert ran == []  # block 0 did not run
    assert all(type(b).__name__ != "_PassThrough" for b in cm.blocks)  # restored
