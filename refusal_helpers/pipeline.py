"""The paper's pipeline on one model: the steps of `steps`, each stored in a run folder (`runs.RunFolder`).

1. extract -> ``candidates.safetensors`` (+ ``plots/norms.html``, ``plots/cosine_similarity.html``);
2. select -> ``scores.json`` (the score table), ``selection.json`` (the choice), ``direction.safetensors``
   (+ ``plots/selection_scores.html``, ``plots/projections.html``);
3. generate and judge -> ``completions/<condition>.json``;
4. loss -> ``loss.json``;
then ``summary.json``. A step is skipped when its artifacts are intact and were made with the same settings
(including the digests of the artifacts they were made from), so a re-run resumes where the last one
stopped, a changed setting redoes exactly what depends on it, and a failed step leaves the earlier state.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch

from . import steps
from .data import HARMFUL_HUB_SETS, HARMLESS_HUB_SETS, data_record, split_instructions
from .devices import resolve_device_dtype
from .embedded import preset
from .judges import VERDICTS, judge_by_name, refused_count
from .loading import EMBEDDED, embedded_adapter, load_model, model_identity_name, model_version
from .models import ChatModel
from .runs import RunFolder
from .selection import ScoreTable, Selection, SelectionConfig, choose, keep_consistent, score_candidates
from .steps import CONDITIONS

KINDS = ("harmful", "harmless")
SPLITS = ("train", "val", "test")
CANDIDATE_PLOTS = ("plots/norms.html", "plots/cosine_similarity.html")
SELECTION_PLOTS = ("plots/selection_scores.html", "plots/projections.html")


@dataclass
class PipelineConfig:
    model: str = EMBEDDED
    out: str = "runs/demo"  # never the shipped run's folder by default (see default_out)
    n_train: int | None = 128  # instructions per kind; None: the whole split
    n_val: int | None = 32
    n_test: int | None = 32
    max_new_tokens: int = 48
    batch_size: int = 32
    selection_mode: str = "lazy"
    kl_threshold: float | None = None  # None: the model's preset, else the paper's 0.1
    induce_threshold: float = 0.0
    max_layer_fraction: float = 0.8
    random_controls: int = 3  # random unit directions ablated as a control in the loss step
    judge: str = "substring"  # or "logit", "classifier:<model>" (see judges)
    zero_dims: tuple[int, ...] | None = None  # zeroed in every candidate and control; None: the preset, else none
    filter_train: bool = True  # the paper's filter: keep prompts whose baseline refusal score has the kind's sign
    filter_val: bool = True
    harmful_source: str = "bundled"  # or a hub dataset name (advbench, jailbreakbench, harmbench)
    harmless_source: str = "bundled"  # or alpaca, jailbreakbench_benign
    device: str | None = None
    dtype: str | None = None
    force: bool = False  # overwrite a folder that holds another model's run
    timings: dict = field(default_factory=dict)

    @cached_property
    def preset(self) -> dict:
        """Settings measured for this model (the embedded model's adapter, from its folder's presets.json), empty
        for any other; looked up once."""
        embedded, adapter = embedded_adapter(self.model)
        return preset(adapter) if embedded else {}

    def dims_to_zero(self) -> tuple[int, ...]:
        """Residual dimensions zeroed in every candidate and random control (not the paper's method)."""
        dims = self.zero_dims if self.zero_dims is not None else self.preset.get("zero_dims", ())
        return tuple(sorted(set(dims)))

    def selection_config(self) -> SelectionConfig:
        kl = self.kl_threshold if self.kl_threshold is not None else self.preset.get("kl_threshold", 0.1)
        return SelectionConfig(self.max_layer_fraction, kl, self.induce_threshold)

    def source(self, kind: str) -> str:
        return self.harmful_source if kind == "harmful" else self.harmless_source

    def check(self) -> None:
        """Clear errors for settings that cannot run, before anything loads."""
        selection = self.selection_config()
        if not all(math.isfinite(x) for x in (selection.kl_threshold, selection.induce_threshold)):
            raise ValueError("Thresholds must be finite numbers (a run records them in JSON): to keep every candidate, "
                             "use a large number such as --kl-threshold 1e9.")
        if self.selection_mode not in ("lazy", "exhaustive"):
            raise ValueError(f"selection_mode must be 'lazy' or 'exhaustive', got {self.selection_mode!r}.")
        for kind, allowed in (("harmful", HARMFUL_HUB_SETS), ("harmless", HARMLESS_HUB_SETS)):
            if self.source(kind) != "bundled" and self.source(kind) not in allowed:
                raise ValueError(f"Unknown {kind} source {self.source(kind)!r}: expected 'bundled' or one of {allowed}.")
        resolve_device_dtype(self.device, self.dtype)


def default_out(model: str) -> str:
    """runs/<model alias>; the embedded model's runs go to runs/demo, since runs/embedded is the shipped run."""
    if model == EMBEDDED:
        return "runs/demo"
    alias = model_identity_name(model).rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")
    return f"runs/{alias}"


class Pipeline:
    """The paper's steps on one model, stored in `config.out`. `run()` does them all; the model loads on first
    use, so a resumed run whose every artifact is finished never loads it."""

    def __init__(self, config: PipelineConfig, cm: ChatModel | None = None, progress: bool = True):
        config.check()
        if cm is not None and model_identity_name(cm.name) != model_identity_name(config.model):
            raise ValueError(f"The model passed is {cm.name!r} but config.model is {config.model!r}: artifacts "
                             "record config.model, so the two must name the same model.")
        self.config, self.progress, self._cm = config, progress, cm
        self.run_folder = RunFolder(config.out, create=True)
        self.identity = {"model": model_identity_name(config.model), "model_version": model_version(config.model)}
        dtype = cm.dtype if cm is not None else resolve_device_dtype(config.device, config.dtype)[1]
        self._common = {**self.identity, "dtype": str(dtype).removeprefix("torch.")}
        self._data: dict[tuple[str, str], list[str]] = {}
        self._judge = judge_by_name(config.judge)
        self.reused: set[str] = set()

    @property
    def cm(self) -> ChatModel:
        if self._cm is None:
            t = time.time()
            self._cm = load_model(self.config.model, device=self.config.device, dtype=self.config.dtype)
            self.config.timings["load_model_s"] = round(time.time() - t, 1)
        return self._cm

    def data(self, kind: str, split: str) -> list[str]:
        """The run's instructions of a kind and split, sized by the config (before any filtering)."""
        if (kind, split) not in self._data:
            n = {"train": self.config.n_train, "val": self.config.n_val, "test": self.config.n_test}[split]
            self._data[kind, split] = split_instructions(self.config.source(kind), kind, split, n)
        return self._data[kind, split]

    def filtered(self, split: str) -> tuple[list[str], list[str]]:
        """Harmful and harmless instructions of `split`, filtered by the model's baseline refusal score when the
        config says so (the paper's filter); a clear error when a kind is left empty."""
        harmful, harmless = self.data("harmful", split), self.data("harmless", split)
        if not getattr(self.config, f"filter_{split}"):
            return harmful, harmless
        kept = keep_consistent(self.cm, harmful, harmless, self.config.batch_size)
        for kind, before, after in zip(KINDS, (harmful, harmless), kept):
            if not after:
                raise ValueError(f"Filtering the {kind} {split} instructions by the model's baseline refusal score left "
                                 f"none of {len(before)} (the model {'never' if kind == 'harmful' else 'always'} refuses "
                                 f"them): this model does not refuse as the method needs, or use --no-filter-{split}.")
        return kept

    def settings(self, *keys: str, data: tuple[tuple[str, str], ...] = (), inputs: tuple[str, ...] = ()) -> dict:
        """What an artifact depends on: the model, the named config fields, the instructions of each (kind,
        split) in `data`, and the digests of the artifacts in `inputs`."""
        c = asdict(self.config)
        out = {**self._common, **{k: c[k] for k in keys},
               **{f"{kind}_{split}": data_record(self.config.source(kind), self.data(kind, split)) for kind, split in data}}
        if inputs:
            out["inputs"] = {name: self.run_folder.digest(name) for name in inputs}
        return out

    def _reuse(self, name: str, settings: dict) -> bool:
        if self.run_folder.fresh(name, settings):
            self.reused.add(name)
            return True
        return False

    # ----- 1. extract ----------------------------------------------------------------------------
    def extract(self) -> torch.Tensor:
        """Difference-of-means candidates, shape (n_positions, n_layers, d_model)."""
        name = "candidates.safetensors"
        settings = {**self.settings("filter_train", data=(("harmful", "train"), ("harmless", "train"))),
                    "zero_dims": list(self.config.dims_to_zero())}
        if not self._reuse(name, settings):
            started = time.time()
            harmful, harmless = self.filtered("train")
            tensors = steps.extract(self.cm, harmful, harmless, self.config.dims_to_zero(), self.config.batch_size,
                                    self.progress)
            tensors["n_train"] = torch.tensor([len(harmful), len(harmless)])  # after filtering
            self.run_folder.write_tensors(name, tensors, settings, time.time() - started)
        candidates = self.run_folder.candidates()
        self._plot_candidates(candidates)
        return candidates

    def _plot_candidates(self, candidates: torch.Tensor) -> None:
        from .plots import plot_cosine_similarity, plot_direction_norms, token_texts

        inputs = self.settings(inputs=("candidates.safetensors",))
        if all(self._reuse(name, inputs) for name in CANDIDATE_PLOTS):
            return
        labels = token_texts(self.cm.tokenizer, self.cm.post_instruction_ids)
        self.run_folder.write_figure("plots/norms.html", plot_direction_norms(
            candidates, self.cm.post_instruction_positions, labels), inputs)
        self.run_folder.write_figure("plots/cosine_similarity.html", plot_cosine_similarity(
            candidates[-1], "Cosine similarity of candidates across layers (last template token)"), inputs)

    # ----- 2. select -----------------------------------------------------------------------------
    def score(self, candidates: torch.Tensor) -> ScoreTable:
        """The score table (reused when intact; an exhaustive table answers every lazy request)."""
        config = self.config.selection_config()
        lazy = self.config.selection_mode == "lazy"
        scored = self.settings("filter_val", "selection_mode", data=(("harmful", "val"), ("harmless", "val")),
                               inputs=("candidates.safetensors",))
        wanted = {**scored, **({"selection": asdict(config)} if lazy else {})}
        exhaustive = {**scored, "selection_mode": "exhaustive"}
        if lazy and self.run_folder.fresh("scores.json", exhaustive):
            wanted = exhaustive
        if not self._reuse("scores.json", wanted):
            started = time.time()
            harmful, harmless = self.filtered("val")
            table = score_candidates(self.cm, candidates, harmful, harmless, config, self.config.selection_mode,
                                     self.config.batch_size, self.progress)
            choose(table, config)  # a table none of whose candidates passes is not stored: the earlier state stays
            record = {"table": table.to_dict(), "scored_on": {"harmful_val": len(harmful), "harmless_val": len(harmless)},
                      "position_ids": self.cm.post_instruction_ids}
            self.run_folder.write_json("scores.json", record, wanted, time.time() - started)
        return ScoreTable.from_dict(self.run_folder.read_json("scores.json")["table"])

    def select(self, candidates: torch.Tensor) -> tuple[Selection, torch.Tensor]:
        """The chosen candidate and its direction (written only if a candidate passes the filters)."""
        config = self.config.selection_config()
        table = self.score(candidates)
        started = time.time()
        selection = choose(table, config)
        chosen = {**self.settings(inputs=("scores.json",)), "selection": asdict(config)}
        if not self._reuse("selection.json", chosen):
            position_id = self.run_folder.read_json("scores.json")["position_ids"][selection.position]
            self.run_folder.write_json("selection.json", {"selection": selection.to_dict(), "position_id": position_id},
                                       chosen, time.time() - started)
        if not self._reuse("direction.safetensors", self.settings(inputs=("selection.json",))):
            direction = candidates[selection.position_index, selection.layer].clone()
            self.run_folder.write_tensors("direction.safetensors", {"direction": direction},
                                          self.settings(inputs=("selection.json",)), 0.0)
        direction, _ = self.run_folder.direction()
        self._plot_selection(table, selection, config, direction)
        return selection, direction

    def _plot_selection(self, table: ScoreTable, selection: Selection, config: SelectionConfig,
                        direction: torch.Tensor) -> None:
        from .activations import collect_activations
        from .plots import plot_projections, plot_selection_scores, token_texts

        inputs = self.settings(inputs=("direction.safetensors",))
        if all(self._reuse(name, inputs) for name in SELECTION_PLOTS):
            return
        cm = self.cm
        labels = token_texts(cm.tokenizer, cm.post_instruction_ids)
        self.run_folder.write_figure("plots/selection_scores.html",
                                     plot_selection_scores(table, selection, config, labels), inputs)
        acts = [collect_activations(cm, self.data(kind, "val"), positions=[selection.position])[:, 0] for kind in KINDS]
        self.run_folder.write_figure("plots/projections.html", plot_projections(
            *acts, direction, f"Projection onto the selected direction (position {selection.position})"), inputs)

    # ----- 3. generate and judge -----------------------------------------------------------------
    def generate(self, selection: Selection, direction: torch.Tensor) -> dict[str, dict]:
        """Judged test-split completions for every condition: ``{condition: {"refused", "n"}}``."""
        counts = {}
        for condition, (kind, intervention, _) in CONDITIONS.items():
            name = f"completions/{condition}.json"
            # Each condition depends on its own kind's prompts; baselines not on the direction either.
            settings = self.settings("max_new_tokens", "judge", data=((kind, "test"),),
                                     inputs=("direction.safetensors",) if intervention else ())
            if not self._reuse(name, settings):
                started = time.time()
                items = steps.generate_condition(self.cm, condition, self.data(kind, "test"), direction,
                                                 selection.layer, self.config.max_new_tokens, self.config.batch_size,
                                                 self.progress, self._judge)
                verdicts = {v: sum(item["verdict"] == v for item in items) for v in VERDICTS}
                record = {"condition": condition, "intervention": intervention, "judge": self.config.judge,
                          "refused": refused_count(items), "verdicts": verdicts, "n": len(items), "items": items}
                self.run_folder.write_json(name, record, settings, time.time() - started)
            made = self.run_folder.completions(condition)
            counts[condition] = {"refused": made["refused"], "harmful": made["verdicts"]["harmful"], "n": made["n"]}
        return counts

    # ----- 4. loss -------------------------------------------------------------------------------
    def loss(self, direction: torch.Tensor) -> dict:
        """CE of the harmless test completions: plain, with the direction ablated, and with random ones ablated."""
        name = "loss.json"
        settings = {**self.settings("random_controls",
                                    inputs=("direction.safetensors", "completions/harmless_baseline.json")),
                    "zero_dims": list(self.config.dims_to_zero())}
        if not self._reuse(name, settings):
            started = time.time()
            items = self.run_folder.completions("harmless_baseline")["items"]
            loss = steps.ablation_loss(self.cm, [i["instruction"] for i in items], [i["completion"] for i in items],
                                       direction, self.config.random_controls, self.config.dims_to_zero(), self.progress)
            self.run_folder.write_json(name, loss, settings, time.time() - started)
        return self.run_folder.read_json(name)

    # ----- all -----------------------------------------------------------------------------------
    def run(self) -> dict:
        start = time.time()
        for kind in KINDS:  # every prompt, before the model loads: bad data fails early
            for split in SPLITS:
                self.data(kind, split)
        with self.run_folder.lock():
            notice = self.run_folder.claim(self.identity, self.config.force)
            if notice:
                print(f"notice: {notice}")
            candidates = self._step("extract", self.extract)
            selection, direction = self._step("select", lambda: self.select(candidates))
            counts = self._step("generate", lambda: self.generate(selection, direction))
            loss = self._step("loss", lambda: self.loss(direction))
            summary = self._summary(selection, direction, counts, loss, time.time() - start)
            self.run_folder.write_summary(summary, sorted(self._artifacts()))
        return self.run_folder.summary()

    def _artifacts(self) -> list[str]:
        return ["candidates.safetensors", "scores.json", "selection.json", "direction.safetensors", "loss.json",
                *CANDIDATE_PLOTS, *SELECTION_PLOTS, *(f"completions/{c}.json" for c in CONDITIONS)]

    def _summary(self, selection: Selection, direction: torch.Tensor, counts: dict, loss: dict, seconds: float) -> dict:
        c = self.config
        timings = {k: v for k, v in c.timings.items() if k.endswith("_s")}
        peak = _peak_rss_mib()
        return {
            "model": c.model, **{k: v for k, v in self._common.items() if k != "model"},
            "direction": {"position": selection.position, "layer": selection.layer, "bypass": selection.bypass,
                          "induce": selection.induce, "kl": selection.kl, "norm": float(direction.norm()),
                          "zero_dims": list(c.dims_to_zero())},
            "judge": c.judge,
            "refusal_rate": {k: v["refused"] / v["n"] for k, v in counts.items()},
            "refused": counts,
            "ce_loss": loss,
            "sizes": {**{f"{kind}_{split}": len(self.data(kind, split)) for kind in KINDS for split in SPLITS},
                      "max_new_tokens": c.max_new_tokens},  # instructions used per kind and split, before filtering
            "filter": {"train": c.filter_train, "val": c.filter_val,  # and how many prompts each step kept
                       "train_kept": dict(zip(KINDS, self.run_folder.read_tensors("candidates.safetensors")["n_train"].tolist())),
                       "val_kept": self.run_folder.read_json("scores.json")["scored_on"]},
            "selection": asdict(c.selection_config()),
            "timings_s": {**timings, "total_s": round(seconds, 1)},  # this invocation
            "compute_s": self.compute_seconds(),  # making each step's artifacts, whenever that happened
            "reused_artifacts": sorted(self.reused),  # finished earlier with the same settings: not redone here
            "peak_rss_mib": None if peak is None else round(peak),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                       f"{self._cm.device if self._cm else 'model not loaded (every artifact reused)'}",
            "versions": {"torch": torch.__version__},
        }

    STEP_ARTIFACTS = {"extract": ["candidates.safetensors"],
                      "select": ["scores.json", "selection.json", "direction.safetensors"],
                      "generate": [f"completions/{c}.json" for c in CONDITIONS], "loss": ["loss.json"]}

    def compute_seconds(self) -> dict[str, float | None]:
        """Seconds each step's artifacts took to make, from their records (None where one is missing)."""
        out = {}
        for step, names in self.STEP_ARTIFACTS.items():
            seconds = [self.run_folder.compute_seconds(n) for n in names]
            out[step + "_s"] = None if None in seconds else round(sum(seconds), 1)
        out["total_s"] = None if None in out.values() else round(sum(out.values()), 1)
        return out

    def _step(self, name: str, fn):
        t = time.time()
        result = fn()
        self.config.timings[name + "_s"] = round(time.time() - t, 1)
        return result


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
