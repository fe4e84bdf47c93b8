"""The paper's pipeline, step by step, with artifacts on disk.

1. extract: difference-of-means candidates for every (post-instruction position, layer);
2. select: score candidates on validation prompts and choose the direction;
3. generate: completions on held-out prompts, plain and under interventions;
4. evaluate: substring refusal rates per condition;
5. loss: cross-entropy of harmless completions with and without ablation (coherence check), with the
   ablation sparing each prompt's first token (what the attention sink contributes), and under ablation
   of random unit directions, as a control for what removing any one direction costs.

Each step writes its artifacts atomically and is skipped when they exist for the same settings, so a
re-run resumes where the last one stopped and a failure leaves earlier artifacts intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from .activations import collect_activations, mean_activations
from .data import (
    CHECKOUT_HINT, HARMFUL_HUB_SETS, HARMLESS_HUB_SETS, load_hub_instructions, load_instructions, repository_path,
    take,
)
from .directions import diff_of_means, random_directions, zero_dims
from .evaluation import completion_loss
from .generation import generate
from .interventions import ablate, add
from .metrics import refusal_rate, is_refusal
from .models import ChatModel, load_model, model_version, resolve_device_dtype
from .selection import ScoreTable, Selection, SelectionConfig, choose, score_candidates

# Settings measured for the embedded model (see README, "The embedded model"). zero_dims (not the paper's
# method): dimension 507 carries the attention sink's massive activation, and a candidate's entry there moves
# the sink under ablation, which is most of its CE cost (layer 17's plain direction: +0.36; zeroed: +0.10).
# KL: no candidate that passes the induce filter has an ablation KL under the paper's 0.1, so the KL filter
# was set on the validation split as the smallest threshold (in steps of 0.1) whose chosen direction,
# ablated, leaves <= 10% of harmful validation prompts refused: 0.4 (layer 16, KL 0.38, 6 of 60 refused);
# nothing passes at 0.3. Without zero_dims the same rule gives 0.7 (runs/embedded-plain).
MODEL_PRESETS: dict[str, dict] = {"embedded": {"kl_threshold": 0.4, "zero_dims": [507]}}


class Condition(NamedTuple):
    kind: str  # of prompts: "harmful" or "harmless"
    intervention: str | None  # None, "ablation", "ablation_spared", "subtract" or "add"
    label: str  # for the summary table


CONDITIONS = {
    "harmful_baseline": Condition("harmful", None, "harmful, baseline"),
    "harmful_ablation": Condition("harmful", "ablation", "harmful, ablation"),
    # ablated at every token but each prompt's first (the attention sink)
    "harmful_ablation_spared": Condition("harmful", "ablation_spared", "harmful, ablation, first token spared"),
    "harmful_actadd": Condition("harmful", "subtract", "harmful, subtract r"),
    "harmless_baseline": Condition("harmless", None, "harmless, baseline"),
    "harmless_actadd": Condition("harmless", "add", "harmless, add r"),
}

LOSS_MEASURES = ("baseline", "ablation", "first_token_spared", "random_controls")  # what loss.json holds
STEP_ARTIFACTS = {  # step: the artifacts whose making is that step's work
    "extract": ["candidates.safetensors"],
    "select": ["selection.json", "direction.safetensors"],
    "generate": [f"completions/{c}.json" for c in CONDITIONS],
    "loss": ["loss.json"],
}
TRAIN = (("harmful", "train"), ("harmless", "train"))  # (kind, split) pairs each step reads
VAL = (("harmful", "val"), ("harmless", "val"))
TEST = (("harmful", "test"), ("harmless", "test"))


@dataclass
class PipelineConfig:
    model: str = "embedded"
    out: str = "runs/demo"  # never the shipped run's folder by default (see default_out)
    n_train: int = 128
    n_val: int = 16
    n_test: int | None = 32  # None: the whole test split
    max_new_tokens: int = 48
    batch_size: int = 32
    selection_mode: str = "lazy"
    kl_threshold: float | None = None  # None: model preset, else the paper's 0.1
    induce_threshold: float = 0.0
    max_layer_fraction: float = 0.8
    random_controls: int = 3  # random unit directions ablated as a control in the loss step
    zero_dims: tuple[int, ...] | None = None  # zeroed in every candidate and control; None: model preset, else none
    harmful_source: str = "bundled"  # or a hub dataset name (advbench, jailbreakbench, harmbench)
    harmless_source: str = "bundled"  # or "alpaca"
    device: str | None = None
    dtype: str | None = None
    timings: dict = field(default_factory=dict)

    def dims_to_zero(self) -> tuple[int, ...]:
        """Residual dimensions zeroed in every candidate and random control (not the paper's method)."""
        dims = self.zero_dims if self.zero_dims is not None else MODEL_PRESETS.get(self.model, {}).get("zero_dims", ())
        return tuple(sorted(set(dims)))

    def selection_config(self) -> SelectionConfig:
        kl = self.kl_threshold
        if kl is None:
            kl = MODEL_PRESETS.get(self.model, {}).get("kl_threshold", 0.1)
        return SelectionConfig(self.max_layer_fraction, kl, self.induce_threshold)


class Artifacts:
    """Paths of a run folder and atomic writers for them."""

    def __init__(self, out: str | Path):
        self.root = Path(out)
        try:
            (self.root / "completions").mkdir(parents=True, exist_ok=True)
            (self.root / "plots").mkdir(exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root):
                pass
        except OSError as err:
            raise PermissionError(f"Cannot write to the output folder {self.root}: {err}") from err

    def path(self, name: str) -> Path:
        return self.root / name

    def _atomic(self, name: str, write) -> None:
        target = self.path(name)
        tmp = target.with_name(f".{target.name}.tmp")
        write(tmp)
        os.replace(tmp, target)

    def write_json(self, name: str, data) -> None:
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        if self.path(name).is_file() and self.path(name).read_text() == text:
            return  # unchanged: keep the file (and its timestamp) as it is
        self._atomic(name, lambda p: p.write_text(text))

    def read_json(self, name: str):
        return json.loads(self.path(name).read_text())

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        meta = {k: json.dumps(v) for k, v in metadata.items()}
        self._atomic(name, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=meta))

    def write_figure(self, name: str, fig) -> None:
        self._atomic(name, lambda p: fig.write_html(str(p), include_plotlyjs="cdn"))

    def _record(self, name: str) -> dict | None:
        meta = self.path(name + ".settings.json")
        return json.loads(meta.read_text()) if self.path(name).exists() and meta.exists() else None

    def done(self, name: str, settings: dict) -> bool:
        """Whether `name` exists and was made with the same settings."""
        record = self._record(name)
        return record is not None and {k: v for k, v in record.items() if k != "compute_s"} == settings

    def mark(self, name: str, settings: dict, seconds: float) -> None:
        """Record the settings `name` was made with and the seconds making it took."""
        self.write_json(name + ".settings.json", {**settings, "compute_s": round(seconds, 1)})

    def compute_seconds(self, name: str) -> float | None:
        """Seconds that making `name` took, as recorded when it was made (None if not recorded)."""
        record = self._record(name)
        return None if record is None else record.get("compute_s")


SHIPPED_RUN = repository_path("runs/embedded")  # the shipped run on the embedded model


def load_direction(folder: str | Path = SHIPPED_RUN) -> tuple[torch.Tensor, dict]:
    """The direction of a finished run (default: the shipped run on the embedded model) and its description."""
    folder = Path(folder)
    if not (folder / "direction.safetensors").is_file():
        hint = CHECKOUT_HINT if folder == SHIPPED_RUN else "run `python -m refusal_helpers run` first."
        raise FileNotFoundError(f"No direction.safetensors in {folder}: {hint}")
    direction = load_file(str(folder / "direction.safetensors"))["direction"]
    return direction, json.loads((folder / "direction.json").read_text())


def run_instructions(source: str, kind: str, split: str, n: int | None) -> list[str]:
    """The first `n` instructions (all if None) of a kind and split, from the bundled sets or a hub dataset."""
    if source == "bundled":
        items = load_instructions(kind, split)
    else:
        items = load_hub_instructions(source)
        # hub sets have no fixed splits: carve disjoint slices deterministically
        halves_and_quarters = {"train": slice(0, len(items) // 2),
                               "val": slice(len(items) // 2, 3 * len(items) // 4),
                               "test": slice(3 * len(items) // 4, None)}
        items = items[halves_and_quarters[split]]
    if not items:
        raise ValueError(f"No {kind} instructions in split {split!r} of {source!r}.")
    if n is not None and n > len(items):
        warnings.warn(f"Asked for {n} {kind} {split} instructions but {source!r} has {len(items)}: using {len(items)}.",
                      stacklevel=2)
    return take(items, n)


def direction_settings(selection: Selection, direction: torch.Tensor) -> dict:
    """What artifacts made with a direction depend on: its candidate and a digest of its values (which
    change with the training data even where the candidate does not)."""
    values = direction.detach().float().cpu().contiguous().numpy().tobytes()
    return {"direction": [selection.position, selection.layer],
            "direction_sha256": hashlib.sha256(values).hexdigest()[:16]}


def data_record(source: str, instructions: list[str]) -> dict:
    """What artifacts made from instructions depend on: their source, number and a digest of their text
    (edited files or an updated hub dataset change it where the sizes do not)."""
    digest = hashlib.sha256(json.dumps(instructions, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"source": source, "n": len(instructions), "sha256": digest}


def model_identity_name(model: str) -> str:
    """The name a run records for a model: local paths resolved, so 'tiny', 'tiny/' and '/abs/tiny' are one model."""
    return os.path.realpath(model) if os.path.exists(model) else model


def default_out(model: str) -> str:
    """runs/<model alias>; the embedded model's runs go to runs/demo, since runs/embedded is the shipped run."""
    if model == "embedded":
        return "runs/demo"
    alias = os.path.basename(model_identity_name(model).rstrip("/")).removesuffix(".gguf")
    return f"runs/{alias}"


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class Pipeline:
    """The paper's steps on one model, each reading and writing its artifacts in `config.out`.

    `run()` does them all; each step method can also be called alone (later ones take earlier results).
    The model loads on first use, so a resumed run with every artifact finished never loads it.
    """

    def __init__(self, config: PipelineConfig, cm: ChatModel | None = None, progress: bool = True):
        self.config = config
        self.progress = progress
        config.selection_config()  # fail early on invalid thresholds, before loading anything
        for kind, source, allowed in (("harmful", config.harmful_source, HARMFUL_HUB_SETS),
                                      ("harmless", config.harmless_source, HARMLESS_HUB_SETS)):
            if source != "bundled" and source not in allowed:
                raise ValueError(f"Unknown {kind} source {source!r}: expected 'bundled' or one of {allowed}.")
        self.art = Artifacts(config.out)  # and on an unwritable folder
        if cm is not None and model_identity_name(cm.name) != model_identity_name(config.model):
            raise ValueError(f"The model passed is {cm.name!r} but config.model is {config.model!r}: artifacts "
                             "record config.model, so the two must name the same model.")
        self._cm = cm
        self.reused: set[str] = set()  # artifacts found finished and not recomputed in this invocation
        self._data: dict[tuple[str, str], list[str]] = {}
        # What every artifact depends on: which weights, in which precision.
        dtype = cm.dtype if cm is not None else resolve_device_dtype(config.device, config.dtype)[1]
        self._model_identity = {
            "model": model_identity_name(config.model),
            "model_version": model_version(config.model),
            "dtype": str(dtype).removeprefix("torch."),
        }

    @property
    def cm(self) -> ChatModel:
        if self._cm is None:
            t = time.time()
            self._cm = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype)
            self.config.timings["load_model_s"] = round(time.time() - t, 1)
        return self._cm

    def data(self, kind: str, split: str) -> list[str]:
        """The run's instructions of a kind ('harmful' / 'harmless') and split, sized by the config."""
        if (kind, split) not in self._data:
            c = self.config
            n = {"train": c.n_train, "val": c.n_val, "test": c.n_test}[split]
            self._data[kind, split] = run_instructions(self._source(kind), kind, split, n)
        return self._data[kind, split]

    def _source(self, kind: str) -> str:
        return self.config.harmful_source if kind == "harmful" else self.config.harmless_source

    def _done(self, name: str, settings: dict) -> bool:
        if self.art.done(name, settings):
            self.reused.add(name)
            return True
        return False

    @contextmanager
    def _making(self, name: str, settings: dict) -> Iterator[ChatModel]:
        """The model, for a block that makes `name`; on success records the settings and the seconds the
        block took (model loading excluded)."""
        cm = self.cm
        started = time.time()
        yield cm
        self.art.mark(name, settings, time.time() - started)

    def _settings(self, *keys: str, data: tuple[tuple[str, str], ...] = ()) -> dict:
        """What an artifact depends on: the model, the named config fields and the instructions of each
        (kind, split) in `data`."""
        c = asdict(self.config)
        return {**self._model_identity, **{k: c[k] for k in keys},
                **{f"{kind}_{split}": data_record(self._source(kind), self.data(kind, split)) for kind, split in data}}

    def _candidate_settings(self) -> dict:
        """What the candidates depend on; the score table, made from them, depends on all of it too."""
        return {**self._settings(data=TRAIN), **self._zeroed}

    @property
    def _zeroed(self) -> dict:
        """What candidates and controls depend on when dimensions are zeroed (nothing otherwise, so that runs
        made before the option existed are reused)."""
        dims = self.config.dims_to_zero()
        return {"zero_dims": list(dims)} if dims else {}

    # ----- 1. extract ----------------------------------------------------------------------------
    def extract(self) -> torch.Tensor:
        """Difference-of-means candidates, shape (n_positions, n_layers, d_model)."""
        settings = self._candidate_settings()
        name = "candidates.safetensors"
        if not self._done(name, settings):
            with self._making(name, settings) as cm:
                harmful = mean_activations(cm, self.data("harmful", "train"), batch_size=self.config.batch_size,
                                           progress="mean activations (harmful)" if self.progress else False)
                harmless = mean_activations(cm, self.data("harmless", "train"), batch_size=self.config.batch_size,
                                            progress="mean activations (harmless)" if self.progress else False)
                candidates = zero_dims(diff_of_means(harmful, harmless).float(), self.config.dims_to_zero())
                self.art.write_tensors(name, {"candidates": candidates, "harmful_mean": harmful.float(),
                                              "harmless_mean": harmless.float()},
                                       {"positions": cm.post_instruction_positions,
                                        "position_tokens": cm.post_instruction_tokens, **settings})
                self._plot_candidates(candidates)
        return load_file(str(self.art.path(name)))["candidates"]

    def _plot_candidates(self, candidates: torch.Tensor) -> None:
        from .plots import plot_cosine_similarity, plot_direction_norms

        cm = self.cm
        self.art.write_figure("plots/norms.html", plot_direction_norms(candidates, cm.post_instruction_positions,
                                                                       cm.post_instruction_tokens))
        self.art.write_figure("plots/cosine_similarity.html", plot_cosine_similarity(
            candidates[-1], "Cosine similarity of candidates across layers (last template token)"))

    # ----- 2. select -----------------------------------------------------------------------------
    def select(self, candidates: torch.Tensor) -> tuple[Selection, torch.Tensor]:
        """The score table, the chosen candidate and its direction, shape (d_model,)."""
        sel_config = self.config.selection_config()
        lazy = self.config.selection_mode == "lazy"
        # The exhaustive table does not depend on the filters: changing a threshold only re-chooses.
        scored = {**self._candidate_settings(), **self._settings("selection_mode", data=VAL)}
        score_settings = {**scored, **({"selection": asdict(sel_config)} if lazy else {})}
        full_table = {**scored, "selection_mode": "exhaustive"}
        if lazy and self.art.done("selection.json", full_table):
            score_settings = full_table  # an exhaustive table answers every lazy request: no rescoring
        settings = {**score_settings, "selection": asdict(sel_config)}
        if not self._done("selection.json", score_settings):
            with self._making("selection.json", score_settings) as cm:
                table = score_candidates(cm, candidates, self.data("harmful", "val"), self.data("harmless", "val"),
                                         sel_config, self.config.selection_mode, self.config.batch_size, self.progress)
                self.art.write_json("selection.json", {"table": table.to_dict(),
                                                       "position_tokens": cm.post_instruction_tokens, **score_settings})
        if not self._done("direction.safetensors", settings):
            with self._making("direction.safetensors", settings) as cm:
                record = self.art.read_json("selection.json")
                table = ScoreTable.from_dict(record["table"])
                selection = choose(table, sel_config)
                direction = candidates[selection.position_index, selection.layer].clone()
                self.art.write_json("selection.json", {**record, "selection": selection.to_dict(),
                                                       "config": asdict(sel_config)})
                self._plot_selection(table, selection, sel_config, direction)
                description = {**selection.to_dict(), "model": self.config.model, "d_model": cm.d_model,
                               "norm": float(direction.norm()),
                               "position_token": cm.post_instruction_tokens[selection.position]}
                self.art.write_tensors("direction.safetensors", {"direction": direction}, {"layer": selection.layer})
                self.art.write_json("direction.json", description)
        direction, description = load_direction(self.art.root)
        selection = Selection(**{k: description[k] for k in Selection.__dataclass_fields__})
        return selection, direction

    def _plot_selection(self, table: ScoreTable, selection: Selection, config: SelectionConfig,
                        direction: torch.Tensor) -> None:
        from .plots import plot_projections, plot_selection_scores

        cm = self.cm
        self.art.write_figure("plots/selection_scores.html",
                              plot_selection_scores(table, selection, config, cm.post_instruction_tokens))
        pos = [selection.position]
        harmful = collect_activations(cm, self.data("harmful", "val"), positions=pos)[:, 0]
        harmless = collect_activations(cm, self.data("harmless", "val"), positions=pos)[:, 0]
        self.art.write_figure("plots/projections.html", plot_projections(
            harmful, harmless, direction, f"Projection onto the selected direction (position {selection.position})"))

    # ----- 3 + 4. generate and evaluate ----------------------------------------------------------
    def generate_and_evaluate(self, selection: Selection, direction: torch.Tensor) -> dict[str, float]:
        """Test-split completions for every condition and their substring refusal rates."""
        with_direction = direction_settings(selection, direction)
        rates = {}
        for condition, (kind, intervention, _) in CONDITIONS.items():
            name = f"completions/{condition}.json"
            # Each condition depends on its own kind's prompts; baselines not on the direction either.
            condition_settings = {**self._settings("max_new_tokens", data=((kind, "test"),)),
                                  **(with_direction if intervention else {})}
            if not self._done(name, condition_settings):
                instructions = self.data(kind, "test")
                with self._making(name, condition_settings) as cm:
                    with self._intervention(intervention, direction, selection.layer):
                        completions = generate(cm, instructions, self.config.max_new_tokens, self.config.batch_size,
                                               progress=f"generating {condition}" if self.progress else False)
                    items = [{"instruction": i, "completion": c, "refusal": is_refusal(c)}
                             for i, c in zip(instructions, completions)]
                    self.art.write_json(name, {"condition": condition, "intervention": intervention,
                                               "refusal_rate": refusal_rate(completions), "n": len(items), "items": items})
            rates[condition] = self.art.read_json(name)["refusal_rate"]
        self.art.write_json("evaluations.json", {"refusal_rate": rates,
                                                 **self._settings("max_new_tokens", data=TEST), **with_direction})
        return rates

    def _intervention(self, kind: str | None, direction: torch.Tensor, layer: int):
        if kind is None:
            return nullcontext()
        if kind in ("ablation", "ablation_spared"):
            return ablate(self.cm, direction, spare_first_token=kind == "ablation_spared")
        return add(self.cm, direction, layer, coeff=-1.0 if kind == "subtract" else 1.0)

    # ----- 5. loss -------------------------------------------------------------------------------
    def loss(self, selection: Selection, direction: torch.Tensor) -> dict:
        """CE of the harmless test completions: plain, with the direction ablated, and with random ones ablated."""
        settings = {**self._settings("max_new_tokens", "random_controls", data=(("harmless", "test"),)), **self._zeroed,
                    **direction_settings(selection, direction), "measures": list(LOSS_MEASURES)}
        if not self._done("loss.json", settings):
            items = self.art.read_json("completions/harmless_baseline.json")["items"]
            instructions = [i["instruction"] for i in items]
            completions = [i["completion"] for i in items]
            with self._making("loss.json", settings) as cm:
                def loss_under(label: str, r: torch.Tensor | None = None, spare_first_token: bool = False) -> float:
                    with ablate(cm, r, spare_first_token=spare_first_token) if r is not None else nullcontext():
                        return completion_loss(cm, instructions, completions,
                                               progress=f"completion loss, {label}" if self.progress else False)

                baseline = loss_under("baseline")
                ablated = loss_under("direction ablated", direction)
                spared = loss_under("direction ablated, first token spared", direction, spare_first_token=True)
                randoms = random_directions(self.config.random_controls, cm.d_model)
                randoms = zero_dims(randoms, self.config.dims_to_zero())  # the same kind of direction as r
                controls = [loss_under(f"random direction {i + 1} ablated", r) - baseline for i, r in enumerate(randoms)]
                self.art.write_json("loss.json", {
                    "data": "harmless test completions of the unmodified model",
                    "baseline": baseline, "ablation": ablated, "increase": ablated - baseline,
                    "first_token_spared": {"ablation": spared, "increase": spared - baseline},
                    "random_controls": {"seed": 0, "increases": controls,
                                        "mean_increase": sum(controls) / len(controls) if controls else None},
                })
        return self.art.read_json("loss.json")

    # ----- all -----------------------------------------------------------------------------------
    def run(self) -> dict:
        start = time.time()
        for kind, split in TRAIN + VAL + TEST:  # every prompt, before the model loads: bad data fails early
            self.data(kind, split)
        candidates = self._step("extract", self.extract)
        selection, direction = self._step("select", lambda: self.select(candidates))
        rates = self._step("generate", lambda: self.generate_and_evaluate(selection, direction))
        loss = self._step("loss", lambda: self.loss(selection, direction))
        c = self.config
        summary = {
            "model": c.model,
            "direction": {"position": selection.position, "layer": selection.layer, "bypass": selection.bypass,
                          "induce": selection.induce, "kl": selection.kl, "zero_dims": list(c.dims_to_zero())},
            "refusal_rate": rates,
            "ce_loss": loss,
            "sizes": {**{f"{kind}_{split}": len(self.data(kind, split)) for kind, split in TRAIN + VAL + TEST},
                      "max_new_tokens": c.max_new_tokens},  # instructions used per kind and split
            "selection": asdict(c.selection_config()),
            "timings_s": {**c.timings, "total_s": round(time.time() - start, 1)},  # this invocation
            "compute_s": self.compute_seconds(),  # making each step's artifacts, whenever that happened
            "reused_artifacts": sorted(self.reused),  # finished earlier with the same settings: not redone here
            "peak_rss_mib": None if (peak := _peak_rss_mib()) is None else round(peak),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                       f"{self._cm.device if self._cm else 'model not loaded (every artifact reused)'}",
            "versions": {"torch": torch.__version__},
        }
        self.art.write_json("summary.json", summary)
        return summary

    def compute_seconds(self) -> dict[str, float | None]:
        """Seconds each step's artifacts took to make, from their records (None where one is missing)."""
        steps = {}
        for step, names in STEP_ARTIFACTS.items():
            seconds = [self.art.compute_seconds(n) for n in names]
            steps[step + "_s"] = None if None in seconds else round(sum(seconds), 1)
        steps["total_s"] = None if None in steps.values() else round(sum(steps.values()), 1)
        return steps

    def _step(self, name: str, fn):
        t = time.time()
        result = fn()
        self.config.timings[name + "_s"] = round(time.time() - t, 1)
        return result


def _spared_line(loss: dict) -> list[str]:
    spared = loss.get("first_token_spared")  # absent from runs made before it was measured
    if not spared:
        return []
    return [f"  ablated everywhere but each prompt's first token (the attention sink): {spared['increase']:+.3f}"]


def _control_line(loss: dict) -> list[str]:
    controls = loss.get("random_controls") or {}
    increases = controls.get("increases")
    if not increases:
        return []
    spread = (", ".join(f"{x:+.3f}" for x in increases) if len(increases) <= 5 else
              f"median {median(increases):+.3f}, {min(increases):+.3f} to {max(increases):+.3f}")
    cheaper = sum(x < loss["increase"] for x in increases)
    return [f"  control, {len(increases)} random unit directions ablated instead: "
            f"{controls['mean_increase']:+.3f} on average ({spread}); "
            f"{cheaper} of {len(increases)} cost less than the direction"]


def _time_line(summary: dict) -> str:
    line = f"time: {summary['timings_s']['total_s']:.0f} s"
    made = (summary.get("compute_s") or {}).get("total_s")
    if summary.get("reused_artifacts") and made is not None:
        line += f" (artifacts from earlier runs reused; making all of them took {made:.0f} s)"
    return line + (f", peak RSS {summary['peak_rss_mib']} MiB" if summary.get("peak_rss_mib") is not None else "")


def format_summary(summary: dict) -> str:
    """A plain-text table of a run's results."""
    d = summary["direction"]
    r = summary["refusal_rate"]
    lines = [
        f"model: {summary['model']}",
        f"direction: position {d['position']}, layer {d['layer']}  (bypass {d['bypass']:.2f}, induce {d['induce']:.2f}, KL {d['kl']:.3f})"
        + (f"; residual dims {', '.join(map(str, d['zero_dims']))} zeroed (not the paper's method)" if d.get("zero_dims") else ""),
        "",
    ]
    width = max(len(c.label) for c in CONDITIONS.values()) + 3
    lines += [f"{'condition':<{width}}{'refusal rate':>14}", "-" * (width + 14)]
    lines += [f"{c.label:<{width}}{r[k]:>13.1%}" for k, c in CONDITIONS.items()]
    loss = summary["ce_loss"]
    lines += ["", f"CE loss on harmless completions: {loss['baseline']:.3f} -> {loss['ablation']:.3f} "
                  f"nats/token under ablation ({loss['increase']:+.3f})",
              *_spared_line(loss),
              *_control_line(loss),
              _time_line(summary)]
    return "\n".join(lines)
