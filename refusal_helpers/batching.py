"""Input checks, batches, padding and progress bars: what every loop over instructions shares."""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterator, Sequence
from typing import TypeVar

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

T = TypeVar("T")


def check_instructions(instructions: list[str]) -> None:
    """Raise a clear error unless `instructions` is a non-empty list of strings (a lone string is a mistake:
    iterating it would treat each character, or each slice, as an instruction)."""
    if isinstance(instructions, str):
        raise TypeError(f"Expected a list of instruction strings, got one string ({instructions[:40]!r}...): "
                        "wrap it in a list.")
    if len(instructions) == 0:
        raise ValueError("Expected a non-empty list of instruction strings, got an empty one.")
    bad = next((i for i, x in enumerate(instructions) if not isinstance(x, str)), None)
    if bad is not None:
        raise TypeError(f"Expected a list of instruction strings; item {bad} is {type(instructions[bad]).__name__} "
                        f"({instructions[bad]!r}).")


def batches(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of `items` of at most `batch_size`."""
    if isinstance(items, str):
        raise TypeError("batches() slices a list; got a string. Pass a list of instructions.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]


def interleaved_order(groups: Sequence[Hashable], rng: random.Random) -> list[int]:
    """The indices of `groups` (one label per item), each group's shuffled and spread evenly through the order: every
    run of consecutive items holds the groups in about their overall proportion (stratified batches)."""
    members: dict[Hashable, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    keyed = []
    for indices in members.values():
        rng.shuffle(indices)
        keyed += [((rank + 0.5) / len(indices), i) for rank, i in enumerate(indices)]
    return [i for _, i in sorted(keyed)]


def progress_batches(
    items: Sequence[T], batch_size: int, progress: bool | str, default_label: str
) -> Iterator[Sequence[T]]:
    """`batches`, with a progress bar when `progress` is true (a string labels the bar)."""
    chunks = list(batches(items, batch_size))
    label = progress if isinstance(progress, str) else default_label
    return iter(tqdm(chunks, desc=label, disable=not progress, leave=False))


def pad(rows: Sequence[Sequence[int]], value: int, side: str, width: int | None = None) -> Int[Tensor, "batch width"]:
    """Rows of ids as one tensor, each padded with `value` on the `side` ("left" or "right") to `width`
    (default: the longest row)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
    width = max(len(r) for r in rows) if width is None else width
    fill = [[value] * (width - len(r)) for r in rows]
    return torch.tensor([f + list(r) if side == "left" else list(r) + f for r, f in zip(rows, fill)], dtype=torch.long)


def padded_batch(
    ids: Sequence[Sequence[int]], pad_id: int, side: str, labels: Sequence[Sequence[int]] | None = None
) -> dict[str, Tensor]:
    """input_ids, attention_mask (and labels, -100 on padding) for rows of token ids.

    The mask and the labels' padding come from the rows' lengths, never from comparing ids with `pad_id`:
    a real end-of-turn token may share the padding token's id.
    """
    batch = {"input_ids": pad(ids, pad_id, side), "attention_mask": pad([[1] * len(r) for r in ids], 0, side)}
    if labels is not None:
        batch["labels"] = pad(labels, -100, side)
    return batch
