"""Batched greedy generation through `model.generate`, under whatever interventions are active."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from .models import ChatModel

T = TypeVar("T")


def check_instructions(instructions: list[str]) -> None:
    """Raise a clear error unless `instructions` is a non-empty list of strings (a lone string is a mistake:
    iterating it would treat each character, or each slice, as an instruction)."""
    if isinstance(instructions, str):
        raise TypeError(f"Expected a list of instruction strings, got one string ({instructions[:40]!r}...): "
                        "wrap it in a list.")
    if len(instructions) == 0:
        raise ValueError("Expected a non-empty list of instruction strings, got an empty one.")


def batches(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of `items` of at most `batch_size`."""
    if isinstance(items, str):
        raise TypeError("batches() slices a list; got a string. Pass a list of instructions.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def progress_batches(
    items: Sequence[T], batch_size: int, progress: bool | str, default_label: str
) -> Iterator[Sequence[T]]:
    """`batches`, with a progress bar when `progress` is true (a string labels the bar)."""
    chunks = list(batches(items, batch_size))
    label = progress if isinstance(progress, str) else default_label
    return iter(tqdm(chunks, desc=label, disable=not progress, leave=False))


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
    for chunk in progress_batches(instructions, batch_size, progress, "generating"):
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
