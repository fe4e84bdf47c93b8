"""Loading a chat model by name, and naming the weights a name refers to (what run folders record)."""

from __future__ import annotations

import hashlib
import os

import torch

from .devices import resolve_device_dtype
from .embedded import adapter_digest, load_embedded
from .models import ChatModel, load_pretrained

EMBEDDED = "embedded"


def load_model(
    name_or_path: str = EMBEDDED,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs,
) -> ChatModel:
    """Load a chat model: ``"embedded"`` (the project's refusal model), a hub name, a folder or a .gguf file."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"Expected a model name: 'embedded', a hub name, a folder or a .gguf file; got {name_or_path!r}.")
    device, dtype = resolve_device_dtype(device, dtype)
    if name_or_path == EMBEDDED:
        return load_embedded(device=device, dtype=dtype)
    return load_pretrained(name_or_path, device, dtype, trust_remote_code, **from_pretrained_kwargs)


def model_identity_name(model: str) -> str:
    """The name a run records for a model: local paths resolved, so 'tiny', 'tiny/' and '/abs/tiny' are one model."""
    return os.path.realpath(model) if model != EMBEDDED and os.path.exists(model) else model


def model_version(name_or_path: str) -> str | None:
    """A short fingerprint of the weights a name refers to, or None for a hub name.

    ``"embedded"``: its adapter's hash; a local folder or file: the names, sizes and modification times of
    its files. Runs record it so that artifacts made with other weights under the same name are not reused.
    """
    if name_or_path == EMBEDDED:
        return adapter_digest()
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
