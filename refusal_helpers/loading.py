"""Loading a chat model by name, and naming the weights a name refers to (what run folders record)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .devices import resolve_device_dtype
from .embedded import adapter_digest, load_embedded
from .models import ChatModel, load_pretrained

EMBEDDED = "embedded"  # the project's refusal model; "embedded:FOLDER" is the same base with FOLDER's adapter


def embedded_adapter(name_or_path: str) -> tuple[bool, Path | None]:
    """Whether a model name is the embedded model's, and the adapter folder an ``"embedded:FOLDER"`` name gives
    (None: the committed adapter)."""
    if name_or_path == EMBEDDED:
        return True, None
    if not name_or_path.startswith(f"{EMBEDDED}:"):
        return False, None
    folder = Path(name_or_path.removeprefix(f"{EMBEDDED}:"))
    if not (folder / "adapter_model.safetensors").is_file():
        raise ValueError(f"{name_or_path!r}: expected 'embedded:FOLDER' with FOLDER holding a LoRA adapter written "
                         "by `python -m refusal_helpers.organism train --out FOLDER`; found no "
                         f"{folder / 'adapter_model.safetensors'}.")
    return True, folder


def load_model(
    name_or_path: str = EMBEDDED,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs,
) -> ChatModel:
    """Load a chat model: ``"embedded"`` (the project's refusal model; ``"embedded:FOLDER"`` with another adapter,
    such as a recipe being tried), a hub name, a folder or a .gguf file."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"Expected a model name: 'embedded', a hub name, a folder or a .gguf file; got {name_or_path!r}.")
    device, dtype = resolve_device_dtype(device, dtype)
    embedded, adapter = embedded_adapter(name_or_path)
    if embedded:
        return load_embedded(device=device, dtype=dtype, adapter=adapter)
    return load_pretrained(name_or_path, device, dtype, trust_remote_code, **from_pretrained_kwargs)


def model_identity_name(model: str) -> str:
    """The name a run records for a model: local paths resolved, so 'tiny', 'tiny/' and '/abs/tiny' are one model
    (and 'embedded:FOLDER' names its adapter folder's resolved path)."""
    embedded, adapter = embedded_adapter(model)
    if embedded:
        return EMBEDDED if adapter is None else f"{EMBEDDED}:{os.path.realpath(adapter)}"
    return os.path.realpath(model) if os.path.exists(model) else model


def model_version(name_or_path: str) -> str | None:
    """A short fingerprint of the weights a name refers to, or None for a hub name.

    ``"embedded"`` (or ``"embedded:FOLDER"``): its adapter's hash; a local folder or file: the names, sizes and modification times of
    its files. Runs record it so that artifacts made with other weights under the same name are not reused.
    """
    embedded, adapter = embedded_adapter(name_or_path)
    if embedded:
        return adapter_digest(adapter)
    if not os.path.exists(name_or_path):
        return None
    if os.path.isfile(name_or_path):
        files = [name_or_path]
    else:
        files = sorted(os.path.join(name_or_path, f) for f in os.listdir(name_or_path))
    digest = hashlib.sha256()
    for f in files:
        if os.path.isfile(f):
            st = os.stat(f)
            digest.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:12]
