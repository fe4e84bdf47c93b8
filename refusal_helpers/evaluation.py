"""Measurements that run the model: last-position logits, refusal scores, CE loss on completions.

Each one runs under whatever interventions are active, so ``with ablate(cm, r): refusal_scores(...)``
measures the ablated model.
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

from .generation import batches, check_instructions, progress_batches
from .interventions import HookFn, hooks
from .metrics import completion_cross_entropy, refusal_score
from .models import ChatModel


@torch.inference_mode()
def last_logits(
    cm: ChatModel, instructions: list[str], batch_size: int = 32, progress: bool | str = False
) -> Float[Tensor, "n vocab"]:
    """Next-token logits at the last prompt position (the model's first reply token), float32 on CPU.

    The plain path, one padded batch at a time; `variant_last_logits` is the fast path for many
    interventions at once and is tested against this one.
    """
    check_instructions(instructions)
    out = [cm.forward(cm.tokenize(chunk), logits_to_keep=1)[:, -1].float().cpu()
           for chunk in progress_batches(instructions, batch_size, progress, "forward")]
    return torch.cat(out)


def refusal_scores(
    cm: ChatModel, instructions: list[str], batch_size: int = 32, progress: bool | str = False
) -> Float[Tensor, "n"]:
    """Logit refusal score of each instruction."""
    return refusal_score(last_logits(cm, instructions, batch_size, progress), cm.refusal_token_ids)


@dataclass
class SharedPrefixPrompts:
    """Tokenised prompts split into the token prefix they all share and each prompt's own suffix.

    Chat prompts share a long head (system prompt, user header): it needs computing once per
    intervention, not once per prompt. Every suffix keeps at least one token.
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
    device, pad, shared = cm.device, cm.tokenizer.pad_token_id, len(prompts.prefix)
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
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=device)
        mask = torch.tensor([[1] * (shared + len(s)) + [0] * (width - len(s)) for s in suffixes], device=device)
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
        width = max(len(ids) for ids, _ in encoded)
        keep = min(width, 1 + max(sum(label != -100 for label in lab) for _, lab in encoded))
        pad = cm.tokenizer.pad_token_id
        # Left padding, as everywhere else; labels built from lengths, never from pad ids.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _ in encoded])
        labels = torch.tensor([[-100] * (width - len(lab)) + lab for _, lab in encoded])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in encoded])
        inputs = {"input_ids": input_ids.to(cm.device), "attention_mask": mask.to(cm.device)}
        logits = cm.forward(inputs, logits_to_keep=keep)
        chunk_total, chunk_count = completion_cross_entropy(logits, labels[:, -keep:].to(cm.device))
        total += float(chunk_total)
        count += chunk_count
    if count == 0:
        raise ValueError("The completions contain no tokens to score.")
    return total / count


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
