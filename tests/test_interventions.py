from contextlib import nullcontext

import pytest
import torch

from refusal_helpers.generation import generate
from refusal_helpers.hookpoints import hook_names
from refusal_helpers.interventions import ablate, active_hook_count, add, hooks
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


def record_every_call(cm):
    """Hook functions that append every resid_pre / attn_out / mlp_out they see, one entry per forward pass."""
    seen = {name: [] for name in hook_names(cm)}

    def recorder(name):
        def fn(x):
            seen[name].append(x.detach().clone())
            return x

        return fn

    return seen, {name: recorder(name) for name in seen}


def relative_projection(x, r_hat):
    """|x . r_hat| / |x| at each position (0 where x is 0, as at padding)."""
    x = x.double()
    return (x @ r_hat.double()).abs() / x.norm(dim=-1).clamp_min(1e-30)


def test_interventions_act_during_generation(llama):
    r = torch.randn(llama.d_model, generator=torch.Generator().manual_seed(0))
    r_hat = r / r.norm()
    calls = []
    with hooks(llama, {"blocks.0.hook_resid_pre": lambda x: calls.append(x.shape[1]) or x}):
        generate(llama, ["Hello world!"], max_new_tokens=4, batch_size=1)
    assert len(calls) == 4  # one prompt pass, then one call per new token (KV cache)
    n_new, prompt_len = 6, llama.tokenize(HARMFUL)["input_ids"].shape[1]
    runs = {}
    for kind, context in (("ablated", ablate(llama, 100 * r)), ("plain", nullcontext())):
        seen, recorders = record_every_call(llama)
        with context, hooks(llama, recorders):  # recorders come after the ablation hooks: they see ablated values
            text = generate(llama, HARMFUL, max_new_tokens=n_new, min_new_tokens=n_new)
        runs[kind] = seen, text
    for kind, (seen, _) in runs.items():
        for name, steps in seen.items():
            assert [x.shape[1] for x in steps] == [prompt_len] + [1] * (n_new - 1), (kind, name)
            for step, x in enumerate(steps):
                largest = relative_projection(x, r_hat).max()
                if kind == "ablated":  # nothing along r_hat, at the prompt pass and at every cached decoding step
                    assert largest < 1e-5, (name, step)
                else:  # without the ablation every step has a component along r_hat
                    assert largest > 1e-2, (name, step)
    ablated, plain = runs["ablated"][1], runs["plain"][1]
    assert ablated != plain and len(plain) == len(HARMFUL)
    with ablate(llama, 100 * r):
        again = generate(llama, HARMFUL, max_new_tokens=n_new, min_new_tokens=n_new)
    assert again == ablated


def test_one_ablation_serves_generation_and_a_forward_pass_with_grad(llama):
    r = torch.randn(llama.d_model)
    inputs = llama.tokenize(HARMFUL)
    with ablate(llama, r):
        generate(llama, HARMFUL[:1], max_new_tokens=2)  # runs in inference mode: casts the direction there
        logits = llama.forward(inputs)  # grad mode: the cast copy must not be an inference tensor
    assert logits.requires_grad and torch.isfinite(logits).all()


def test_sparing_the_first_token_leaves_each_prompts_first_real_token_alone(llama):
    r = torch.randn(llama.d_model, generator=torch.Generator().manual_seed(1))
    r_hat = r / r.norm()
    inputs = llama.tokenize(HARMFUL)  # left-padded: the first real token is not at position 0 in every row
    first = inputs["attention_mask"].argmax(dim=1)
    assert first.min() == 0 < first.max()
    rows = torch.arange(len(HARMFUL))
    plain, recorders = capture_all(llama)
    with hooks(llama, recorders):
        llama.forward(inputs)
    spared, recorders = capture_all(llama)
    with ablate(llama, 100 * r, spare_first_token=True):
        assert active_hook_count(llama) == 3 * llama.n_layers + 1  # the block hooks and one on the model's inputs
        with hooks(llama, recorders):
            llama.forward(inputs)
    assert active_hook_count(llama) == 0
    real = inputs["attention_mask"].bool().clone()
    real[rows, first] = False  # every real token but the first
    for name in plain:
        # the first token sees only itself, so its whole stream is the unablated one
        torch.testing.assert_close(spared[name][rows, first], plain[name][rows, first])
        assert relative_projection(plain[name][rows, first], r_hat).min() > 1e-3, name
        assert relative_projection(spared[name], r_hat)[real].max() < 1e-5, name


def test_spared_ablation_ablates_every_new_token_during_generation(llama):
    r = torch.randn(llama.d_model, generator=torch.Generator().manual_seed(2))
    r_hat = r / r.norm()
    n_new = 4
    seen, recorders = record_every_call(llama)
    with ablate(llama, 100 * r, spare_first_token=True), hooks(llama, recorders):
        text = generate(llama, HARMFUL, max_new_tokens=n_new, min_new_tokens=n_new)
    for name, steps in seen.items():
        assert [x.shape[1] for x in steps[1:]] == [1] * (n_new - 1)
        for step, x in enumerate(steps[1:]):  # cached steps: the one new token is never the first one
            assert relative_projection(x, r_hat).max() < 1e-5, (name, step)
    with ablate(llama, 100 * r, spare_first_token=True):
        alone = [generate(llama, [p], max_new_tokens=n_new, min_new_tokens=n_new)[0] for p in HARMFUL]
        last = [llama.forward(llama.tokenize([p]))[0, -1] for p in HARMFUL]
        batched = llama.forward(llama.tokenize(HARMFUL))[:, -1]
    torch.testing.assert_close(batched, torch.stack(last), atol=1e-4, rtol=1e-4)  # padding changes nothing
    assert alone == text
    with ablate(llama, 100 * r):
        assert llama.forward(llama.tokenize(HARMFUL))[:, -1].sub(batched).abs().max() > 1e-3  # sparing matters


def test_ablate_acts_at_the_given_layers_only(llama):
    r = torch.randn(llama.d_model, generator=torch.Generator().manual_seed(1))
    r_hat = r / r.norm()
    inputs = llama.tokenize(HARMFUL)
    chosen = [1, 2]
    seen_plain, recorders = capture_all(llama)
    with hooks(llama, recorders):
        llama.forward(inputs)
    seen, recorders = capture_all(llama)
    with ablate(llama, r, layers=chosen):
        assert active_hook_count(llama) == 3 * len(chosen)
        with hooks(llama, recorders):
            llama.forward(inputs)
    for name, x in seen.items():
        layer = int(name.split(".")[1])
        if layer in chosen:
            assert relative_projection(x, r_hat).max() < 1e-5, name
        elif layer < min(chosen):  # upstream of every ablation: exactly the plain run
            torch.testing.assert_close(x, seen_plain[name], rtol=0, atol=0)
            assert relative_projection(x, r_hat).max() > 1e-2, name
        elif not name.endswith("hook_resid_pre"):  # later blocks' outputs are not ablated (their input is)
            assert relative_projection(x, r_hat).max() > 1e-2, name


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
    r = torch.randn(cm.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r_hat = r / r.norm()
    inputs = cm.tokenize(HARMFUL)
    seen, recorders = capture_all(cm)
    with ablate(cm, r):
        with hooks(cm, recorders):
            logits = cm.forward(inputs)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    seen_plain, recorders = capture_all(cm)
    with hooks(cm, recorders):
        plain = cm.forward(inputs)
    eps = torch.finfo(torch.bfloat16).eps  # bf16's relative resolution
    for name, x in seen.items():
        assert x.dtype == torch.bfloat16, name
        assert relative_projection(x, r_hat).max() < eps, name  # ablated up to bf16 rounding
        assert relative_projection(seen_plain[name], r_hat).max() > 2 * eps, name  # and not by accident
    assert (logits.float() - plain.float()).abs().max() > eps * plain.float().abs().max()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_starting_at_a_layer_equals_the_full_forward(arch):
    from refusal_helpers.activations import residual_activations
    from refusal_helpers.selection.engine import start_at_layer

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


@pytest.mark.parametrize("returned, said", [(None, "returned None"), ((1, 2), "returned a tuple")])
@pytest.mark.parametrize("name", ["blocks.1.hook_resid_pre", "blocks.2.hook_mlp_out"])
def test_a_hook_returning_no_tensor_is_named_at_its_hook_point(llama, name, returned, said):
    """A hook that forgets `return` fails in `hooks` naming its hook point, not deep inside transformers."""
    with pytest.raises(TypeError) as info:
        with hooks(llama, {name: lambda x: returned}):
            llama.forward(llama.tokenize(HARMFUL))
    assert str(info.value).startswith(f"The hook function at {name} {said}: a hook must return the (modified) "
                                      "activation tensor")
    assert ("forget `return x`" in str(info.value)) == (returned is None)
    assert active_hook_count(llama) == 0
