"""The paper's selection rule on a score table: its filters and its choice. Pure; nothing here runs a model.

Every candidate r has three scores on validation prompts (`scoring.score_candidates` computes them):

- ``bypass``: mean refusal score on harmful prompts with r ablated everywhere (lower is better);
- ``induce``: mean refusal score on harmless prompts with r added at its layer (must be high enough);
- ``kl``: mean KL divergence on harmless prompts between the plain and the ablated model (must be small).

Candidates from the last 20% of layers (``layer >= int(0.8 * n_layers)``, as the paper's code prunes), with a
KL above its threshold, an induce score below its threshold or any score NaN are discarded; the lowest bypass
score wins. Thresholds are inclusive (``kl <= kl_threshold``, ``induce >= induce_threshold``), as in the
paper's code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor


@dataclass
class SelectionConfig:
    """The paper's filters; its thresholds are KL 0.1 and induce score 0.0."""

    max_layer_fraction: float = 0.8
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.max_layer_fraction <= 1:
            raise ValueError(f"max_layer_fraction is a fraction of the depth in (0, 1], got {self.max_layer_fraction}.")
        if not self.kl_threshold >= 0:  # also rejects NaN
            raise ValueError(f"kl_threshold bounds a KL divergence, so it must be >= 0, got {self.kl_threshold}.")
        if self.induce_threshold != self.induce_threshold:
            raise ValueError("induce_threshold is NaN: no candidate could pass it.")


@dataclass
class ScoreTable:
    """Scores per candidate, shape (n_positions, n_layers); NaN where a score was not computed."""

    positions: list[int]
    bypass: Float[Tensor, "pos layer"]
    induce: Float[Tensor, "pos layer"]
    kl: Float[Tensor, "pos layer"]
    baseline_harmful: float = float("nan")
    baseline_harmless: float = float("nan")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bypass.shape)

    def to_dict(self) -> dict:
        def clean(t: Tensor) -> list:
            return [[None if v != v else round(float(v), 6) for v in row] for row in t.tolist()]

        return {"positions": self.positions, "bypass": clean(self.bypass), "induce": clean(self.induce),
                "kl": clean(self.kl), "baseline_harmful": self.baseline_harmful,
                "baseline_harmless": self.baseline_harmless}

    @classmethod
    def from_dict(cls, d: dict) -> ScoreTable:
        def tensor(rows):
            return torch.tensor([[float("nan") if v is None else v for v in row] for row in rows])

        return cls(d["positions"], tensor(d["bypass"]), tensor(d["induce"]), tensor(d["kl"]),
                   d["baseline_harmful"], d["baseline_harmless"])


@dataclass
class Selection:
    """The chosen candidate and why."""

    position_index: int
    position: int  # negative offset from the end of the prompt
    layer: int
    bypass: float
    induce: float
    kl: float
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def allowed_layers(n_layers: int, max_layer_fraction: float) -> int:
    """How many of the first layers the rule keeps: ``int(max_layer_fraction * n_layers)``, the paper's pruning
    (layer 22 of a 28-layer model is pruned: int(22.4) = 22)."""
    return int(n_layers * max_layer_fraction)


def layer_mask(n_positions: int, n_layers: int, max_layer_fraction: float) -> Bool[Tensor, "pos layer"]:
    """True for candidates whose layer the rule keeps (see `allowed_layers`)."""
    allowed = torch.arange(n_layers) < allowed_layers(n_layers, max_layer_fraction)
    return allowed.expand(n_positions, n_layers).clone()


def passing_mask(table: ScoreTable, config: SelectionConfig) -> Bool[Tensor, "pos layer"]:
    """Candidates that pass every filter (NaN scores never pass)."""
    n_pos, n_layers = table.shape
    return (
        layer_mask(n_pos, n_layers, config.max_layer_fraction)
        & (table.kl <= config.kl_threshold)
        & (table.induce >= config.induce_threshold)
        & ~torch.isnan(table.bypass)
    )


def candidate_order(bypass: Float[Tensor, "pos layer"]) -> list[tuple[int, int]]:
    """(position index, layer) pairs by ascending bypass score; NaNs last; ties by position, then layer."""
    n_pos, n_layers = bypass.shape
    cells = [(p, l) for p in range(n_pos) for l in range(n_layers)]
    return sorted(cells, key=lambda c: (math.isnan(float(bypass[c])), 0.0 if math.isnan(float(bypass[c])) else float(bypass[c])))


def choose(table: ScoreTable, config: SelectionConfig | None = None) -> Selection:
    """The passing candidate with the lowest bypass score; a ValueError saying why when none passes."""
    config = config or SelectionConfig()
    passing = passing_mask(table, config)
    for p, l in candidate_order(table.bypass):
        if passing[p, l]:
            return Selection(p, table.positions[p], l, float(table.bypass[p, l]), float(table.induce[p, l]),
                             float(table.kl[p, l]), asdict(config))
    allowed = layer_mask(*table.shape, config.max_layer_fraction)
    lowest_kl = _nanmin(table.kl[allowed])
    kl_note = (f"lowest KL among allowed layers: {lowest_kl:.3f}" if lowest_kl == lowest_kl else
               "KL was not computed: lazy scoring computes it only for candidates that pass the induce filter")
    raise ValueError(
        "No candidate direction passes the filters "
        f"(layers < {allowed_layers(table.shape[1], config.max_layer_fraction)} of {table.shape[1]}, KL <= "
        f"{config.kl_threshold}, induce >= {config.induce_threshold}). Highest induce among allowed layers: "
        f"{_nanmax(table.induce[allowed]):.3f}; {kl_note}. Relax the thresholds (--induce-threshold, --kl-threshold; "
        "small models often need a larger KL threshold), and see every score with --selection-mode exhaustive."
    )


def _nanmin(t: Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.min()) if t.numel() else float("nan")


def _nanmax(t: Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.max()) if t.numel() else float("nan")
