"""The run folder: the one reader and writer of a pipeline run's artifacts.

A run folder holds ``run.json`` (schema version and the model it belongs to), the artifacts, one record per
artifact (``<artifact>.record.json``: the SHA-256 of its bytes, the settings it was made with, including the
digests of the artifacts it was made from, and the seconds making it took) and, once every step is done,
``summary.json``, which names the digest of every artifact it summarises. The rules that keep it honest:

- an artifact is reused only if its bytes match its record and its settings are the ones asked for; a
  damaged artifact is made again with a one-line notice;
- writing anything new first removes ``summary.json`` (the run is no longer finished) and the artifacts made
  from the one being replaced (their inputs are gone); each file is written atomically under a unique name;
- readers verify digests: a changed or unfinished run is a clear error, never silently mixed results;
- one process writes a folder at a time (``run.lock``; a lock left by a dead process is taken over).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data import CHECKOUT_HINT, PACKAGE_DIR, repository_path
from .files import atomic_write, atomic_write_text, sha256_file
from .loading import load_model, model_version
from .models import ChatModel

SCHEMA = 2
RUN_FILE, SUMMARY, LOCK = "run.json", "summary.json", "run.lock"
RECORD_SUFFIX = ".record.json"
SHIPPED_RUN = repository_path("runs/embedded")  # the shipped run on the embedded model


class RunError(ValueError):
    """A run folder, or one of its artifacts, cannot be used as asked; the message names the file."""


class RunFolder:
    """Artifacts of one run, each with its record; see the module docstring for the rules."""

    def __init__(self, root: str | Path, create: bool = False):
        if not str(root).strip():
            raise RunError("The output folder is empty (''): name a folder, e.g. --out runs/demo.")
        self.root = Path(root)
        self._changed = False
        if create:
            try:
                (self.root / "completions").mkdir(parents=True, exist_ok=True)
                (self.root / "plots").mkdir(exist_ok=True)
                atomic_write_text(self.root / ".write-test", "")
                (self.root / ".write-test").unlink()
            except OSError as err:
                raise PermissionError(f"Cannot write to the output folder {self.root}: {err}") from err
        elif not self.root.is_dir():
            hint = CHECKOUT_HINT if self.root == SHIPPED_RUN else "run `python -m refusal_helpers run` first."
            raise FileNotFoundError(f"No run folder at {self.root}: {hint}")

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def label(self) -> str:
        """The folder as results name it: relative to the project root when inside it (``runs/embedded``), so that
        a shipped result does not record the machine it was made on."""
        root, project = self.root.resolve(), PACKAGE_DIR.parent.resolve()
        return str(root.relative_to(project)) if root.is_relative_to(project) else str(root)

    # ----- identity and locking -------------------------------------------------------------------
    def identity(self) -> dict | None:
        """run.json: the schema version and the model this folder belongs to (None for a new folder)."""
        return self._json(self.path(RUN_FILE)) if self.path(RUN_FILE).is_file() else None

    def claim(self, identity: dict, force: bool = False) -> str | None:
        """Make this folder `identity`'s run (``{"model", "model_version"}``); refuse another model's or another
        schema's folder unless `force`. Returns a notice when the model's weights changed since."""
        existing = self.identity()
        has_artifacts = any(self.root.glob(f"**/*{RECORD_SUFFIX}")) or any(self.root.glob("**/*.settings.json"))
        notice = None
        if existing is None and has_artifacts and not force:
            raise RunError(f"{self.root} holds a run written by an older version of refusal_helpers (no {RUN_FILE}): "
                           "use another --out folder, or --force to overwrite it.")
        if existing is not None and not force:
            if existing.get("schema") != SCHEMA:
                raise RunError(f"{self.root} was written with run-folder schema {existing.get('schema')}, this version "
                               f"writes {SCHEMA}: use another --out folder, or --force to overwrite it.")
            if existing["model"] != identity["model"]:
                raise RunError(f"{self.root} is a run of {existing['model']!r}, not {identity['model']!r}: use another "
                               "--out folder, or --force to overwrite it.")
            if existing.get("model_version") != identity.get("model_version"):
                notice = (f"the weights of {identity['model']!r} changed since {self.root} was made "
                          f"({existing.get('model_version')} -> {identity.get('model_version')}): its artifacts are remade.")
        if force and existing is not None and existing.get("model") != identity["model"]:
            self.begin_changes()
        atomic_write_text(self.path(RUN_FILE), json.dumps({"schema": SCHEMA, **identity}, indent=2) + "\n")
        return notice

    def relabel(self, model: str) -> list[str]:
        """Record this run as `model`'s, where `model` names the weights it was made with (the same model
        version under another name: a recipe trial's ``"embedded:FOLDER"`` once that adapter is adopted as
        ``"embedded"``), so that its artifacts are reused under the new name. The summary is dropped (resuming
        writes it again). Returns the artifacts relabelled."""
        existing = self.identity()
        if existing is None:
            raise RunError(f"{self.root} has no {RUN_FILE}: there is no run to relabel.")
        version = model_version(model)
        if version is None or version != existing.get("model_version"):
            raise RunError(f"{self.root} was made with weights {existing.get('model_version')}, but {model!r} names "
                           f"weights {version}: only a name for the same weights can take over its artifacts.")
        self.begin_changes()
        relabelled = []
        for path in sorted(self.root.glob(f"**/*{RECORD_SUFFIX}")):
            record = json.loads(path.read_text())
            if record.get("settings", {}).get("model") == existing["model"]:
                record["settings"]["model"] = model
                atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
                relabelled.append(str(path.relative_to(self.root))[: -len(RECORD_SUFFIX)])
        atomic_write_text(self.path(RUN_FILE), json.dumps({**existing, "model": model}, indent=2) + "\n")
        return relabelled

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``run.lock`` while writing; a clear error if another live process holds it."""
        path = self.path(LOCK)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._lock_holder(path)
                if holder is not None:
                    raise RunError(f"Another process (pid {holder.get('pid')} on {holder.get('host')}, started "
                                   f"{holder.get('started')}) is writing to {self.root}. Wait for it to finish, or "
                                   f"delete {path} if it is no longer running.") from None
                print(f"notice: {path} was left by a process that is no longer running; taking it over.")
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    @staticmethod
    def _lock_holder(path: Path) -> dict | None:
        """Who holds a lock file, or None when it is stale (its process, on this host, is gone)."""
        try:
            holder = json.loads(path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            holder = {}
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
        if not holder and time.time() - path.stat().st_mtime > 60:
            return None  # an empty lock never finished being written
        return holder

    # ----- records --------------------------------------------------------------------------------
    def record(self, name: str) -> dict | None:
        """The record of `name` (None when it or its artifact is missing, or the record is unreadable)."""
        path = self.path(name + RECORD_SUFFIX)
        if not (path.is_file() and self.path(name).is_file()):
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def digest(self, name: str) -> str:
        """The recorded SHA-256 of `name`, after checking the file still has it (a RunError otherwise)."""
        record = self.record(name)
        if record is None:
            raise RunError(f"{self.path(name)} is missing or has no readable record: resume the run to remake it.")
        if sha256_file(self.path(name)) != record.get("sha256"):
            raise RunError(f"{self.path(name)} does not match its record (it changed after it was written): "
                           "resume the run to remake it.")
        return record["sha256"]

    def fresh(self, name: str, settings: dict) -> bool:
        """Whether `name` exists, is intact and was made with `settings` (a damaged one is noted, not reused)."""
        record = self.record(name)
        if record is None or record.get("settings") != settings:
            return False
        if sha256_file(self.path(name)) != record.get("sha256"):
            print(f"notice: {self.path(name)} does not match its record (damaged or edited): remaking it.")
            return False
        return True

    def compute_seconds(self, name: str) -> float | None:
        record = self.record(name)
        return None if record is None else record.get("compute_s")

    # ----- writing --------------------------------------------------------------------------------
    def begin_changes(self) -> None:
        """Before the first new file: the run is no longer finished."""
        if not self._changed:
            self.path(SUMMARY).unlink(missing_ok=True)
            self._changed = True

    def _dependents(self, name: str) -> list[str]:
        """Artifacts whose records name `name` among their inputs, and theirs, transitively."""
        found, todo = [], [name]
        records = {str(p.relative_to(self.root))[: -len(RECORD_SUFFIX)]: p for p in self.root.glob(f"**/*{RECORD_SUFFIX}")}
        while todo:
            current = todo.pop()
            for other, path in records.items():
                try:
                    inputs = json.loads(path.read_text()).get("settings", {}).get("inputs", {})
                except (OSError, json.JSONDecodeError):
                    continue
                if current in inputs and other not in found:
                    found.append(other)
                    todo.append(other)
        return found

    def _write(self, name: str, write, settings: dict, seconds: float | None) -> None:
        self.begin_changes()
        for dependent in self._dependents(name):
            self.path(dependent).unlink(missing_ok=True)
            self.path(dependent + RECORD_SUFFIX).unlink(missing_ok=True)
        self.path(name + RECORD_SUFFIX).unlink(missing_ok=True)
        atomic_write(self.path(name), write)
        record = {"sha256": sha256_file(self.path(name)), "settings": settings,
                  "compute_s": None if seconds is None else round(seconds, 1)}
        atomic_write_text(self.path(name + RECORD_SUFFIX), json.dumps(record, indent=2, ensure_ascii=False) + "\n")

    def write_json(self, name: str, data: Any, settings: dict, seconds: float | None = None) -> None:
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        self._write(name, lambda p: p.write_text(text, encoding="utf-8"), settings, seconds)

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor], settings: dict,
                      seconds: float | None = None) -> None:
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self._write(name, lambda p: save_file(contiguous, str(p)), settings, seconds)

    def write_figure(self, name: str, fig, settings: dict) -> None:
        self._write(name, lambda p: fig.write_html(str(p), include_plotlyjs="cdn"), settings, None)

    def write_summary(self, summary: dict, names: list[str]) -> None:
        """summary.json, last: the figures and the digest of every artifact they come from."""
        summary = {**summary, "artifacts": {name: self.digest(name) for name in names}}
        atomic_write_text(self.path(SUMMARY), json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")

    # ----- reading --------------------------------------------------------------------------------
    def _json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RunError(f"{path} is not valid JSON ({err}): resume the run to remake it.") from None

    def read_json(self, name: str) -> Any:
        """An artifact's JSON, after checking it against its record."""
        self.digest(name)
        return self._json(self.path(name))

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """An artifact's tensors, after checking it against its record."""
        self.digest(name)
        try:
            return load_file(str(self.path(name)))
        except (SafetensorError, OSError) as err:
            raise RunError(f"{self.path(name)} cannot be read ({err}): resume the run to remake it.") from None

    def summary(self) -> dict:
        """summary.json of a finished run, after checking every artifact it names still has the same digest."""
        if not self.path(SUMMARY).is_file():
            raise RunError(f"The run in {self.root} is not finished (no {SUMMARY}): resume it with the command that "
                           "started it.")
        summary = self._json(self.path(SUMMARY))
        for name, digest in summary.get("artifacts", {}).items():
            if self.digest(name) != digest:
                raise RunError(f"{self.path(name)} changed after {self.path(SUMMARY)} was written: resume the run.")
        return summary

    def finished(self) -> bool:
        try:
            self.summary()
        except RunError:
            return False
        return True

    def candidates(self) -> torch.Tensor:
        return self.read_tensors("candidates.safetensors")["candidates"]

    def direction(self) -> tuple[torch.Tensor, dict]:
        """The selected direction and its selection record (position, layer, scores, ...)."""
        direction = self.read_tensors("direction.safetensors")["direction"]
        made_from = self.record("direction.safetensors")["settings"].get("inputs", {}).get("selection.json")
        if made_from != self.digest("selection.json"):
            raise RunError(f"{self.path('selection.json')} describes another direction than "
                           f"{self.path('direction.safetensors')}: resume the run.")
        return direction, self.read_json("selection.json")["selection"]

    def completions(self, condition: str) -> dict:
        return self.read_json(f"completions/{condition}.json")

    def load_model(self, device: str | None = None, dtype: str | None = None) -> ChatModel:
        """The model this run was made with (from run.json, not the current directory), checked to be the same
        weights; a clear error when they changed."""
        identity = self.identity()
        if identity is None:
            raise RunError(f"{self.root} has no {RUN_FILE}: it is not a run folder of this version.")
        if model_version(identity["model"]) != identity.get("model_version"):
            raise RunError(f"The weights of {identity['model']!r} changed since the run in {self.root} was made "
                           f"({identity.get('model_version')} -> {model_version(identity['model'])}).")
        return load_model(identity["model"], device=device, dtype=dtype)


def load_direction(folder: str | Path = SHIPPED_RUN) -> tuple[torch.Tensor, dict]:
    """The direction of a run (default: the shipped run on the embedded model) and its selection record."""
    return RunFolder(folder).direction()


def load_run_summary(folder: str | Path = SHIPPED_RUN) -> dict:
    """The summary of a finished run, checked against its artifacts."""
    return RunFolder(folder).summary()
