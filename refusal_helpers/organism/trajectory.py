"""Where the direction comes from: what the organism's training does to the difference of means, step by step.

`Trajectory` is a `train` callback. Before the first step (the untuned model) and after every tenth of the
steps it records, on the model being trained: the difference-of-means candidates at every post-instruction
position and layer (the pipeline's training prompts), the mean logit refusal score on the harmful and
harmless validation prompts, and the substring refusal rate on a fixed sample of them. `add_final_direction`
adds, once a pipeline run has selected the direction, each checkpoint's cosine with it per layer.

Files (in ``<adapter folder>/trajectory/``, no adapters): ``candidates.safetensors`` (float16, checkpoint x
position x layer x d_model, and the steps) and ``trajectory.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..activations import mean_activations
from ..data import load_instructions
from ..directions import diff_of_means, zero_dims
from ..evaluation import refusal_scores
from ..files import atomic_write, atomic_write_json
from ..judges import judged_completions, refused_count
from ..models import ChatModel
from ..spreads import at_shares
from .training import StepCallback

FOLDER = "trajectory"


@dataclass
class TrajectorySettings:
    every: float = 0.1  # fraction of the training steps between checkpoints
    n_train: int = 128  # training instructions per kind for the means (the pipeline's default)
    n_sample: int = 32  # validation instructions per kind generated on
    max_new_tokens: int = 48
    batch_size: int = 32


class Trajectory:
    """Records checkpoints of a training run into `folder`/trajectory; pass it as ``train(..., on_step=it)``."""

    def __init__(self, folder: Path, settings: TrajectorySettings | None = None):
        self.folder = Path(folder) / FOLDER
        self.settings = settings or TrajectorySettings()
        if not 0 < self.settings.every <= 1:
            raise ValueError(f"every is a fraction of the training steps in (0, 1], got {self.settings.every}.")
        self.checkpoints: list[dict] = []
        self.candidates: list[torch.Tensor] = []

    def __call__(self, cm: ChatModel, total_steps: int) -> StepCallback:
        n = round(1 / self.settings.every)
        due = sorted({0, *(round(k * total_steps / n) for k in range(1, n + 1))})
        s = self.settings
        data = {kind: load_instructions(kind, "train", s.n_train) for kind in ("harmful", "harmless")}
        val = {kind: load_instructions(kind, "val") for kind in ("harmful", "harmless")}
        started = False

        def on_step(step: int, losses: list[float]) -> None:
            nonlocal started
            if not started:  # the step training starts from: 0, or where a resumed training continues
                started = True
                self._restore(step)
            if step not in due or any(c["step"] == step for c in self.checkpoints):
                return
            was_training = cm.model.training
            cm.model.eval()
            try:
                self._record(cm, step, total_steps, losses, data, val)
            finally:
                cm.model.train(was_training)

        return on_step

    def _record(self, cm: ChatModel, step: int, total: int, losses: list[float], data: dict, val: dict) -> None:
        s = self.settings
        means = [mean_activations(cm, data[kind], batch_size=s.batch_size, progress=f"trajectory {step}: {kind} means")
                 for kind in ("harmful", "harmless")]
        candidates = diff_of_means(*means).float()
        scores = {kind: float(refusal_scores(cm, val[kind], s.batch_size).mean()) for kind in val}
        rates = {kind: refused_count(judged_completions(cm, val[kind][: s.n_sample], s.max_new_tokens, s.batch_size))
                 / min(s.n_sample, len(val[kind])) for kind in val}
        self.candidates.append(candidates)
        self.checkpoints.append({
            "step": step, "fraction": round(step / total, 4),
            "loss": None if not losses else sum(losses[-20:]) / len(losses[-20:]),
            "refusal_score": scores, "refusal_rate": rates,
            "norm_last_position": [round(float(x), 4) for x in candidates[-1].norm(dim=-1)],
        })
        self._save(cm.post_instruction_positions)

    def _restore(self, step: int) -> None:
        """Start afresh (`step` 0), or keep the checkpoints a stopped training recorded up to `step`."""
        self.checkpoints, self.candidates = [], []
        if step == 0 or not (self.folder / "trajectory.json").is_file():
            return
        record, candidates = load_trajectory(self.folder.parent)
        if record["settings"] != asdict(self.settings):
            raise ValueError(f"The trajectory in {self.folder} was recorded with other settings ({record['settings']}): "
                             "delete the folder to record it afresh with the training.")
        kept = [i for i, c in enumerate(record["checkpoints"]) if c["step"] <= step]
        self.checkpoints = [record["checkpoints"][i] for i in kept]
        self.candidates = [candidates[i] for i in kept]

    def _save(self, positions: list[int]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {"candidates": torch.stack(self.candidates).half().contiguous(),
                   "steps": torch.tensor([c["step"] for c in self.checkpoints])}
        record = {"settings": asdict(self.settings), "positions": positions, "checkpoints": self.checkpoints}
        atomic_write(self.folder / "candidates.safetensors", lambda p: save_file(tensors, str(p)))
        atomic_write_json(self.folder / "trajectory.json", record)


def load_trajectory(folder: Path) -> tuple[dict, torch.Tensor]:
    """(trajectory.json's record, candidates of shape (checkpoint, position, layer, d_model) in float32)."""
    root = Path(folder) / FOLDER
    if not (root / "trajectory.json").is_file():
        raise FileNotFoundError(f"No trajectory in {root}: train with `python -m refusal_helpers.organism train "
                                f"--out {folder} --trajectory`.")
    return json.loads((root / "trajectory.json").read_text()), load_file(str(root / "candidates.safetensors"))["candidates"].float()


def add_final_direction(folder: Path, direction: torch.Tensor, position: int, layer: int, dims: list[int],
                        run: str) -> dict:
    """Store each checkpoint's cosine with the selected `direction`, per layer at its `position` (with the run's
    zeroed `dims` zeroed in the checkpoints' candidates too), in trajectory.json; returns the record."""
    record, candidates = load_trajectory(folder)
    index = record["positions"].index(position)
    at_position = zero_dims(candidates[:, index], dims)  # (checkpoint, layer, d_model)
    cosine = torch.nn.functional.cosine_similarity(at_position, direction.float().expand_as(at_position), dim=-1)
    record["final"] = {"run": run, "position": position, "layer": layer, "zero_dims": list(dims),
                       "cosine": [[round(float(c), 4) for c in row] for row in cosine]}
    atomic_write_json(Path(folder) / FOLDER / "trajectory.json", record)
    return record


def trajectory_agreement(reference: Path, other: Path, position: int, dims: list[int]) -> dict:
    """Two trainings' candidates checkpoint by checkpoint (two seeds of one recipe, both with a trajectory), at the
    checkpoints they share by share of training (`spreads.at_shares`, so trainings of other step counts pair up): per
    checkpoint and layer at `position`, with `dims` zeroed, the cosine between their difference-of-means candidates;
    where both start from the untuned model, also the cosine between what each training added to its candidate
    (a checkpoint's minus the untuned one's; None at the start) and the size of `reference`'s addition relative to
    the untuned candidate."""
    (ours, our_candidates), (theirs, their_candidates) = load_trajectory(reference), load_trajectory(other)
    for key in ("settings", "positions"):
        if ours[key] != theirs[key]:
            raise ValueError(f"The trajectories of {reference} and {other} were recorded with other {key}: "
                             f"{ours[key]} and {theirs[key]}.")
    fractions = [[c["fraction"] for c in record["checkpoints"]] for record in (ours, theirs)]
    at = at_shares(fractions[1], fractions[0])  # theirs at each of our checkpoints' shares of training
    ours_at = [i for i, j in enumerate(at) if j is not None]
    theirs_at = [at[i] for i in ours_at]
    shared = [fractions[0][i] for i in ours_at]
    if not shared:
        raise ValueError(f"The trajectories of {reference} and {other} share no checkpoint (a training stopped early?).")
    if position not in ours["positions"]:
        raise ValueError(f"Position {position} is not among the trajectories' positions {ours['positions']}.")
    index = ours["positions"].index(position)
    a = zero_dims(our_candidates[ours_at, index], dims)  # (checkpoint, layer, d_model)
    b = zero_dims(their_candidates[theirs_at, index], dims)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    result = {"position": position, "zero_dims": list(dims), "settings": ours["settings"], "fractions": shared,
              "steps": [ours["checkpoints"][i]["step"] for i in ours_at],
              "cosine_per_layer": [[round(float(c), 3) for c in row] for row in cosine]}
    if shared[0] == 0.0 and len(shared) > 1:  # both start from the untuned model: compare what training added
        added = torch.nn.functional.cosine_similarity(a[1:] - a[0], b[1:] - b[0], dim=-1)
        result["added_cosine_per_layer"] = [None, *([round(float(c), 3) for c in row] for row in added)]
        result["added_norm_ratio"] = [None, *([round(float(r), 3) for r in row] for row in
                                              (a[1:] - a[0]).norm(dim=-1) / a[0].norm(dim=-1).clamp_min(1e-12))]
    return result
