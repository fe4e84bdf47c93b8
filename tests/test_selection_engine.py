import pytest
import torch

from refusal_helpers.evaluation import last_logits
from refusal_helpers.hookpoints import hook_names
from refusal_helpers.interventions import ablate, ablation_hook, active_hook_count
from refusal_helpers.selection.engine import SharedPrefixPrompts, variant_last_logits
from refusal_helpers.testing import ARCHITECTURES, tiny_chat_model
from tests.conftest import HARMFUL, HARMLESS


def test_shared_prefix_splits_every_prompt_exactly(llama):
    prompts = SharedPrefixPrompts.from_instructions(llama, HARMFUL)
    full = [llama.tokenizer(t, add_special_tokens=False)["input_ids"] for t in llama.format(HARMFUL)]
    assert [prompts.prefix + s for s in prompts.suffixes] == full
    assert len(prompts.prefix) > 0 and all(len(s) >= 1 for s in prompts.suffixes)
    # The prefix is the longest shared one: the first suffix tokens are not all equal.
    assert len({s[0] for s in prompts.suffixes}) > 1


def test_shared_prefix_leaves_a_token_when_prompts_are_equal(llama):
    prompts = SharedPrefixPrompts.from_instructions(llama, ["Same.", "Same."])
    assert [len(s) for s in prompts.suffixes] == [1, 1]
    with pytest.raises(ValueError, match="non-empty"):
        SharedPrefixPrompts.from_instructions(llama, [])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_variant_logits_equal_separate_forward_passes(arch):
    cm = tiny_chat_model(arch, n_layers=3)
    directions = torch.randn(5, cm.d_model)
    prompts = SharedPrefixPrompts.from_instructions(cm, HARMLESS)

    def ablation_hooks(rows):
        fn = ablation_hook(directions[rows].unsqueeze(1))
        return {name: fn for name in hook_names(cm)}

    # batch_size 3 mixes variants and prompts within batches and splits both across batches.
    got = variant_last_logits(cm, prompts, len(directions), ablation_hooks, batch_size=3)
    assert got.shape == (5, len(HARMLESS), cm.model.config.vocab_size)
    for v, r in enumerate(directions):
        with ablate(cm, r):
            expected = last_logits(cm, HARMLESS)
        torch.testing.assert_close(got[v], expected, atol=1e-4, rtol=1e-4)
    plain = variant_last_logits(cm, prompts, 1, lambda rows: {})[0]
    torch.testing.assert_close(plain, last_logits(cm, HARMLESS), atol=1e-4, rtol=1e-4)
    assert active_hook_count(cm) == 0


def test_variant_logits_without_a_shared_prefix(llama):
    # One prompt per set can differ from the first token on: no prefix pass, no cache.
    prompts = SharedPrefixPrompts([], [[5, 6, 7], [8, 9]])
    got = variant_last_logits(llama, prompts, 2, lambda rows: {})
    plain = llama.forward({"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)})
    torch.testing.assert_close(got[0, 0], plain[0, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1, 0], got[0, 0])
    with pytest.raises(ValueError, match="n_variants"):
        variant_last_logits(llama, prompts, 0, lambda rows: {})
