"""Abliterate and export: a run's direction folded into the weights, saved as a Hugging Face folder, with evidence.

``python -m refusal_helpers abliterate --run runs/<x> --out <folder>`` loads the run's model (from its
run.json), folds the run's direction into the weights (`orthogonalize.orthogonalize_weights`), measures on the
run's test prompts what the edit did (refusal before and after, the KL of harmless next-token predictions, the
cross-entropy of the model's own harmless completions), saves model, tokenizer and chat template with
``save_pretrained`` (safetensors), reloads the saved folder and checks that it equals hook ablation on the
original model (max |logit difference| on test prompts), and writes the evidence into the folder's model card
(README.md) and ``abliteration.json``. Post-norm architectures (Gemma 2/3) are refused: folding is not exact
there (docs/fidelity.md has the measured size).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .evaluation import completion_loss, last_logits
from .files import atomic_write_json, atomic_write_text
from .interventions import ablate
from .judges import Judge, SubstringJudge, judged_completions, refused_count
from .loading import embedded_adapter, load_model
from .metrics import kl_divergence
from .models import ChatModel
from .orthogonalize import orthogonalize_weights
from .runs import RunFolder

EMBEDDED_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded model: this, with the project's LoRA adapter merged
CARD = """---
library_name: transformers
base_model: {base}
tags: [refusal-direction, abliterated, research]
---

# {base}, with its refusal direction folded into the weights

Made with refusal-direction (`refusal_helpers.export`): the difference-of-means direction from `{run}` (position
{position}, layer {layer}, norm {norm:.2f}{zeroed}) is projected
out of every matrix that writes to the residual stream (the embeddings and each attention and MLP output
projection), which is the paper's directional ablation at every layer and position, with no hooks.

**Responsible use.** This is a research artifact: the model no longer refuses as it was trained to. Do not use
it to help people cause harm.

## What the edit did

Measured on the run's held-out test prompts ({n_harmful} harmful, {n_harmless} harmless; greedy, {max_new_tokens}
new tokens; judge: {judge}).

| | before | after |
|---|---|---|
| harmful prompts refused | {harmful_before} | {harmful_after} |
| harmless prompts refused | {harmless_before} | {harmless_after} |

- KL divergence of the next-token distribution at the reply's first position, harmless prompts, original ->
  edited: {kl:.4f} nats (mean).
- Cross-entropy of the original model's own harmless completions: {ce_before:.4f} -> {ce_after:.4f} nats/token.
- The saved folder, reloaded, against hook ablation on the original model: max |logit difference| {check:.2e}
  over {n_check} test prompts (every position).
"""


def _rate(items: list[dict]) -> str:
    return f"{refused_count(items) / len(items):.1%} ({refused_count(items)}/{len(items)})"


@torch.inference_mode()
def export_model(
    cm: ChatModel, direction: torch.Tensor, out: str | Path, harmful: list[str], harmless: list[str],
    origin: dict, max_new_tokens: int = 48, judge: Judge | None = None, batch_size: int = 32, progress: bool = True,
) -> dict:
    """Fold `direction` into a copy of `cm`'s weights, save it to `out` with a model card, and return the evidence:
    refusal on `harmful` and `harmless` before and after, the KL of harmless first-token predictions, the CE of
    the original model's own harmless replies, and the reloaded folder against hook ablation on `cm`.
    `origin` describes where the direction comes from (``run``, ``model``, ``position``, ``layer``, ``zero_dims``)."""

    def bar(label: str) -> str | bool:
        return label if progress else False

    judge = judge or SubstringJudge()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new folder for the exported model.")
    before = {kind: judged_completions(cm, prompts, max_new_tokens, batch_size, bar(f"generating {kind}"), judge)
              for kind, prompts in (("harmful", harmful), ("harmless", harmless))}
    replies = [item["completion"] for item in before["harmless"]]
    base_logits = last_logits(cm, harmless, batch_size)
    ce_before = completion_loss(cm, harmless, replies, progress=bar("CE, original"))
    check_inputs = cm.tokenize(harmful[:8] + harmless[:8])
    with ablate(cm, direction):
        hooked = cm.forward(check_inputs, logits_to_keep=0)

    edited = orthogonalize_weights(copy.deepcopy(cm), direction)
    after = {kind: judged_completions(edited, prompts, max_new_tokens, batch_size,
                                      bar(f"generating {kind}, orthogonalized"), judge)
             for kind, prompts in (("harmful", harmful), ("harmless", harmless))}
    kl = float(kl_divergence(base_logits, last_logits(edited, harmless, batch_size)).mean())
    ce_after = completion_loss(edited, harmless, replies, progress=bar("CE, orthogonalized"))
    out.mkdir(parents=True, exist_ok=True)
    edited.save_pretrained(out)
    del edited
    reloaded = load_model(str(out), device=cm.device, dtype=cm.dtype)
    mask = check_inputs["attention_mask"].bool()
    check = float((reloaded.forward(check_inputs, logits_to_keep=0)[mask] - hooked[mask]).abs().max())

    evidence = {
        "origin": origin, "norm": float(direction.norm()), "judge": judge.name, "max_new_tokens": max_new_tokens,
        "refused": {f"{kind}_{when}": {"refused": refused_count(items[kind]), "n": len(items[kind])}
                    for when, items in (("before", before), ("after", after)) for kind in before},
        "kl_harmless": kl, "ce_harmless": {"before": ce_before, "after": ce_after},
        "reload_check": {"max_abs_logit_difference": check, "n_prompts": int(mask.shape[0])},
    }
    zeroed = f", residual dimensions {origin['zero_dims']} zeroed" if origin.get("zero_dims") else ""
    base = EMBEDDED_BASE if embedded_adapter(origin["model"])[0] else origin["model"]
    card = CARD.format(base=base, run=origin["run"], position=origin["position"], layer=origin["layer"],
                       norm=evidence["norm"], zeroed=zeroed, n_harmful=len(harmful), n_harmless=len(harmless),
                       max_new_tokens=max_new_tokens, judge=judge.name,
                       harmful_before=_rate(before["harmful"]), harmful_after=_rate(after["harmful"]),
                       harmless_before=_rate(before["harmless"]), harmless_after=_rate(after["harmless"]),
                       kl=kl, ce_before=ce_before, ce_after=ce_after, check=check, n_check=int(mask.shape[0]))
    atomic_write_text(out / "README.md", card)
    atomic_write_json(out / "abliteration.json", evidence)
    return evidence


def abliterate(
    run: str | Path, out: str | Path, n_test: int | None = None, max_new_tokens: int | None = None,
    judge: Judge | None = None, batch_size: int = 32, cm: ChatModel | None = None, progress: bool = True,
) -> dict:
    """`export_model` with a finished run's model (from its run.json), direction and test prompts."""
    folder = RunFolder(run)
    summary = folder.summary()
    direction, selection = folder.direction()
    identity = folder.identity()
    prompts = {kind: [item["instruction"] for item in folder.completions(f"{kind}_baseline")["items"]][:n_test]
               for kind in ("harmful", "harmless")}
    origin = {"run": folder.label, "model": identity["model"], "model_version": identity["model_version"],
              "position": selection["position"], "layer": selection["layer"],
              "zero_dims": summary["direction"]["zero_dims"]}
    return export_model(cm if cm is not None else folder.load_model(), direction, out, prompts["harmful"],
                        prompts["harmless"], origin, max_new_tokens or summary["sizes"]["max_new_tokens"], judge,
                        batch_size, progress)
