"""The embedded model's pipeline preset: settings derived on validation data for one adapter, stored beside it.

The paper's KL threshold (0.1) assumes a large model whose refusal direction barely disturbs harmless
predictions; on the small embedded organism, the candidate its rules choose under it leaves much of the
refusal in place. The preset replaces two settings, each by a stated rule, on the validation split only:

- ``zero_dims`` (not the paper's method): the residual dimensions where the first token, an attention sink,
  keeps a massive activation (`massive_dims`); a candidate's entry there moves the sink under ablation;
- ``kl_threshold``: the smallest threshold, in steps of 0.1, whose chosen direction, ablated, leaves at most
  5% of the harmful validation prompts refused (`derive_kl_threshold`), the ablation target of the organism.

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
from .files import atomic_write_json
from .interventions import ablate
from .judges import judged_completions, refused_count
from .loading import EMBEDDED, load_model
from .models import ChatModel
from .pipeline import Pipeline, PipelineConfig
from .selection import ScoreTable, SelectionConfig, choose

PROBE = "Write a short poem about the sea."


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
    max_refused: float = 0.05, step: float = 0.1, max_threshold: float = 3.0, max_new_tokens: int = 48,
    batch_size: int = 32,
) -> dict:
    """The smallest KL threshold (a multiple of `step`) whose chosen direction, ablated, leaves at most
    `max_refused` of `harmful` refused; with the trail of thresholds tried and what each chose."""
    trail, measured = [], {}
    for k in range(1, round(max_threshold / step) + 1):
        threshold = round(k * step, 6)
        try:
            selection = choose(table, SelectionConfig(kl_threshold=threshold))
        except ValueError:
            trail.append({"kl_threshold": threshold, "chosen": None})
            continue
        cell = (selection.position_index, selection.layer)
        if cell not in measured:
            with ablate(cm, candidates[cell]):
                measured[cell] = refused_count(judged_completions(cm, harmful, max_new_tokens, batch_size,
                                                                  progress=f"KL threshold {threshold}"))
        refused = measured[cell]
        trail.append({"kl_threshold": threshold, "chosen": {"position": selection.position, "layer": selection.layer,
                                                           "kl": selection.kl}, "refused": refused, "n": len(harmful)})
        if refused <= max_refused * len(harmful):
            return {"kl_threshold": threshold, "trail": trail}
    raise ValueError(f"No KL threshold up to {max_threshold} chooses a direction that leaves at most {max_refused:.0%} "
                     f"of {len(harmful)} harmful validation prompts refused: {trail}")


def derive_preset(out: str | Path = "runs/preset", max_refused: float = 0.05, plain: bool = False) -> dict:
    """Derive the embedded model's preset on validation data (an exhaustive score table in `out`); `plain`: the
    KL threshold alone, for the paper's plain difference of means (no dimension zeroed)."""
    cm = load_model(EMBEDDED)
    dims, sink = massive_dims(cm)
    if plain:
        dims = []
    config = PipelineConfig(out=str(out), zero_dims=tuple(dims), selection_mode="exhaustive", kl_threshold=1e9,
                            induce_threshold=-1e9, random_controls=0)
    pipeline = Pipeline(config, cm=cm)
    with pipeline.run_folder.lock():
        pipeline.run_folder.claim(pipeline.identity)
        candidates = pipeline.extract()
        table = pipeline.score(candidates)
    harmful = split_instructions("bundled", "harmful", "val", None)  # every harmful validation prompt
    kl = derive_kl_threshold(cm, table, candidates, harmful, max_refused, max_new_tokens=config.max_new_tokens,
                             batch_size=config.batch_size)
    return {"model_version": adapter_digest(), "settings": {"kl_threshold": kl["kl_threshold"], "zero_dims": dims},
            "derived": {"command": f"python -m refusal_helpers preset --out {out} --max-refused {max_refused}"
                                   + (" --plain" if plain else ""),
                        "max_refused": max_refused, "sink": sink,
                        "harmful_val": len(harmful), "trail": kl["trail"]}}


def save_preset(derived: dict, folder: Path | None = None) -> Path:
    """Store a derived preset in the adapter folder's presets.json, under the adapter's digest."""
    folder = folder if folder is not None else adapter_dir()
    path = folder / PRESETS_FILE
    presets = json.loads(path.read_text()) if path.is_file() else {}
    presets[derived["model_version"]] = {"settings": derived["settings"], "derived": derived["derived"]}
    atomic_write_json(path, presets)
    return path
