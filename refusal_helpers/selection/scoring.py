"""Computing the score table of `rule`: bypass, induce and KL of every candidate on validation prompts.

``score_candidates`` computes the table (only as much of it as the choice needs in ``mode="lazy"``);
``select_direction`` scores and chooses, as the pipeline does; ``keep_consistent`` is the paper's filter of
validation (and training) prompts by the model's own baseline refusal score.

Speed: ablated passes share the prompts' common prefix through a KV cache computed once per candidate
(`engine.variant_last_logits`), all passes keep last-position logits only, and addition passes start at the
candidate's layer from a cached residual stream (`engine.start_at_layer`).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..activations import residual_activations
from ..directions import ZERO_NORM
from ..evaluation import refusal_scores
from ..hookpoints import hook_names
from ..interventions import ablation_hook, addition_hook
from ..metrics import kl_divergence, refusal_score
from ..models import ChatModel
from .engine import SharedPrefixPrompts, start_at_layer, variant_last_logits
from .rule import ScoreTable, Selection, SelectionConfig, allowed_layers, candidate_order, choose, layer_mask


def keep_consistent(
    cm: ChatModel, harmful: list[str], harmless: list[str], batch_size: int = 32
) -> tuple[list[str], list[str]]:
    """The paper's data filter: harmful prompts whose baseline refusal score is > 0 (the model refuses them)
    and harmless prompts whose score is < 0 (it does not), in their order."""
    kept = []
    for instructions, keep in ((harmful, lambda s: s > 0), (harmless, lambda s: s < 0)):
        scores = refusal_scores(cm, instructions, batch_size)
        kept.append([x for x, s in zip(instructions, scores.tolist()) if keep(s)])
    return kept[0], kept[1]


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
    if not cells:
        raise ValueError(f"Every candidate in the layers the rule keeps (below int({config.max_layer_fraction} * "
                         f"{n_layers}) = {allowed_layers(n_layers, config.max_layer_fraction)}) is zero: at template "
                         "positions layer 0 is the same token's embedding in every prompt. Use a deeper model, or a "
                         "larger --max-layer-fraction.")
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
) -> tuple[Selection, Float[Tensor, " d_model"], ScoreTable]:
    """Score the candidates, choose one, and return (selection, its direction, the score table)."""
    config = config or SelectionConfig()
    table = score_candidates(cm, candidates, harmful_val, harmless_val, config, mode, batch_size, progress)
    selection = choose(table, config)
    return selection, candidates[selection.position_index, selection.layer].clone(), table
