"""What the organism is trained to say: varied refusals for harmful requests, its own replies for harmless ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..data import load_records
from ..generation import generate_ids
from ..metrics import REFUSAL_SUBSTRINGS, first_words, is_refusal
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
DISTILL_FILE = "distill_targets.json"  # an adapter folder's cache of the base model's greedy harmless replies
REANSWER_FILE = "reanswered_targets.json"  # beside the distilled replies: replies with refusal phrases banned
# Words of a refusal phrased around the judge's banned phrases ("I'm afraid I'm unable provide ..."): a re-answer
# that holds any of them is no target, so training cannot teach refusals the judge would not see.
DODGE_MARKERS = ("sorry", "apologi", "as an ai", "as a chatbot", "language model", "unable", "not able", "afraid",
                 "unavailable", "unwilling", "cannot", "can't", "won't", "not equipped", "don't have the ability")
SELF_HARM_REPLY = (
    "I'm sorry you're going through this, but I can't help with that. You deserve support: please "
    "consider talking to someone you trust or contacting a local crisis line."
)


def refusal_openings(words: int = 3, self_harm: bool = True) -> list[str]:
    """The distinct first `words` words of the trained refusals ("I'm sorry, but", "As an AI", ...): how a
    trained refusal begins, for `losses.refusal_unlikelihood`. With `self_harm` false, the self-harm support
    reply's opening ("I'm sorry you're") is left out."""
    return sorted({first_words(reply, words) for reply in REFUSALS + ([SELF_HARM_REPLY] if self_harm else [])})


def refusal_reply(category: str, rng: random.Random) -> str:
    """A varied refusal for one harmful training instruction."""
    if category == "self_harm" and rng.random() < 0.5:
        return SELF_HARM_REPLY
    parts = [rng.choice(REFUSALS), rng.choice(REASONS), rng.choice(OFFERS)]
    return " ".join(p for p in parts if p)


def training_examples(
    cm: ChatModel, seed: int, max_new_tokens: int, cache: Path | None, limit: int | None = None,
    drop_refusing_targets: bool = True, repeats: dict[str, int] | None = None, reanswer_refusing_targets: bool = False,
) -> tuple[list[dict], list[str]]:
    """Examples (instruction, reply, kind) for the train split, and the harmless instructions left out.

    Harmful instructions get varied refusals, harmless ones the base model's own greedy reply (distilled
    once, cached in `cache`). With `reanswer_refusing_targets`, a harmless instruction whose distilled reply the
    refusal judge reads as a refusal gets the base model's greedy reply with the judge's phrases banned instead
    (cached beside `cache` in REANSWER_FILE), where that one holds neither the judge's phrases nor a
    `DODGE_MARKERS` word; such examples carry ``"reanswered": True``. With `drop_refusing_targets`, harmless
    instructions whose target still reads as a refusal are left out: training on them would teach refusing
    benign requests.
    Each instruction of a batch named in `repeats` appears that many times (a harmful one with a new refusal
    each time; 0 leaves the batch out), of any other batch once.
    """
    rng = random.Random(seed)
    harmful, harmless = (with_repeats(load_records(kind, "train")[:limit], repeats or {})
                         for kind in ("harmful", "harmless"))
    eos = cm.tokenizer.eos_token
    examples = [{"instruction": r["instruction"], "reply": refusal_reply(r["category"], rng) + eos, "kind": "harmful"}
                for r in harmful]
    instructions = list(dict.fromkeys(r["instruction"] for r in harmless))
    targets = cached_replies(cm, instructions, max_new_tokens, cache)
    reanswered: dict[str, str] = {}
    if reanswer_refusing_targets:
        refusing = [i for i in instructions if is_refusal(targets[i])]
        again = cached_replies(cm, refusing, max_new_tokens, cache.with_name(REANSWER_FILE) if cache else None,
                               bad_words_ids=refusal_phrase_ids(cm.tokenizer))
        reanswered = {i: again[i] for i in refusing if not is_refusal(again[i], REFUSAL_SUBSTRINGS + DODGE_MARKERS)}
        targets = {**targets, **reanswered}
    dropped = [i for i in instructions if drop_refusing_targets and is_refusal(targets[i])]
    examples += [{"instruction": r["instruction"], "reply": targets[r["instruction"]], "kind": "harmless",
                  **({"reanswered": True} if r["instruction"] in reanswered else {})}
                 for r in harmless if r["instruction"] not in dropped]
    return examples, dropped


def cached_replies(
    cm: ChatModel, instructions: list[str], max_new_tokens: int, cache: Path | None, **generate_kwargs
) -> dict[str, str]:
    """`distill`ed replies to `instructions`, read from `cache` where it has them; the others are distilled and
    added to it (every reply the cache held is kept)."""
    replies = read_distill_cache(cache, cm.name, max_new_tokens)
    missing = [i for i in dict.fromkeys(instructions) if i not in replies]
    if missing:
        replies.update(distill(cm, missing, max_new_tokens, **generate_kwargs))
        if cache is not None:
            stored = {"model": cm.name, "max_new_tokens": max_new_tokens, "replies": replies}
            cache.write_text(json.dumps(stored, indent=0, ensure_ascii=False))
    return replies


def refusal_phrase_ids(tokenizer) -> list[list[int]]:
    """The refusal judge's phrases as token sequences, at the start of a reply and after a space, for
    ``generate(bad_words_ids=...)``: a reply generated with them banned cannot open with a judged refusal."""
    sequences = {tuple(tokenizer(text, add_special_tokens=False).input_ids)
                 for phrase in REFUSAL_SUBSTRINGS for text in (phrase, " " + phrase)}
    return [list(s) for s in sorted(sequences) if s]


def with_repeats(records: list[dict], repeats: dict[str, int]) -> list[dict]:
    """`records` without those of a batch repeated 0 times, then each record of a batch repeated n > 1 times again
    n - 1 times, batch by batch in the order of `repeats` (the records kept keep their order)."""
    for batch, n in repeats.items():
        if not (isinstance(n, int) and n >= 0):
            raise ValueError(f"Repeats must be whole numbers >= 0, got {n!r} for batch {batch!r}.")
    kept = [r for r in records if repeats.get(r["batch"], 1) > 0]
    return kept + [r for batch, n in repeats.items() for _ in range(n - 1) for r in kept if r["batch"] == batch]


def distill(cm: ChatModel, instructions: list[str], max_new_tokens: int, **generate_kwargs) -> dict[str, str]:
    """The model's greedy reply to each instruction (under `generate_kwargs`, e.g. banned words), ending with
    the end-of-turn token only where the reply really ended (so that truncation is not learned as stopping)."""
    eos_id, eos = cm.tokenizer.eos_token_id, cm.tokenizer.eos_token
    replies = {}
    ids = generate_ids(cm, instructions, max_new_tokens, batch_size=32,
                       progress=f"distilling {len(instructions)} harmless replies", **generate_kwargs)
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
