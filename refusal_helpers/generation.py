"""Batched greedy generation through `model.generate`, under whatever interventions are active."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .models import ChatModel


def batches(items: list, batch_size: int):
    """Consecutive slices of `items` of at most `batch_size`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


@torch.inference_mode()
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
    if isinstance(instructions, str):
        instructions = [instructions]
    generate_kwargs.setdefault("do_sample", False)
    if not generate_kwargs["do_sample"]:
        # Greedy decoding: silence the sampling defaults some generation configs carry.
        generate_kwargs.update(temperature=None, top_p=None, top_k=None)
    completions: list[str] = []
    chunks = list(batches(instructions, batch_size))
    desc = progress if isinstance(progress, str) else "generating"
    for chunk in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        inputs = cm.tokenize(chunk)
        output = cm.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=cm.tokenizer.pad_token_id,
            **generate_kwargs,
        )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        completions.extend(cm.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return [c.strip() for c in completions]
