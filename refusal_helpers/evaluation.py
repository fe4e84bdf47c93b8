"""Measurements that run the model: last-position logits, refusal scores, CE loss of completions.

Each one runs under whatever interventions are active, so ``with ablate(cm, r): refusal_scores(...)``
measures the ablated model.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .batching import check_instructions, padded_batch, progress_batches
from .metrics import completion_cross_entropy, refusal_score
from .models import ChatModel


@torch.inference_mode()
def last_logits(
    cm: ChatModel, instructions: list[str], batch_size: int = 32, progress: bool | str = False
) -> Float[Tensor, "n vocab"]:
    """Next-token logits at the last prompt position (the model's first reply token), float32 on CPU.

    The plain path, one padded batch at a time; `selection.engine.variant_last_logits` is the fast path for
    many interventions at once and is tested against this one.
    """
    check_instructions(instructions)
    out = [cm.forward(cm.tokenize(chunk), logits_to_keep=1)[:, -1].float().cpu()
           for chunk in progress_batches(instructions, batch_size, progress, "forward")]
    return torch.cat(out)


def refusal_scores(
    cm: ChatModel, instructions: list[str], batch_size: int = 32, progress: bool | str = False
) -> Float[Tensor, " n"]:
    """Logit refusal score of each instruction."""
    return refusal_score(last_logits(cm, instructions, batch_size, progress), cm.refusal_token_ids)


def encode_completion(cm: ChatModel, instruction: str, completion: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + completion, and labels that count the completion only (-100 on the prompt)."""
    prompt_ids = cm.tokenizer(cm.format([instruction])[0], add_special_tokens=False)["input_ids"]
    completion_ids = cm.tokenizer(completion, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


@torch.inference_mode()
def completion_loss(
    cm: ChatModel, instructions: list[str], completions: list[str], batch_size: int = 8, progress: bool | str = False
) -> float:
    """Mean cross-entropy (nats per token) of `completions` given their instructions.

    Completions sit at the end of left-padded rows, so logits are computed only for the last
    (longest completion + 1) positions: the unembedding never runs on the prompts.
    """
    if len(instructions) != len(completions) or not instructions:
        raise ValueError("Expected equally many (and at least one) instructions and completions.")
    total, count = 0.0, 0
    pairs = list(zip(instructions, completions))
    for chunk in progress_batches(pairs, batch_size, progress, "completion loss"):
        encoded = [encode_completion(cm, instruction, completion) for instruction, completion in chunk]
        batch = padded_batch([ids for ids, _ in encoded], cm.tokenizer.pad_token_id, "left", [lab for _, lab in encoded])
        cm.check_length(batch["input_ids"].shape[1], "A prompt plus its completion")
        keep = min(batch["input_ids"].shape[1], 1 + max(sum(label != -100 for label in lab) for _, lab in encoded))
        inputs = {k: batch[k].to(cm.device) for k in ("input_ids", "attention_mask")}
        logits = cm.forward(inputs, logits_to_keep=keep)
        chunk_total, chunk_count = completion_cross_entropy(logits, batch["labels"][:, -keep:].to(cm.device))
        total += float(chunk_total)
        count += chunk_count
    if count == 0:
        raise ValueError("The completions contain no tokens to score.")
    return total / count
