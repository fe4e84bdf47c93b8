"""Part-way training state, so that a stopped `train` continues where it stopped instead of starting again.

While `fit` runs it writes ``resume.pt`` into the output folder every few steps: the LoRA weights, the
optimizer's and the learning-rate schedule's state, the random state and the losses so far, with what
identifies the training (the recipe, the examples). Running the same command again continues from there,
to the same adapter as an uninterrupted run; the file is removed once the adapter is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..embedded import LATER_KEYS
from ..files import atomic_write

FILE = "resume.pt"


class TrainingStopped(Exception):
    """A training stopped where it was asked to (`train(..., stop_after=...)`), its state saved to continue from."""

    def __init__(self, step: int, total_steps: int):
        super().__init__(f"stopped after step {step} of {total_steps}; the same training again continues from there")
        self.step, self.total_steps = step, total_steps


def saved_recipe(folder: Path) -> dict | None:
    """The recipe of a training that stopped part-way in `folder` (from its resume point), None if there is none."""
    path = Path(folder) / FILE
    return _with_later_keys(torch.load(path, weights_only=True)["identity"])["recipe"] if path.is_file() else None


def _with_later_keys(identity: dict) -> dict:
    """A saved identity whose recipe predates keys added since, with the values it had in effect (`LATER_KEYS`)."""
    return {**identity, "recipe": {**LATER_KEYS, **identity["recipe"]}} if "recipe" in identity else identity


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The parameters training updates (a peft model's LoRA weights), by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def examples_identity(examples: list[dict]) -> list[list[str]]:
    """What identifies a training's examples in a resume point: (kind, instruction, reply) of each, in order."""
    return [[e["kind"], e["instruction"], e["reply"]] for e in examples]


@dataclass
class ResumePoint:
    """Where `fit` saves and finds its part-way state; `identity` must match for a saved state to be used."""

    path: Path
    identity: dict
    every: int = 25  # optimizer steps between saves (one save costs well under a step of the embedded model)
    resumed_from: int = 0  # the step the last `load` continued from (0: from the start)
    earlier_seconds: float | None = 0.0  # training seconds of the runs before, up to that step (None: not recorded)
    started: float = field(default_factory=time.time)  # when this run's training started (reset by `load`)

    def load(self, model, optimizer: torch.optim.Optimizer, scheduler) -> tuple[int, list[float]]:
        """Restore the state an earlier run of the same training saved; (steps done, losses so far), (0, []) if none."""
        self.resumed_from, self.earlier_seconds, self.started = 0, 0.0, time.time()
        if not self.path.is_file():
            return 0, []
        state = torch.load(self.path, weights_only=True)
        saved = _with_later_keys(state["identity"])
        if saved != self.identity:
            differ = sorted(k for k in {*saved, *self.identity} if saved.get(k) != self.identity.get(k))
            raise ValueError(f"{self.path} holds part of another training (its {', '.join(differ)} differ): delete it "
                             "to start afresh, or train into another --out folder.")
        trainable = trainable_parameters(model)
        if state["lora"].keys() != trainable.keys():
            raise ValueError(f"{self.path} holds weights for other LoRA modules: delete it to start afresh.")
        with torch.no_grad():
            for name, weight in state["lora"].items():
                trainable[name].copy_(weight)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.resumed_from, self.earlier_seconds = state["step"], state.get("seconds")  # None: saved without it
        return state["step"], list(state["losses"])

    def seconds(self) -> float | None:
        """Training seconds up to now across every run of this training (None where an earlier one did not record them)."""
        return None if self.earlier_seconds is None else self.earlier_seconds + time.time() - self.started

    def timing(self, this_run: float) -> dict[str, float | None]:
        """A training log's times: the whole training's seconds (this run's `this_run` plus the earlier runs'; None
        where those were not recorded) and this run's."""
        whole = None if self.earlier_seconds is None else round(self.earlier_seconds + this_run, 1)
        return {"train_seconds": whole, "train_seconds_this_run": round(this_run, 1)}

    def save(self, model, optimizer: torch.optim.Optimizer, scheduler, step: int, losses: list[float]) -> None:
        """Write the state after `step` optimizer steps (atomically: a stop while writing keeps the previous one)."""
        state = {
            "identity": self.identity, "step": step, "losses": list(losses), "seconds": self.seconds(),
            "lora": {name: p.detach().clone() for name, p in trainable_parameters(model).items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda p: torch.save(state, p))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
