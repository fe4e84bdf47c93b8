"""Where a model runs and in which precision: the defaults, and clear errors for what the library cannot use."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device_dtype(
    device: torch.device | str | None, dtype: torch.dtype | str | None
) -> tuple[torch.device, torch.dtype]:
    """The device and dtype a model loads with: None means the default device and that device's default dtype;
    a dtype may be named ('float32', 'float16', 'bfloat16')."""
    try:
        device = torch.device(device) if device is not None else default_device()
    except RuntimeError:
        raise ValueError(f"Unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but this torch sees no CUDA GPU (torch {torch.__version__}, "
                         "torch.cuda.is_available() is False): use device='cpu', or install a CUDA build of torch.")
    if device.type == "mps":
        raise ValueError("Apple's MPS backend has no float64, which this library uses for exact means, projections "
                         "and scores: use device='cpu' (the embedded model is sized for a CPU) or a CUDA GPU.")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {str(device)!r}: expected 'cpu', 'cuda' or 'cuda:N'.")
    if dtype is None:
        return device, default_dtype(device)
    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        except KeyError:
            raise ValueError(f"Unknown dtype {dtype!r}: expected float32, float16 or bfloat16.") from None
    return device, dtype
