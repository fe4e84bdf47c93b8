import math

import pytest
import torch

from refusal_helpers.evaluation import completion_loss, last_logits, refusal_scores
from refusal_helpers.metrics import (
    completion_cross_entropy,
    first_completion_token_cross_entropy,
    is_refusal,
    kl_divergence,
    refusal_rate,
    refusal_score,
)
from tests.conftest import HARMFUL


def test_refusal_score_by_hand():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    scores = refusal_score(logits, [0, 3])
    p = torch.tensor([0.5, 0.5])
    torch.testing.assert_close(scores, torch.log(p / (1 - p)))
    scores = refusal_score(logits, [1])
    torch.testing.assert_close(scores, torch.tensor([math.log(0.2 / 0.8), math.log(0.25 / 0.75)]))


def test_refusal_score_is_finite_at_the_extremes():
    logits = torch.tensor([[100.0, -100.0], [-100.0, 100.0]])
    scores = refusal_score(logits, [0])
    assert torch.isfinite(scores).all() and scores[0] > 20 and scores[1] < -20


def test_kl_divergence_by_hand():
    p = torch.tensor([[0.5, 0.5]])
    q = torch.tensor([[0.9, 0.1]])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    torch.testing.assert_close(kl_divergence(p.log(), q.log()), torch.tensor([expected]))
    assert kl_divergence(p.log(), p.log()).abs().item() < 1e-7
    with pytest.raises(ValueError):
        kl_divergence(p, torch.ones(1, 3))


def test_kl_divergence_in_float32_matches_float64_on_a_large_vocabulary():
    torch.manual_seed(0)
    base, new = torch.randn(2, 4, 49152) * 3
    exact = kl_divergence(base, new)
    cheap = kl_divergence(base, new, torch.float32)
    assert exact.dtype == cheap.dtype == torch.float32 and (exact > 1).all()
    torch.testing.assert_close(cheap, exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, I can\u2019t.", True),
        ("As an AI, I must decline.", True),
        ("i cannot do that", True),
        ("Sure! Here is a taco recipe.", False),
        ("Sorry to hear that; here is how to fix it.", False),
    ],
)
def test_is_refusal(text, expected):
    assert is_refusal(text) is expected


def test_refusal_rate():
    assert refusal_rate(["I cannot.", "Sure.", "Sure.", "I'm unable to."]) == 0.5
    with pytest.raises(ValueError):
        refusal_rate([])


def test_completion_cross_entropy_by_hand():
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
    labels = torch.tensor([[-100, 1, 1]])  # predicted from positions 0 and 1
    total, count = completion_cross_entropy(logits, labels)
    assert count == 2
    torch.testing.assert_close(total, torch.tensor(-(math.log(0.5) + math.log(0.1))))


def test_first_completion_token_cross_entropy_by_hand():
    logits = torch.log(torch.tensor([
        [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]],
        [[0.3, 0.7], [0.6, 0.4], [0.5, 0.5]],
    ]))
    labels = torch.tensor([[-100, 1, 1], [-100, -100, 0]])  # first labelled tokens: position 1, position 2
    torch.testing.assert_close(
        first_completion_token_cross_entropy(logits, labels), torch.tensor([-math.log(0.5), -math.log(0.6)])
    )
    with pytest.raises(ValueError, match="at least one labelled token"):
        first_completion_token_cross_entropy(logits, torch.tensor([[-100, 1, 1], [5, -100, -100]]))


def test_completion_loss_matches_model_loss(llama):
    instruction, completion = "What is 2 + 2?", "It is four."
    prompt_ids = llama.tokenizer(llama.format([instruction])[0], add_special_tokens=False)["input_ids"]
    ids = prompt_ids + llama.tokenizer(completion, add_special_tokens=False)["input_ids"]
    labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
    expected = llama.model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    got = completion_loss(llama, [instruction, "Hello world!"], [completion, "Hi"], batch_size=1)
    single = completion_loss(llama, [instruction], [completion])
    torch.testing.assert_close(torch.tensor(single), expected, atol=1e-4, rtol=1e-4)
    assert got != single  # the second pair contributes
    batched = completion_loss(llama, [instruction, "Hello world!"], [completion, "Hi"], batch_size=2)
    assert abs(batched - got) < 1e-4  # left padding does not change the loss


def test_refusal_scores_use_the_last_position(llama):
    logits = last_logits(llama, HARMFUL, batch_size=2)
    assert logits.shape == (len(HARMFUL), len(llama.tokenizer))
    full = llama.model(**llama.tokenize(HARMFUL)).logits[:, -1]
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(refusal_scores(llama, HARMFUL), refusal_score(full, llama.refusal_token_ids), atol=1e-4, rtol=1e-4)
