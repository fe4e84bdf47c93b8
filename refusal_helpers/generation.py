"""Batched greedy generation through `model.generate`, under whatever interventions are active."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from .batching import progress_batches
from .models import ChatModel

# Greedy decoding, with the sampling defaults some generation configs carry silenced.
GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@torch.inference_mode()
def generate_ids(
    cm: ChatModel,
    instructions: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool | str = False,
    **generate_kwargs,
) -> list[Int[Tensor, " new"]]:
    """The new token ids of each instruction's completion (greedy unless `generate_kwargs` say otherwise),
    padded after an early end-of-sequence with the pad token, as `model.generate` writes them."""
    if isinstance(instructions, str):
        instructions = [instructions]
    settings = {**GREEDY, **generate_kwargs} if not generate_kwargs.get("do_sample") else generate_kwargs
    out: list[Tensor] = []
    for chunk in progress_batches(instructions, batch_size, progress, "generating"):
        inputs = cm.tokenize(chunk)
        cm.check_length(inputs["input_ids"].shape[1] + max_new_tokens, "A prompt plus its new tokens")
        output = cm.model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=cm.tokenizer.pad_token_id, **settings
        )
        out.extend(output[:, inputs["input_ids"].shape[1] :].cpu())
    return out


def generate(
    cm: ChatModel,
    instructions: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool | str = False,
    **generate_kwargs,
) -> list[str]:
    """Completions of `instructions` (greedy unless `generate_kwargs` say otherwise), without the prompt.

    Run it inside an intervention context (``with ablate(cm, r): generate(...)``) to generate under it:
    the hooks act at every position, the prompt's and each generated token's.
    """
    ids = generate_ids(cm, instructions, max_new_tokens, batch_size, progress, **generate_kwargs)
    return [text.strip() for text in cm.tokenizer.batch_decode(ids, skip_special_tokens=True)] if ids else []
