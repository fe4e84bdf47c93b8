"""Beyond the paper's single pick: an Optuna search over how strongly, and along what, each layer is ablated.

A trial folds a direction into the weights with a per-layer weight (Heretic's parametrisation): layer l's
attention and MLP output projections lose ``w_l`` of their component along r̂, ``W <- W - w_l r̂ r̂ᵀ W``, where
``w_l`` follows a triangular kernel over layers (its peak weight, the layer of the peak, its width in layers,
and the floor it falls to), and r̂ interpolates between adjacent layers' candidates at the run's position (a
fractional "direction layer"). The paper's choice is the corner of this space: weight 1 everywhere, the selected
layer's candidate. Each trial edits the weights in place and restores them from a saved copy (no reload).

Two objectives, minimised together (Optuna's multi-objective TPE): refusals on harmful validation prompts (the
judge's count) and the KL of harmless first-token predictions. `compare_on_test` then puts the best trial whose
validation KL is at most the paper direction's beside that direction, on the run's held-out test prompts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from .data import split_instructions
from .directions import normalize
from .evaluation import last_logits
from .files import atomic_write_json
from .judges import Judge, SubstringJudge, judged_completions, refused_count
from .metrics import kl_divergence
from .models import ChatModel
from .orthogonalize import orthogonalize_weights, untie_embeddings, writers
from .runs import RunFolder
from .selection import keep_consistent


@dataclass(frozen=True)
class Ablation:
    """One point of the search space."""

    peak: float  # the largest per-layer weight
    position: float  # the layer where the weight peaks (fractional)
    width: float  # layers from the peak to where the weight reaches the floor
    floor: float  # the weight far from the peak, as a fraction of the peak
    direction_layer: float  # which layer's candidate, interpolated between neighbours

    def weights(self, n_layers: int) -> list[float]:
        """Per-layer ablation weights: a triangle of height `peak` at `position`, falling to floor * peak."""
        return [self.peak * max(self.floor, 1 - abs(layer - self.position) / self.width) for layer in range(n_layers)]


def paper_ablation(layer: int, n_layers: int) -> Ablation:
    """The paper's directional ablation as a point of the space: weight 1 at every layer, the layer's candidate."""
    return Ablation(peak=1.0, position=0.0, width=float(n_layers), floor=1.0, direction_layer=float(layer))


def interpolated_direction(at_position: Float[Tensor, "layer d_model"], direction_layer: float) -> Float[Tensor, " d_model"]:
    """The unit direction between the candidates of the two layers around `direction_layer`."""
    low = int(math.floor(direction_layer))
    high = min(low + 1, at_position.shape[0] - 1)
    t = direction_layer - low
    return normalize((1 - t) * normalize(at_position[low].double()) + t * normalize(at_position[high].double()))


class WeightEdits:
    """`orthogonalize.orthogonalize_weights` with per-layer weights, undone exactly from a saved copy."""

    def __init__(self, cm: ChatModel):
        untie_embeddings(cm)
        self.cm = cm
        self.params = [p for module, _ in writers(cm) for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        self.saved = [p.detach().clone() for p in self.params]

    def apply(self, direction: Float[Tensor, " d_model"], weights: list[float]) -> None:
        """Restore the original weights, then remove `weights[l]` of the component along `direction` from layer l's
        writers."""
        self.restore()
        orthogonalize_weights(self.cm, direction, weights)

    @torch.no_grad()
    def restore(self) -> None:
        for param, original in zip(self.params, self.saved):
            param.copy_(original)

    @contextmanager
    def applied(self, direction: Tensor, weights: list[float]) -> Iterator[None]:
        self.apply(direction, weights)
        try:
            yield
        finally:
            self.restore()


@dataclass
class Measured:
    refused: int
    n: int
    kl: float


def measure(cm: ChatModel, harmful: list[str], harmless: list[str], base_logits: Tensor, judge: Judge,
            max_new_tokens: int, batch_size: int = 32) -> Measured:
    """Refusals on `harmful` and mean first-token KL on `harmless` (against `base_logits`) of the model as it is."""
    items = judged_completions(cm, harmful, max_new_tokens, batch_size, judge=judge)
    kl = float(kl_divergence(base_logits, last_logits(cm, harmless, batch_size)).mean())
    return Measured(refused_count(items), len(items), kl)


def search(
    cm: ChatModel, at_position: Float[Tensor, "layer d_model"], harmful: list[str], harmless: list[str],
    n_trials: int = 100, timeout: float | None = 720.0, seed: int = 0, judge: Judge | None = None,
    max_new_tokens: int = 12, paper_layer: int | None = None, progress: bool = True,
) -> dict:
    """Optuna's multi-objective search; returns every trial, the Pareto front and the paper's point."""
    import optuna

    judge = judge or SubstringJudge()
    edits = WeightEdits(cm)
    base = last_logits(cm, harmless)
    n = cm.n_layers

    def run(ablation: Ablation) -> Measured:
        direction = interpolated_direction(at_position, ablation.direction_layer)
        with edits.applied(direction, ablation.weights(n)):
            return measure(cm, harmful, harmless, base, judge, max_new_tokens)

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        ablation = Ablation(peak=trial.suggest_float("peak", 0.5, 1.5), position=trial.suggest_float("position", 0, n - 1),
                            width=trial.suggest_float("width", 1, n), floor=trial.suggest_float("floor", 0, 1),
                            direction_layer=trial.suggest_float("direction_layer", 0, n - 1))
        measured = run(ablation)
        trial.set_user_attr("kl", measured.kl)
        return measured.refused, measured.kl

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True))
    started = time.time()
    paper = None
    if paper_layer is not None:  # the paper's direction, measured the same way, is also the first trial
        point = paper_ablation(paper_layer, n)
        study.enqueue_trial({k: v for k, v in asdict(point).items()})
        paper = asdict(point)
    study.optimize(objective, n_trials=n_trials, timeout=timeout, show_progress_bar=progress)
    trials = [{"number": t.number, "params": t.params, "refused": t.values[0], "kl": t.values[1]}
              for t in study.trials if t.values is not None]
    return {"n_trials": len(trials), "seconds": round(time.time() - started, 1), "seed": seed, "judge": judge.name,
            "max_new_tokens": max_new_tokens, "n_harmful": len(harmful), "n_harmless": len(harmless),
            "trials": trials, "pareto": sorted(t.number for t in study.best_trials), "paper": paper}


def best_at_most(result: dict, kl: float) -> dict:
    """The trial with the fewest refusals among those whose KL is at most `kl` (ties: the lower KL)."""
    eligible = [t for t in result["trials"] if t["kl"] <= kl]
    if not eligible:
        raise ValueError(f"No trial has a KL of at most {kl:.4f}.")
    return min(eligible, key=lambda t: (t["refused"], t["kl"]))


def compare_on_test(cm: ChatModel, at_position: Tensor, trial: dict, paper_layer: int, harmful: list[str],
                    harmless: list[str], judge: Judge | None = None, max_new_tokens: int = 48) -> dict:
    """The chosen trial and the paper's direction, side by side on held-out prompts: refusals and KL."""
    judge = judge or SubstringJudge()
    edits = WeightEdits(cm)
    base = last_logits(cm, harmless)
    out = {}
    for name, ablation in (("paper", paper_ablation(paper_layer, cm.n_layers)), ("search", Ablation(**trial["params"]))):
        with edits.applied(interpolated_direction(at_position, ablation.direction_layer), ablation.weights(cm.n_layers)):
            out[name] = {**asdict(measure(cm, harmful, harmless, base, judge, max_new_tokens)), "ablation": asdict(ablation)}
    return out


def plot_pareto(result: dict, title: str = "Search: refusals against KL"):
    """Every trial's (KL, refusals), the Pareto front joined, the paper's direction marked."""
    import plotly.graph_objects as go

    trials = result["trials"]
    pareto = sorted((t for t in trials if t["number"] in result["pareto"]), key=lambda t: t["kl"])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=[t["kl"] for t in trials], y=[t["refused"] for t in trials], mode="markers",
                             name="trials", marker=dict(color="lightgray", size=6),
                             text=[f"trial {t['number']}" for t in trials]))
    fig.add_trace(go.Scatter(x=[t["kl"] for t in pareto], y=[t["refused"] for t in pareto], mode="lines+markers",
                             name="Pareto front", marker=dict(color="steelblue", size=8)))
    first = trials[0] if result["paper"] is not None else None
    if first is not None:
        fig.add_trace(go.Scatter(x=[first["kl"]], y=[first["refused"]], mode="markers", name="the paper's direction",
                                 marker=dict(symbol="star", size=16, color="crimson")))
    fig.update_layout(title=title, xaxis_title="KL on harmless validation prompts (nats)",
                      yaxis_title=f"harmful validation prompts refused (of {result['n_harmful']})")
    return fig


def search_run(run: str | Path, out: str | Path, n_trials: int = 100, timeout: float | None = 720.0, judge: Judge | None = None,
               n_val: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """`search` on a finished run's model, around its selected position, then `compare_on_test` on its test prompts;
    writes search.json and pareto.html into `out` and returns the record."""
    folder = RunFolder(run)
    summary = folder.summary()
    direction, selection = folder.direction()
    cm = folder.load_model()
    at_position = folder.candidates()[selection["position_index"]]
    harmful, harmless = (split_instructions("bundled", kind, "val", n_val) for kind in ("harmful", "harmless"))
    if summary["filter"]["val"]:
        harmful, harmless = keep_consistent(cm, harmful, harmless)
    result = search(cm, at_position, harmful, harmless, n_trials, timeout, seed, judge, paper_layer=selection["layer"],
                    progress=progress)
    paper_kl = result["trials"][0]["kl"]
    chosen = best_at_most(result, paper_kl)
    test = {kind: [item["instruction"] for item in folder.completions(f"{kind}_baseline")["items"]]
            for kind in ("harmful", "harmless")}
    result["chosen"] = chosen
    result["test"] = compare_on_test(cm, at_position, chosen, selection["layer"], test["harmful"], test["harmless"],
                                     judge, summary["sizes"]["max_new_tokens"])
    result["run"], result["model_version"] = folder.label, (folder.identity() or {}).get("model_version")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "search.json", result)
    plot_pareto(result).write_html(str(out / "pareto.html"), include_plotlyjs="cdn")
    return result
