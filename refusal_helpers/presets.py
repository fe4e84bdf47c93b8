"""The embedded model's pipeline preset: settings derived on validation data for one adapter, stored beside it.

The paper's KL threshold (0.1) assumes a large model whose refusal direction barely disturbs harmless
predictions; on the small embedded organism, the candidate its rules choose under it leaves much of the
refusal in place. The preset replaces two settings, each by a stated rule, on the validation split only:

- ``zero_dims`` (not the paper's method): the residual dimensions where the first token, an attention sink,
  keeps a massive activation (`massive_dims`); a candidate's entry there moves the sink under ablation;
- ``kl_threshold`` (the paper's filter, its value derived): the smallest threshold, in steps of 0.01, whose
  chosen direction, ablated, meets the organism's targets on validation data (`derive_kl_threshold`): it
  raises the CE of the unmodified model's harmless completions by at most 0.1 nats/token and leaves at most
  5% of the harmful prompts refused. The paper's KL score reads only the first reply token; on this model
  a direction can pass it and still disturb the rest of a harmless reply, which the CE bound catches.

``python -m refusal_helpers preset`` derives both and writes ``data/organism/presets.json``, keyed by the
adapter's digest; `embedded.preset` reads it, and a retrained adapter gets no preset until one is derived.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import residual_activations
from .data import split_instructions
from .embedded import PRESETS_FILE, adapter_digest, adapter_dir
from .evaluation import completion_loss
from .files import atomic_write_json
from .judges import judged_completions
from .loading import EMBEDDED, embedded_adapter, load_model
from .models import ChatModel
from .pipeline import Pipeline, PipelineConfig
from .selection import ScoreTable, SelectionConfig, choose
from .sweep import ablation_cost

PROBE = "Write a short poem about the sea."


class NoThreshold(ValueError):
    """No KL threshold meets the targets; carries what was measured on the way (`trail`, `baseline_ce`)."""

    def __init__(self, message: str, trail: list[dict], baseline_ce: float):
        super().__init__(message)
        self.trail, self.baseline_ce = trail, baseline_ce


@torch.inference_mode()
def massive_dims(cm: ChatModel, share: float = 0.5, ratio: float = 10.0) -> tuple[list[int], list[dict]]:
    """Residual dimensions holding at least `share` of the first token's squared norm, at the layers where the
    first token's norm is at least `ratio` times every other token's (a massive activation, an attention sink);
    and, per such layer, the first token's norm, the largest other token's, and the share of its top dimension."""
    inputs = cm.tokenize([PROBE])
    seq = inputs["input_ids"].shape[1]
    resid = residual_activations(cm, inputs, list(range(seq)), list(range(cm.n_layers)))[0].double()  # (seq, layer, d)
    norms = resid.norm(dim=-1)  # (seq, layer)
    dims: set[int] = set()
    profile = []
    for layer in range(cm.n_layers):
        if norms[0, layer] >= ratio * norms[1:, layer].max():
            shares = resid[0, layer] ** 2 / norms[0, layer] ** 2
            dims.update(int(i) for i in torch.nonzero(shares >= share).flatten())
            profile.append({"layer": layer, "first_token_norm": round(float(norms[0, layer]), 1),
                            "other_tokens_max": round(float(norms[1:, layer].max()), 1),
                            "top_dim": int(shares.argmax()), "top_dim_share": round(float(shares.max()), 4)})
    return sorted(dims), profile


def derive_kl_threshold(
    cm: ChatModel, table: ScoreTable, candidates: Float[Tensor, "pos layer d_model"], harmful: list[str],
    harmless: list[dict], max_refused: float = 0.05, max_ce_increase: float | None = 0.1, step: float = 0.01,
    max_threshold: float = 3.0, max_new_tokens: int = 48, batch_size: int = 32,
) -> dict:
    """The smallest KL threshold (a multiple of `step`) whose chosen direction, ablated, raises the CE of the
    `harmless` completions (``{"instruction", "completion"}`` each, the unmodified model's) by at most
    `max_ce_increase` nats/token (None: no CE bound) and leaves at most `max_refused` of `harmful` refused; with
    the baseline CE and the trail of choices met on the way (one entry per change of choice, at the smallest
    threshold making it). Raises `NoThreshold`, with that trail, when no threshold up to `max_threshold` does.

    Refusals are generated only for a choice within the CE bound (generation is the slow part)."""
    instructions = [item["instruction"] for item in harmless]
    completions = [item["completion"] for item in harmless]
    baseline = completion_loss(cm, instructions, completions, progress="completion loss, baseline")
    trail, previous = [], ()
    for k in range(1, round(max_threshold / step) + 1):
        threshold = round(k * step, 6)
        try:
            selection = choose(table, SelectionConfig(kl_threshold=threshold))
        except ValueError:
            selection = None
        cell = None if selection is None else (selection.position_index, selection.layer)
        if trail and cell == previous:
            continue
        previous = cell
        if selection is None:
            trail.append({"kl_threshold": threshold, "chosen": None})
            continue
        increase, refused = ablation_cost(cm, candidates[cell], instructions, completions, baseline, harmful,
                                          max_ce_increase, max_new_tokens, batch_size,
                                          progress=f"KL threshold {threshold}")
        trail.append({"kl_threshold": threshold, "chosen": {"position": selection.position, "layer": selection.layer,
                                                           "kl": selection.kl},
                      "ce_increase": increase, "refused": refused, "n": len(harmful)})
        if refused is not None and refused <= max_refused * len(harmful):
            return {"kl_threshold": threshold, "baseline_ce": baseline, "trail": trail}
    bound = "" if max_ce_increase is None else f"raises the harmless validation CE by at most {max_ce_increase} and "
    raise NoThreshold(f"No KL threshold up to {max_threshold} chooses a direction whose ablation {bound}leaves at most "
                      f"{max_refused:.0%} of {len(harmful)} harmful validation prompts refused: {trail}", trail, baseline)


def preset_folder(model: str = EMBEDDED, plain: bool = False) -> Path:
    """The run folder a preset derivation of `model` uses unless told another: runs/preset for the shipped
    adapter, runs/preset-<folder name> for "embedded:FOLDER", with "-plain" for the plain comparison."""
    adapter = embedded_adapter(model)[1]
    return Path("runs/preset" + (f"-{adapter.resolve().name}" if adapter else "") + ("-plain" if plain else ""))


def derive_preset(out: str | Path | None = None, max_refused: float = 0.05, max_ce_increase: float | None = 0.1,
                  plain: bool = False, model: str = EMBEDDED) -> dict:
    """Derive the embedded model's preset on validation data (an exhaustive score table in `out`, by default
    `preset_folder`); `plain`: the KL threshold alone, for the paper's plain difference of means (no dimension
    zeroed), by the refusal bound alone (the comparison shows what that direction costs in CE). `model`:
    "embedded:FOLDER" for an adapter being tried. Where no threshold meets the targets, the settings are None and
    ``derived["failure"]`` says why (the trail shows each choice's cost)."""
    embedded, adapter = embedded_adapter(model)
    if not embedded:
        raise ValueError(f"A preset is derived for the embedded model ('embedded' or 'embedded:FOLDER'), not {model!r}.")
    out = preset_folder(model, plain) if out is None else out
    cm = load_model(model)
    dims, sink = massive_dims(cm)
    if plain:
        dims, max_ce_increase = [], None
    config = PipelineConfig(model=model, out=str(out), zero_dims=tuple(dims), selection_mode="exhaustive",
                            kl_threshold=1e9, induce_threshold=-1e9, random_controls=0)
    pipeline = Pipeline(config, cm=cm)
    with pipeline.run_folder.lock():
        pipeline.run_folder.claim(pipeline.identity)
        candidates = pipeline.extract()
        table = pipeline.score(candidates)
    harmful = split_instructions("bundled", "harmful", "val", None)  # every validation prompt of each kind
    harmless = judged_completions(cm, split_instructions("bundled", "harmless", "val", None), config.max_new_tokens,
                                  config.batch_size, progress="harmless validation completions")
    try:
        kl, failure = derive_kl_threshold(cm, table, candidates, harmful, harmless, max_refused, max_ce_increase,
                                          max_new_tokens=config.max_new_tokens, batch_size=config.batch_size), None
    except NoThreshold as error:
        kl, failure = {"kl_threshold": None, "baseline_ce": error.baseline_ce, "trail": error.trail}, str(error)
    command = (f"python -m refusal_helpers preset{'' if adapter is None else f' --model {model}'} --out {out} "
               f"--max-refused {max_refused}" + (" --plain" if plain else f" --max-ce-increase {max_ce_increase}"))
    return {"model_version": adapter_digest(adapter),
            "settings": None if failure else {"kl_threshold": kl["kl_threshold"], "zero_dims": dims},
            "derived": {"command": command, "max_refused": max_refused, "max_ce_increase": max_ce_increase,
                        "sink": sink, "harmful_val": len(harmful), "harmless_val": len(harmless),
                        "baseline_ce": kl["baseline_ce"], "trail": kl["trail"],
                        **({"failure": failure} if failure else {})}}


def save_preset(derived: dict, folder: Path | None = None) -> Path:
    """Store a derived preset in the adapter folder's presets.json, under the adapter's digest."""
    if derived["settings"] is None:
        raise ValueError(f"No preset to store for adapter {derived['model_version']}: {derived['derived'].get('failure')}")
    folder = folder if folder is not None else adapter_dir()
    path = folder / PRESETS_FILE
    presets = json.loads(path.read_text()) if path.is_file() else {}
    presets[derived["model_version"]] = {"settings": derived["settings"], "derived": derived["derived"]}
    atomic_write_json(path, presets)
    return path
