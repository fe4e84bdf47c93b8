"""Choosing the refusal direction among the (position, layer) candidates, as in Arditi et al. (2024).

Every candidate r gets three scores on validation prompts:

- ``bypass``: mean refusal score on harmful prompts with r ablated everywhere (lower is better);
- ``induce``: mean refusal score on harmless prompts with r added at its layer (must be high enough);
- ``kl``: mean KL divergence on harmless prompts between the plain and the ablated model (must be small).

Candidates from the last 20% of layers, with KL above a threshold or with too low an induce score are
discarded; the one with the lowest bypass score wins. ``score_candidates`` computes the table (only as
much of it as the choice needs in ``mode="lazy"``); ``choose`` is the pure rule on a table.

Speed: ablated passes share the prompts' common prefix through a KV cache computed once per candidate
(``evaluation.variant_last_logits``), all passes keep last-position logits only, and addition passes
start at the candidate's layer from a cached residual stream.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from .activations import residual_activations
from .directions import ZERO_NORM
from .evaluation import SharedPrefixPrompts, start_at_layer, variant_last_logits
from .interventions import ablation_hook, addition_hook, hook_names
from .metrics import kl_divergence, refusal_score
from .models import ChatModel


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

        return {
            "positions": self.positions,
            "bypass": clean(self.bypass),
            "induce": clean(self.induce),
            "kl": clean(self.kl),
            "baseline_harmful": self.baseline_harmful,
            "baseline_harmless": self.baseline_harmless,
        }

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


def layer_mask(n_positions: int, n_layers: int, max_layer_fraction: float) -> Bool[Tensor, "pos layer"]:
    """True for candidates whose layer lies below `max_layer_fraction` of the depth."""
    allowed = torch.arange(n_layers) < max_layer_fraction * n_layers
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
    return sorted(cells, key=lambda c: (torch.isnan(bypass[c]).item(), float(bypass[c]) if not torch.isnan(bypass[c]) else 0.0))


def choose(table: ScoreTable, config: SelectionConfig | None = None) -> Selection:
    """The passing candidate with the lowest bypass score."""
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
        f"(layers < {config.max_layer_fraction:.0%} of depth, KL <= {config.kl_threshold}, induce >= "
        f"{config.induce_threshold}). Highest induce among allowed layers: {_nanmax(table.induce[allowed]):.3f}; "
        f"{kl_note}. Relax the thresholds (--induce-threshold, --kl-threshold; small models often need a larger "
        "KL threshold), and see every score with --selection-mode exhaustive."
    )


def _nanmin(t: Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.min()) if t.numel() else float("nan")


def _nanmax(t: Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.max()) if t.numel() else float("nan")


# ----- computing the scores ------------------------------------------------------------------------
class _Scorer:
    """Runs the three measurements for batches of candidates on pre-tokenised validation prompts."""

    def __init__(self, cm: ChatModel, candidates: Tensor, harmful: list[str], harmless: list[str], batch_size: int):
        self.cm, self.candidates, self.batch_size = cm, candidates, batch_size
        self.harmful = SharedPrefixPrompts.from_instructions(cm, harmful)
        self.harmless = SharedPrefixPrompts.from_instructions(cm, harmless)
        self.harmless_inputs = cm.tokenize(harmless)  # padded, for running from a layer (induce)
        self.refusal_ids = cm.refusal_token_ids
        self.base_harmless_logits = variant_last_logits(cm, self.harmless, 1, lambda rows: {}, batch_size)[0]
        self.base_harmful_logits = variant_last_logits(cm, self.harmful, 1, lambda rows: {}, batch_size)[0]
        self._resid_cache: dict[int, Tensor] = {}
        self._hook_names = hook_names(cm)

    def _ablated_logits(self, prompts: SharedPrefixPrompts, cells: list[tuple[int, int]]) -> Tensor:
        """Last logits (candidate, prompt, vocab) with each candidate's direction ablated everywhere."""
        dirs = torch.stack([self.candidates[p, l] for p, l in cells])  # (k, d)

        def ablation_hooks(rows: Tensor) -> dict:
            fn = ablation_hook(dirs[rows].unsqueeze(1))  # one direction per sequence: (b, 1, d)
            return {name: fn for name in self._hook_names}

        return variant_last_logits(self.cm, prompts, len(cells), ablation_hooks, self.batch_size)

    def bypass(self, cells: list[tuple[int, int]]) -> Tensor:
        logits = self._ablated_logits(self.harmful, cells)
        return refusal_score(logits.flatten(0, 1), self.refusal_ids).view(len(cells), -1).mean(1)

    def kl(self, cells: list[tuple[int, int]]) -> Tensor:
        logits = self._ablated_logits(self.harmless, cells)
        base = self.base_harmless_logits.expand_as(logits)
        return kl_divergence(base.flatten(0, 1), logits.flatten(0, 1)).view(len(cells), -1).mean(1)

    def _resid_pre(self, layer: int) -> Tensor:
        """Harmless residual stream entering `layer` (all positions), cached once per layer."""
        if layer not in self._resid_cache:
            inputs = self.harmless_inputs
            n, seq = inputs["input_ids"].shape
            every_position = list(range(-seq, 0))
            self._resid_cache[layer] = torch.cat([
                residual_activations(self.cm, {k: v[start : start + self.batch_size] for k, v in inputs.items()},
                                     every_position, [layer])[:, :, 0]
                for start in range(0, n, self.batch_size)
            ])
        return self._resid_cache[layer]

    @torch.inference_mode()
    def induce(self, cells: list[tuple[int, int]]) -> Tensor:
        """Refusal score on harmless prompts with each candidate added at its own layer.

        The layers below the candidate's are unchanged by the addition, so their output (the cached
        residual stream entering that layer) is reused and only the layers above run.
        """
        scores = torch.empty(len(cells))
        n = self.harmless_inputs["input_ids"].shape[0]
        by_layer: dict[int, list[int]] = {}
        for i, (_, layer) in enumerate(cells):
            by_layer.setdefault(layer, []).append(i)
        for layer, members in by_layer.items():
            vecs = torch.stack([self.candidates[cells[i]] for i in members])
            rows = torch.arange(n).repeat(len(members))
            per_row = vecs.repeat_interleave(n, dim=0).unsqueeze(1)  # (k*n, 1, d)
            logits = []
            for start in range(0, len(rows), self.batch_size):
                sl = slice(start, start + self.batch_size)
                idx = rows[sl].to(self.cm.device)
                batch = {k: v[idx] for k, v in self.harmless_inputs.items()}
                resid = self._resid_pre(layer)[idx]
                with start_at_layer(self.cm, layer, addition_hook(per_row[sl])(resid)):
                    logits.append(self.cm.forward(batch, logits_to_keep=1)[:, -1].float())
            per = refusal_score(torch.cat(logits), self.refusal_ids).view(len(members), n).mean(1).cpu()
            scores[members] = per
        return scores


def score_candidates(
    cm: ChatModel,
    candidates: Float[Tensor, "pos layer d_model"],
    harmful_val: list[str],
    harmless_val: list[str],
    config: SelectionConfig | None = None,
    mode: str = "lazy",
    batch_size: int = 32,
    progress: bool = True,
) -> ScoreTable:
    """Score candidates on validation prompts.

    ``mode="exhaustive"`` fills the whole table (for plots). ``mode="lazy"`` computes the bypass score
    of every candidate in the allowed layers, then KL and induce scores in order of increasing bypass
    score until the first candidate passes: the same choice, far fewer forward passes.
    """
    if mode not in ("lazy", "exhaustive"):
        raise ValueError(f"mode must be 'lazy' or 'exhaustive', got {mode!r}.")
    if not harmful_val or not harmless_val:
        raise ValueError("Direction selection needs non-empty harmful and harmless validation sets.")
    if candidates.ndim != 3 or candidates.shape[1] != cm.n_layers or candidates.shape[2] != cm.d_model:
        raise ValueError(
            f"candidates must have shape (n_positions, n_layers={cm.n_layers}, d_model={cm.d_model}), "
            f"got {tuple(candidates.shape)}."
        )
    if not torch.isfinite(candidates).all():
        raise ValueError("candidates contain NaN or inf values.")
    config = config or SelectionConfig()
    n_pos, n_layers, _ = candidates.shape
    positions = cm.post_instruction_positions[-n_pos:]
    scorer = _Scorer(cm, candidates.to(torch.float32), harmful_val, harmless_val, batch_size)
    nan = torch.full((n_pos, n_layers), float("nan"))
    table = ScoreTable(
        positions, nan.clone(), nan.clone(), nan.clone(),
        baseline_harmful=float(refusal_score(scorer.base_harmful_logits, scorer.refusal_ids).mean()),
        baseline_harmless=float(refusal_score(scorer.base_harmless_logits, scorer.refusal_ids).mean()),
    )
    nonzero = candidates.norm(dim=-1) > ZERO_NORM
    allowed = nonzero if mode == "exhaustive" else nonzero & layer_mask(n_pos, n_layers, config.max_layer_fraction)
    cells = [(p, l) for p in range(n_pos) for l in range(n_layers) if allowed[p, l]]
    # Candidates per call: about 8 batches of rows, so batches hold one or two prompts (little padding).
    group = max(1, 8 * batch_size // max(len(harmful_val), len(harmless_val)))

    def run(metric: str, todo: list[tuple[int, int]], desc: str) -> None:
        fn = getattr(scorer, metric)
        bar = tqdm(total=len(todo), desc=desc, disable=not progress, leave=False)
        for start in range(0, len(todo), group):
            chunk = todo[start : start + group]
            values = fn(chunk)
            for (p, l), v in zip(chunk, values):
                getattr(table, metric)[p, l] = v
            bar.update(len(chunk))
        bar.close()

    run("bypass", cells, "selection: bypass scores")
    if mode == "exhaustive":
        run("induce", cells, "selection: induce scores")
        run("kl", cells, "selection: KL")
        return table
    in_layers = layer_mask(n_pos, n_layers, config.max_layer_fraction)
    for p, l in tqdm(candidate_order(table.bypass), desc="selection: checking filters", disable=not progress, leave=False):
        if torch.isnan(table.bypass[p, l]) or not in_layers[p, l]:
            continue
        table.induce[p, l] = scorer.induce([(p, l)])[0]
        if table.induce[p, l] < config.induce_threshold:
            continue
        table.kl[p, l] = scorer.kl([(p, l)])[0]
        if table.kl[p, l] <= config.kl_threshold:
            break
    return table


def select_direction(
    cm: ChatModel,
    candidates: Float[Tensor, "pos layer d_model"],
    harmful_val: list[str],
    harmless_val: list[str],
    config: SelectionConfig | None = None,
    mode: str = "lazy",
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[Selection, Float[Tensor, "d_model"], ScoreTable]:
    """Score the candidates, choose one, and return (selection, its direction, the score table)."""
    config = config or SelectionConfig()
    table = score_candidates(cm, candidates, harmful_val, harmless_val, config, mode, batch_size, progress)
    selection = choose(table, config)
    return selection, candidates[selection.position_index, selection.layer].clone(), table
