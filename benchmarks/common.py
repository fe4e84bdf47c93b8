"""Shared helpers for the benchmark scripts: model loading, timing, the final machine-readable line."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from refusal_helpers.loading import load_model
from refusal_helpers.models import ChatModel

RESULTS = Path(__file__).resolve().parent / "results"  # what `make bench` measured: benchmarks/RESULTS.md quotes it


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--save", action="store_true", help=f"keep the measurement in {RESULTS}/<benchmark>.json")
    p.add_argument("--model", default="embedded", help="'embedded', a model path/name, or tiny-<arch> for a smoke run")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--repeats", type=int, default=5)
    return p


def save(args, name: str, result: dict) -> None:
    """Keep a measurement (with --save) for benchmarks/RESULTS.md, which `python -m refusal_helpers.report` renders."""
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


def load(args) -> ChatModel:
    if args.model.startswith("tiny-"):
        from refusal_helpers.testing import tiny_chat_model

        return tiny_chat_model(args.model.removeprefix("tiny-"), n_layers=4)
    return load_model(args.model, device=args.device, dtype=args.dtype)


def machine(cm: ChatModel) -> str:
    if cm.device.type == "cuda":
        where = torch.cuda.get_device_name(cm.device)
    else:
        threads = torch.get_num_threads()
        where = f"{platform.processor() or platform.machine()}, {threads} thread{'' if threads == 1 else 's'}"
    return f"{cm.name} ({cm.dtype}) on {where}"


def sync(cm: ChatModel) -> None:
    if cm.device.type == "cuda":
        torch.cuda.synchronize(cm.device)


def timed(cm: ChatModel, fn) -> float:
    sync(cm)
    start = time.perf_counter()
    fn()
    sync(cm)
    return time.perf_counter() - start


def interleaved(cm: ChatModel, fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run alternately so machine noise hits both alike."""
    for fn in fns.values():  # warm-up
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(cm, fn))
    return {name: statistics.median(s) for name, s in samples.items()}
