"""The fast path of selection: many interventions on the same prompts, sharing what they have in common.

- `SharedPrefixPrompts` + `variant_last_logits`: chat prompts share a long head (system prompt, user header),
  which runs once per intervention; its KV cache then serves every prompt.
- `start_at_layer`: an addition at layer l leaves the layers below unchanged, so their output (a cached
  residual stream) is fed to block l and only the layers above run.

Both are tested against the plain path (`evaluation.last_logits` under hooks).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..batching import batches, check_instructions, pad
from ..interventions import HookFn, hooks
from ..models import ChatModel


@dataclass
class SharedPrefixPrompts:
    """Tokenised prompts split into the token prefix they all share and each prompt's own suffix.

    Every suffix keeps at least one token.
    """

    prefix: list[int]
    suffixes: list[list[int]]

    @classmethod
    def from_instructions(cls, cm: ChatModel, instructions: list[str]) -> SharedPrefixPrompts:
        """Format with the chat template, tokenise each prompt unpadded, and split at the longest common prefix."""
        check_instructions(instructions)
        ids = [cm.tokenizer(text, add_special_tokens=False)["input_ids"] for text in cm.format(instructions)]
        shared = 0
        limit = min(len(i) for i in ids) - 1
        while shared < limit and all(i[shared] == ids[0][shared] for i in ids):
            shared += 1
        return cls(ids[0][:shared], [i[shared:] for i in ids])

    def __len__(self) -> int:
        return len(self.suffixes)


def _cache_argument(model: nn.Module) -> str:
    """The keyword under which this transformers version takes a KV cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def variant_last_logits(
    cm: ChatModel,
    prompts: SharedPrefixPrompts,
    n_variants: int,
    variant_hooks: Callable[[Tensor], dict[str, HookFn]],
    batch_size: int = 32,
) -> Float[Tensor, "variant prompt vocab"]:
    """Last-position logits of every prompt under each of `n_variants` interventions, float32 on CPU.

    ``variant_hooks(rows)`` returns the hooks for a batch whose i-th sequence runs variant ``rows[i]``
    (e.g. ablation hooks with one direction per row). The shared prefix runs once per variant and its
    KV cache serves all prompts; rows are grouped by prompt so that batches need little padding.
    """
    if n_variants <= 0:
        raise ValueError(f"n_variants must be positive, got {n_variants}.")
    device, pad_id, shared = cm.device, cm.tokenizer.pad_token_id, len(prompts.prefix)
    cache_arg = _cache_argument(cm.model)
    prefix_cache = None
    if shared:
        prefix = torch.tensor(prompts.prefix, device=device).expand(n_variants, shared)
        with hooks(cm, variant_hooks(torch.arange(n_variants))):
            out = cm.model(input_ids=prefix, use_cache=True, logits_to_keep=1)
        prefix_cache = out.cache if hasattr(out, "cache") else out.past_key_values
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts.suffixes[i]))
    rows = [(v, p) for p in by_length for v in range(n_variants)]
    logits = None
    for chunk in batches(rows, batch_size):
        variants = torch.tensor([v for v, _ in chunk])
        suffixes = [prompts.suffixes[p] for _, p in chunk]
        width = max(len(s) for s in suffixes)
        # Right padding: every suffix directly follows the prefix, so positions and (sliding) attention
        # windows are those of the unpadded prompt; logits are kept only at the rows' last positions.
        ids = pad(suffixes, pad_id, "right").to(device)
        mask = torch.cat([torch.ones(len(chunk), shared, dtype=torch.long),
                          pad([[1] * len(s) for s in suffixes], 0, "right")], dim=1).to(device)
        ends = sorted({len(s) - 1 for s in suffixes})
        kwargs = {"attention_mask": mask, "position_ids": shared + torch.arange(width, device=device).expand(len(chunk), width)}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_select_indices(variants.to(device))
            kwargs.update({cache_arg: cache, "use_cache": True})
        with hooks(cm, variant_hooks(variants)):
            kept = cm.model(input_ids=ids, logits_to_keep=torch.tensor(ends, device=device), **kwargs).logits
        column = torch.tensor([ends.index(len(s) - 1) for s in suffixes], device=device)
        last = kept[torch.arange(len(chunk), device=device), column].float().cpu()
        if logits is None:
            logits = torch.empty(n_variants, len(prompts), last.shape[-1])
        logits[variants, torch.tensor([p for _, p in chunk])] = last
    return logits


class _PassThrough(nn.Module):
    """Stands in for a decoder block that must not run: returns its input unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def start_at_layer(
    cm: ChatModel, layer: int, resid_pre: Float[Tensor, "batch seq d_model"]
) -> Iterator[dict[str, Tensor]]:
    """Run only blocks `layer`.. on the next forward passes, feeding `resid_pre` as block `layer`'s input.

    The blocks below `layer` are swapped for pass-throughs, so a forward pass over the same inputs as
    those that produced `resid_pre` costs only the layers above. Restored on exit, also on error. Yields
    a dict whose "resid" entry can be replaced to feed another residual stream to later passes.
    """
    saved = [cm.blocks[i] for i in range(layer)]
    holder = {"resid": resid_pre}

    def replace(module, args, kwargs):
        x = holder["resid"]
        if args:
            return (x, *args[1:]), kwargs
        kwargs["hidden_states"] = x
        return args, kwargs

    handle = cm.blocks[layer].register_forward_pre_hook(replace, with_kwargs=True)
    try:
        for i in range(layer):
            cm.blocks[i] = _PassThrough()
        yield holder
    finally:
        handle.remove()
        for i, block in enumerate(saved):
            cm.blocks[i] = block
