"""What ablating each candidate costs and what it removes: the trade-off behind the CE-under-ablation figure.

For each (position, layer) candidate of a finished run, `ablation_sweep` measures

- ``ce_increase``: the rise in cross-entropy of harmless completions when the candidate is ablated at
  every layer and position (the paper's ablation), and ``ce_increase_spared`` with each prompt's first
  token (in most models an attention sink with massive activations) left untouched;
- ``refused`` / ``refused_spared``: how many harmful prompts are still refused under that ablation,
  generated only where the matching CE increase is at most ``generate_below`` (generation is the slow part,
  and a candidate that costs more fails the coherence check whatever it removes).

The paper's selection rule (`selection/`) never sees CE (the embedded model's preset bounds the CE of the
direction it chooses, on validation: `presets.py`); this sweep shows which candidates would meet a CE target at
all. ``python -m refusal_helpers sweep`` runs it on a run folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from .batching import check_instructions
from .data import split_instructions
from .evaluation import completion_loss
from .interventions import ablate
from .judges import judged_completions, refused_count
from .models import ChatModel
from .runs import RunFolder


@dataclass
class CandidateCost:
    """One candidate's CE increases (nats/token) and harmful prompts left refused (None: not generated)."""

    position: int
    layer: int
    ce_increase: float
    ce_increase_spared: float
    refused: int | None
    refused_spared: int | None


def ablation_sweep(
    cm: ChatModel,
    candidates: Float[Tensor, "pos layer d_model"],
    cells: list[tuple[int, int]],
    harmless: list[str],
    completions: list[str],
    harmful: list[str],
    max_new_tokens: int = 24,
    generate_below: float = 0.15,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[float, list[CandidateCost]]:
    """The baseline CE of `completions` and each cell's `CandidateCost`.

    `cells` are (position, layer) pairs with negative positions counted from the end of the candidates'
    position axis (-1 is the last template token), as in the pipeline's `selection.json`.
    """
    n_pos, n_layers = candidates.shape[:2]
    for position, layer in cells:
        if not -n_pos <= position < 0 or not 0 <= layer < n_layers:
            raise ValueError(f"Candidate (position {position}, layer {layer}) is outside the candidates: positions "
                             f"-{n_pos}..-1, layers 0..{n_layers - 1}.")
    check_instructions(harmful)
    baseline = completion_loss(cm, harmless, completions)
    costs = []
    for position, layer in tqdm(cells, desc="ablation sweep", disable=not progress, leave=False):
        r = candidates[position, layer].float()
        measured = {}
        for spare, suffix in ((False, ""), (True, "_spared")):
            measured[f"ce_increase{suffix}"], measured[f"refused{suffix}"] = ablation_cost(
                cm, r, harmless, completions, baseline, harmful, generate_below, max_new_tokens, batch_size, spare)
        costs.append(CandidateCost(position, layer, **measured))
    return baseline, costs


def ablation_cost(
    cm: ChatModel, r: Float[Tensor, " d_model"], harmless: list[str], completions: list[str], baseline: float,
    harmful: list[str], generate_below: float | None, max_new_tokens: int, batch_size: int,
    spare_first_token: bool = False, progress: str | None = None,
) -> tuple[float, int | None]:
    """With `r` ablated: the rise in CE of the harmless `completions` over `baseline` (nats/token), and how many
    of `harmful` are still refused, generated only where the rise is at most `generate_below` (None: always);
    `progress` labels progress bars (None: none)."""
    with ablate(cm, r, spare_first_token=spare_first_token):
        loss = completion_loss(cm, harmless, completions, progress=f"completion loss, {progress}" if progress else False)
        increase = loss - baseline
        generate = generate_below is None or increase <= generate_below
        return increase, _refused(cm, harmful, max_new_tokens, batch_size, progress or False) if generate else None


def _refused(cm: ChatModel, harmful: list[str], max_new_tokens: int, batch_size: int, progress: bool | str = False) -> int:
    """How many of `harmful` the model (under whatever interventions are active) refuses."""
    return refused_count(judged_completions(cm, harmful, max_new_tokens, batch_size, progress))


def sweep_run(
    cm: ChatModel, run: RunFolder, layers: list[int], n_harmful: int = 32, n_completions: int = 64,
    max_new_tokens: int = 24, generate_below: float = 0.15, batch_size: int = 32, progress: bool = True,
) -> dict:
    """`ablation_sweep` over every position of `layers` in a finished pipeline run, on the first `n_harmful`
    bundled harmful validation prompts.

    CE is measured on the first `n_completions` harmless test completions of the run that the judge does
    not read as refusals (`completions/harmless_baseline.json`).
    """
    candidates = run.candidates()
    harmful = split_instructions("bundled", "harmful", "val", n_harmful)
    items = run.completions("harmless_baseline")["items"]
    kept = [item for item in items if not item["refusal"]][:n_completions]
    if not kept:
        raise ValueError(f"{run.root} has no non-refused harmless completions to measure CE on.")
    n_pos = candidates.shape[0]
    cells = [(position, layer) for position in range(-n_pos, 0) for layer in layers]
    baseline, costs = ablation_sweep(
        cm, candidates, cells, [i["instruction"] for i in kept], [i["completion"] for i in kept], harmful,
        max_new_tokens, generate_below, batch_size, progress)
    harmful_refused = _refused(cm, harmful, max_new_tokens, batch_size)
    return {"run": run.label, "baseline_ce": baseline, "n_completions": len(kept), "n_harmful": len(harmful),
            "harmful_refused_without_ablation": harmful_refused, "max_new_tokens": max_new_tokens,
            "generate_below": generate_below, "candidates": [asdict(c) for c in costs]}


def format_sweep(result: dict) -> str:
    """A plain-text table of `sweep_run`'s result."""
    def refused(n: int | None) -> str:
        return "-" if n is None else f"{n}/{result['n_harmful']}"

    lines = [f"baseline CE {result['baseline_ce']:.3f} on {result['n_completions']} harmless completions; "
             f"{result['harmful_refused_without_ablation']}/{result['n_harmful']} harmful prompts refused without "
             f"ablation (refusals generated only where the CE increase <= {result['generate_below']})",
             f"{'position':>8} {'layer':>5} {'CE increase':>12} {'refused':>8} {'spared: CE':>11} {'refused':>8}"]
    for c in result["candidates"]:
        lines.append(f"{c['position']:>8} {c['layer']:>5} {c['ce_increase']:>+12.3f} {refused(c['refused']):>8} "
                     f"{c['ce_increase_spared']:>+11.3f} {refused(c['refused_spared']):>8}")
    return "\n".join(lines)
