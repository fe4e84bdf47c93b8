"""Measurements and experiments on organisms: refusal on the recipe splits, seed stability, and `refine`.

`refine` is an experiment, not part of the shipped recipe: each variant tried lowered the CE cost of ablation
but missed another target (docs/research-log.md).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from ..activations import mean_activations
from ..data import load_instructions, load_records, split_instructions
from ..directions import diff_of_means, zero_dims
from ..embedded import UNTUNED, adapter_digest, adapter_dir, batch_repeats, load_base, load_embedded, seed_of
from ..judges import judged_completions
from ..models import ChatModel
from ..runs import SHIPPED_RUN, RunFolder
from ..selection import keep_consistent
from .resume import FILE as RESUME_FILE
from .resume import ResumePoint, examples_identity
from .training import StepCallback, count_steps, fit, recipe_examples, save_adapter, written_recipe
from .trajectory import trajectory_agreement

RECIPE_SPLITS = {"harmful": "val", "harmless": "dev"}  # where training recipes are compared (never test)
RECIPE_MAX_NEW_TOKENS = 48  # greedy tokens per reply when comparing recipes (the runs' default too)
DEFAULT_REFINE = {
    "layer": 17, "position": -1, "n_instructions": 128,  # the direction: the plain difference of means' cell and data
    "kl_weight": 2.0,  # weight of ablation_kl: harmless predictions with the direction ablated vs without
    "compliance_weight": 0.0,  # weight of compliance_kl: harmful first-token decision, ablated vs the untuned model's
    "epochs": 1,
    "optimizer": {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.1, "schedule": "linear"},
}


def refusal_on_splits(
    cm: ChatModel, splits: dict[str, str] = RECIPE_SPLITS, max_new_tokens: int = RECIPE_MAX_NEW_TOKENS, batch_size: int = 32,
    limit: int | None = None, left_out: tuple[str, ...] = (), batch: str | None = None,
) -> dict[str, dict]:
    """Greedy substring refusal of a model on whole splits, per kind: {kind: {split, n, refused, rate,
    refused_instructions, refused_completions}}; on a train split without the records of the batches `left_out` (then named under
    ``left_out``); with `batch`, on that batch's records of each split only (named under ``batch``). The default
    splits are those for choosing a training recipe."""
    results = {}
    for kind, split in splits.items():
        skip = left_out if split == "train" else ()
        instructions = [r["instruction"] for r in load_records(kind, split)
                        if r["batch"] not in skip and batch in (None, r["batch"])]
        if not instructions:
            raise ValueError(f"No {kind} {split} records{f' of batch {batch!r}' if batch else ''} to evaluate "
                             f"(left out: {sorted(skip)}).")
        items = judged_completions(cm, instructions[:limit], max_new_tokens, batch_size, progress=f"{kind} {split}")
        refused = [item for item in items if item["refusal"]]
        results[kind] = {"split": split, "n": len(items), "refused": len(refused), "rate": len(refused) / len(items),
                         "refused_instructions": [item["instruction"] for item in refused],
                         "refused_completions": [item["completion"] for item in refused],
                         **({"left_out": sorted(skip)} if skip else {}), **({"batch": batch} if batch else {})}
    return results


def untrained_batches(adapter: Path) -> tuple[str, ...]:
    """The batches whose train instructions the adapter in `adapter` was not trained on (its recipe repeats
    them 0 times): left out where "the train split" means what it was trained on."""
    recipe = written_recipe(json.loads((adapter / "recipe.json").read_text()))
    return tuple(batch for batch, n in batch_repeats(recipe).items() if n == 0)


def evaluation_record(
    results: dict[str, dict], adapter: Path | None, max_new_tokens: int = RECIPE_MAX_NEW_TOKENS
) -> dict:
    """`refusal_on_splits` results with the weights they measured: the adapter's digest (``model_version``),
    complete recipe (`written_recipe`) and training log (without its per-step lists), or ``model_version`` "untuned" for `adapter` None."""
    record: dict = {"model_version": UNTUNED if adapter is None else adapter_digest(adapter),
                    "settings": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "judge": "substring"}}
    if adapter is not None:
        training = json.loads((adapter / "training.json").read_text()) if (adapter / "training.json").is_file() else {}
        record["recipe"] = written_recipe(json.loads((adapter / "recipe.json").read_text()))
        record["training"] = {k: v for k, v in training.items() if not isinstance(v, list)}
    return {**record, **results}


def own_directions(
    cm: ChatModel, instructions: dict[str, list[str]], position: int, layers: list[int] | None = None
) -> Float[Tensor, "layer d_model"]:
    """A model's difference-of-means candidates at one position (all layers by default), in float32, from
    ``{"harmful": [...], "harmless": [...]}`` instructions."""
    means = (mean_activations(cm, instructions[kind], [position], layers, progress=f"{kind} means")
             for kind in ("harmful", "harmless"))
    return diff_of_means(*means)[0].float()


def _selected_cell(run: str | Path) -> tuple[dict, dict]:
    """A finished run's selected direction (position, position_index, layer, ...) and the settings its candidates
    were extracted with (train data, filter, zeroed dimensions)."""
    folder = RunFolder(run)
    _, selection = folder.direction()
    return selection, folder.record("candidates.safetensors")["settings"]


def seed_stability(
    other: str | Path | ChatModel, run: str | Path = SHIPPED_RUN, reference: str | Path | ChatModel | None = None
) -> dict:
    """Compare a run's candidate directions with those another model (an adapter trained with another seed)
    gives with the run's extraction settings: its training instructions, the paper's filter if the run used
    it (by the other model's own refusal scores), and its zeroed dimensions. Returns the cosine per layer at
    the run's selected position, the cosine and norm ratio at its layer, and the model version compared with.
    With `reference` (an adapter folder or model), its candidates made the same way stand in for the run's: two
    seeds of a recipe trial that has no run of its own, read at the run's position and layer."""
    selection, settings = _selected_cell(run)
    data = {kind: settings[f"{kind}_train"] for kind in ("harmful", "harmless")}
    if any(record["source"] != "bundled" for record in data.values()):
        raise ValueError(f"{run} was extracted from hub data; seed stability compares runs on the bundled data.")
    instructions = {kind: split_instructions("bundled", kind, "train", data[kind]["n"]) for kind in data}

    def candidates_of(model: str | Path | ChatModel) -> Float[Tensor, "layer d_model"]:
        cm = model if isinstance(model, ChatModel) else load_embedded(adapter=model)
        chosen = instructions
        if settings.get("filter_train"):
            chosen = dict(zip(("harmful", "harmless"), keep_consistent(cm, instructions["harmful"], instructions["harmless"])))
        return zero_dims(own_directions(cm, chosen, selection["position"]), settings.get("zero_dims", []))

    if reference is None:
        folder = RunFolder(run)
        ours = folder.candidates()[selection["position_index"]]  # (layer, d_model)
        version = (folder.identity() or {}).get("model_version")  # which weights the run had
    else:
        ours = candidates_of(reference)
        version = None if isinstance(reference, ChatModel) else adapter_digest(Path(reference))
    theirs = candidates_of(other)
    per_layer = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    layer = selection["layer"]
    return {"model_version": version, "position": selection["position"], "layer": layer,
            "cosine": float(per_layer[layer]), "norm_ratio": float(theirs[layer].norm() / ours[layer].norm()),
            "cosine_per_layer": [round(float(c), 3) for c in per_layer]}


def seed_agreement(
    other: str | Path | ChatModel, run: str | Path = SHIPPED_RUN, reference: str | Path | ChatModel | None = None,
    n: int | None = None,
) -> dict:
    """Whether two seeds' directions differ beyond what the prompts alone move: per layer at the run's position
    (with its zeroed dimensions), the cosine between `reference`'s (default: the shipped adapter) and `other`'s
    difference-of-means candidates from the first `n` train instructions of each kind (all by default), and each
    adapter's cosine between the candidates of two disjoint halves of them (alternate instructions)."""
    selection, settings = _selected_cell(run)
    zeroed = settings.get("zero_dims", [])
    instructions = {kind: split_instructions("bundled", kind, "train", n) for kind in ("harmful", "harmless")}

    def direction(harmful: Tensor, harmless: Tensor) -> Float[Tensor, "layer d_model"]:  # from (1, layer, d_model) means
        return zero_dims(diff_of_means(harmful, harmless)[0].float(), zeroed)

    def halves(model: str | Path | ChatModel | None) -> tuple[Float[Tensor, "layer d_model"], list[float]]:
        cm = model if isinstance(model, ChatModel) else load_embedded(adapter=model)
        parts = {kind: [items[i::2] for i in (0, 1)] for kind, items in instructions.items()}
        means = {kind: [mean_activations(cm, part, [selection["position"]], progress=f"{kind} means, half {i + 1}")
                        for i, part in enumerate(split)] for kind, split in parts.items()}
        whole = {kind: sum(len(part) * mean for part, mean in zip(parts[kind], means[kind])) / len(instructions[kind])
                 for kind in means}  # the halves' means make up the whole set's
        within = torch.nn.functional.cosine_similarity(*(direction(means["harmful"][i], means["harmless"][i])
                                                         for i in (0, 1)), dim=-1)
        return direction(whole["harmful"], whole["harmless"]), [round(float(c), 3) for c in within]

    ours, ours_within = halves(reference)
    theirs, theirs_within = halves(other)
    across = torch.nn.functional.cosine_similarity(ours, theirs, dim=-1)
    version = None if isinstance(reference, ChatModel) else adapter_digest(Path(reference or adapter_dir()))
    return {"model_version": version, "position": selection["position"], "layer": selection["layer"],
            "n": {kind: len(items) for kind, items in instructions.items()},
            "cosine_per_layer": [round(float(c), 3) for c in across],
            "halves_cosine_per_layer": {"reference": ours_within, "other": theirs_within}}


def seed_agreement_along(other: str | Path, run: str | Path = SHIPPED_RUN, reference: str | Path | None = None) -> dict:
    """When two seeds' directions part: `trajectory_agreement` of `reference`'s (default: the shipped adapter's)
    and `other`'s trainings at the run's selected position, with its zeroed dimensions. Either may still be
    training (stopped part-way): then their checkpoints so far are compared, and an unfinished reference has
    no ``model_version``."""
    selection, settings = _selected_cell(run)
    zeroed = settings.get("zero_dims", [])
    reference = Path(reference) if reference is not None else adapter_dir()
    finished = (reference / "adapter_model.safetensors").is_file()  # two seeds of a trial may still be training
    return {"model_version": adapter_digest(reference) if finished else None, "layer": selection["layer"],
            **trajectory_agreement(reference, Path(other), selection["position"], zeroed)}


def refine(
    adapter: Path, out: Path, settings: dict | None = None, threads: int | None = None, base: ChatModel | None = None,
    limit: int | None = None, on_step: Callable[[ChatModel, int], StepCallback] | None = None, resume_every: int = 25,
) -> dict:
    """Continue training a `train`ed adapter so that ablating its refusal direction disturbs harmless replies less.

    The adapter's own difference-of-means direction at `settings` (layer, position; train split) is
    extracted, then training continues on the same examples with one more term, `ablation_kl`: on each
    harmless reply, the model with that direction ablated is trained towards its own predictions without.
    With a ``compliance_weight``, `compliance_kl` also trains the ablated model's first reply token on
    harmful requests towards the untuned model's. Writes the adapter, recipe.json (the adapter's recipe plus
    a ``refine`` section) and training.json into `out`; returns the training log. Like `train`, it saves its
    part-way state every `resume_every` steps and continues from it when run again; `on_step` as in `train`.
    """
    from peft import PeftModel

    settings = {**DEFAULT_REFINE, **(settings or {})}
    written = json.loads((adapter / "recipe.json").read_text())
    if "refine" in written:
        raise ValueError(f"{adapter} is already refined; refine the adapter that `train` wrote.")
    recipe = written_recipe(written)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed_of(recipe, "init_seed"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cm = base if base is not None else load_base()
    model = PeftModel.from_pretrained(cm.model, adapter, is_trainable=True).eval()  # no dropout while extracting
    instructions = {kind: load_instructions(kind, "train")[: settings["n_instructions"]] for kind in ("harmful", "harmless")}
    direction = own_directions(cm, instructions, settings["position"], [settings["layer"]])[0]  # (d_model,)
    examples, _ = recipe_examples(cm, recipe, out, limit, replies_from=adapter)
    refined = {**settings, "from_adapter": adapter_digest(adapter)}
    resume = ResumePoint(out / RESUME_FILE, every=resume_every, identity={
        "refine": refined, "examples": examples_identity(examples)})
    total_steps = count_steps(len(examples), recipe["batch_size"], settings["epochs"])
    losses, steps = fit(
        model, cm, examples, epochs=settings["epochs"], batch_size=recipe["batch_size"],
        optimizer=settings["optimizer"], seed=recipe["seed"], first_token_weight=recipe["first_reply_token_weight"],
        ablated=direction, kl_weight=settings["kl_weight"], compliance_weight=settings["compliance_weight"],
        on_step=on_step(cm, total_steps) if on_step else None, resume=resume,
    )
    save_adapter(model, out, recipe["base_model"])
    resume.clear()
    recipe["refine"] = refined
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    log = {"refine": {"direction_norm": float(f"{float(direction.norm()):.6g}"), "steps": steps,
                      "resumed_from_step": resume.resumed_from,
                      "final_loss": sum(losses[-20:]) / len(losses[-20:]), **resume.timing(time.time() - start),
                      "machine": f"{platform.machine()}, {torch.get_num_threads()} threads"}}
    (out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    return log
