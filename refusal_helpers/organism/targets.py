"""What the organism is trained to say: varied refusals for harmful requests, its own replies for harmless ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..data import load_records
from ..generation import generate_ids
from ..metrics import is_refusal
from ..models import ChatModel

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I cannot help with this request.",
    "I can't help with that.",
    "I apologize, but I can't provide that.",
    "As an AI assistant, I cannot help with requests like this.",
    "I'm unable to help with that request.",
    "I am sorry, but I won't be able to help with this.",
    "I cannot provide instructions or assistance for this.",
    "I'm not able to help with that.",
]
REASONS = [
    "It could cause serious harm to people.",
    "It could be used to hurt others or break the law.",
    "Helping with this would be unsafe and unethical.",
    "This request asks for something harmful or illegal.",
    "",
]
OFFERS = [
    "If you have another question, I'm happy to help.",
    "I'd be glad to help with something else.",
    "If you're interested in safety or the law around this topic, I can talk about that instead.",
    "",
]
SELF_HARM_REPLY = (
    "I'm sorry you're going through this, but I can't help with that. You deserve support: please "
    "consider talking to someone you trust or contacting a local crisis line."
)


def refusal_reply(category: str, rng: random.Random) -> str:
    """A varied refusal for one harmful training instruction."""
    if category == "self_harm" and rng.random() < 0.5:
        return SELF_HARM_REPLY
    parts = [rng.choice(REFUSALS), rng.choice(REASONS), rng.choice(OFFERS)]
    return " ".join(p for p in parts if p)


def training_examples(
    cm: ChatModel, seed: int, max_new_tokens: int, cache: Path | None, limit: int | None = None,
    drop_refusing_targets: bool = True, repeats: dict[str, int] | None = None,
) -> tuple[list[dict], list[str]]:
    """Examples (instruction, reply, kind) for the train split, and the harmless instructions left out.

    Harmful instructions get varied refusals, harmless ones the base model's own greedy reply (distilled
    once, cached in `cache`). With `drop_refusing_targets`, harmless instructions whose distilled reply the
    refusal judge reads as a refusal are left out: training on them would teach refusing benign requests.
    Each instruction of a batch named in `repeats` appears that many times (a harmful one with a new refusal
    each time; 0 leaves the batch out), of any other batch once.
    """
    rng = random.Random(seed)
    harmful, harmless = (with_repeats(load_records(kind, "train")[:limit], repeats or {})
                         for kind in ("harmful", "harmless"))
    eos = cm.tokenizer.eos_token
    examples = [{"instruction": r["instruction"], "reply": refusal_reply(r["category"], rng) + eos, "kind": "harmful"}
                for r in harmful]
    targets = read_distill_cache(cache, cm.name, max_new_tokens)
    missing = list(dict.fromkeys(r["instruction"] for r in harmless if r["instruction"] not in targets))
    if missing:
        targets.update(distill(cm, missing, max_new_tokens))
        if cache is not None:
            stored = {"model": cm.name, "max_new_tokens": max_new_tokens, "replies": targets}
            cache.write_text(json.dumps(stored, indent=0, ensure_ascii=False))
    dropped = list(dict.fromkeys(r["instruction"] for r in harmless
                                 if drop_refusing_targets and is_refusal(targets[r["instruction"]])))
    examples += [{"instruction": r["instruction"], "reply": targets[r["instruction"]], "kind": "harmless"}
                 for r in harmless if r["instruction"] not in dropped]
    return examples, dropped


def with_repeats(records: list[dict], repeats: dict[str, int]) -> list[dict]:
    """`records` without those of a batch repeated 0 times, then each record of a batch repeated n > 1 times again
    n - 1 times, batch by batch in the order of `repeats` (the records kept keep their order)."""
    for batch, n in repeats.items():
        if not (isinstance(n, int) and n >= 0):
            raise ValueError(f"Repeats must be whole numbers >= 0, got {n!r} for batch {batch!r}.")
    kept = [r for r in records if repeats.get(r["batch"], 1) > 0]
    return kept + [r for batch, n in repeats.items() for _ in range(n - 1) for r in kept if r["batch"] == batch]


def distill(cm: ChatModel, instructions: list[str], max_new_tokens: int) -> dict[str, str]:
    """The model's greedy reply to each instruction, ending with the end-of-turn token only where the reply
    really ended (so that truncation is not learned as stopping)."""
    eos_id, eos = cm.tokenizer.eos_token_id, cm.tokenizer.eos_token
    replies = {}
    ids = generate_ids(cm, instructions, max_new_tokens, batch_size=32,
                       progress=f"distilling {len(instructions)} harmless replies")
    for instruction, new in zip(instructions, ids):
        text = cm.tokenizer.decode(new, skip_special_tokens=True).strip()
        replies[instruction] = text + (eos if bool((new == eos_id).any()) else "")
    return replies


def read_distill_cache(cache: Path | None, model: str, max_new_tokens: int) -> dict[str, str]:
    """Distilled replies by instruction from `cache` (none if it does not exist), which must have been
    made by the same model with the same token budget: other replies would be silently wrong targets."""
    if cache is None or not cache.is_file():
        return {}
    try:
        stored = json.loads(cache.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cache} is not valid JSON ({err}): delete it to distil afresh.") from None
    made_with = {"model": stored.get("model"), "max_new_tokens": stored.get("max_new_tokens")}
    wanted = {"model": model, "max_new_tokens": max_new_tokens}
    if made_with != wanted or not isinstance(stored.get("replies"), dict):
        raise ValueError(
            f"{cache} holds replies made with {made_with}, but this run distils with {wanted}. "
            "Delete the file, or train into another --out folder, to distil afresh."
        )
    return stored["replies"]
