"""Shipping a trained adapter: `adopt(folder)` makes an adapter that `train --trajectory` wrote elsewhere the
embedded model's (``data/organism``), so that a recipe chosen on the recipe splits can be trained once, kept,
and shipped later by ``make remake ADOPT=<folder>`` (which then remakes everything downstream of it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..embedded import adapter_digest, adapter_dir, recipe_changes
from .training import DEFAULT_RECIPE, written_recipe
from .trajectory import FOLDER as TRAJECTORY

# What `train` writes that describes the adapter; the shipped folder's other files (the distilled replies, the
# presets keyed by adapter digest, the jailbreak suffix) stay, and the remake measures them for the new one.
TRAINED_FILES = ("adapter_model.safetensors", "adapter_config.json", "recipe.json", "training.json")


def adopt(folder: Path, into: Path | None = None) -> str:
    """Copy the adapter in `folder`, its recipe, training log and trajectory over those in `into` (default: the
    shipped adapter's folder); return its digest. Its recipe must be `DEFAULT_RECIPE`, so that ``train --out
    data/organism`` goes on reproducing the shipped adapter."""
    into = into or adapter_dir()
    missing = [name for name in (*TRAINED_FILES, f"{TRAJECTORY}/trajectory.json") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} lacks {', '.join(missing)}: expected a folder written by `python -m "
                         "refusal_helpers.organism train --out FOLDER --trajectory` (the remake needs the trajectory).")
    changes = recipe_changes(written_recipe(json.loads((folder / "recipe.json").read_text())), DEFAULT_RECIPE)
    if changes:
        raise ValueError(f"{folder}'s recipe differs from DEFAULT_RECIPE (refusal_helpers/organism/training.py) in "
                         + ", ".join(f"{key} (it has {value!r})" for key, value in changes.items())
                         + ": set DEFAULT_RECIPE to the recipe being shipped first.")
    if folder.resolve() != into.resolve():
        for name in TRAINED_FILES:
            shutil.copyfile(folder / name, into / name)
        shutil.rmtree(into / TRAJECTORY, ignore_errors=True)
        shutil.copytree(folder / TRAJECTORY, into / TRAJECTORY)
    return adapter_digest(into)
