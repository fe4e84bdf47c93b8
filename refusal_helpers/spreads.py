"""How far adapters of one recipe lie apart: trained with other seeds (`seed_spreads`) or again with the same
seed (`retrainings`), from `figures.recipe_figures` rows."""

from __future__ import annotations

import json


def seed_spreads(rows: list[dict]) -> list[dict]:
    """How far adapters of one recipe trained more than once (other seeds, or the same seed again) lie apart on
    the recipe splits, for each recipe that `recipe_figures` rows hold two or more times: its changes from the
    shipped recipe (the seed aside), the rows' names, and per kind they all measured the largest difference in
    refused prompts.
    The shipped recipe comes first."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if not row["untuned"]:
            recipe = {k: v for k, v in row["changes"].items() if k != "seed"}
            groups.setdefault(json.dumps(recipe, sort_keys=True), []).append(row)
    spreads = [{"changes": json.loads(key), "names": [r["name"] for r in group],
                **{kind: max(r[kind]["refused"] for r in group) - min(r[kind]["refused"] for r in group)
                   for kind in ("harmful", "harmless") if all(r[kind] for r in group)}}
               for key, group in groups.items() if len(group) >= 2]
    return sorted(spreads, key=lambda spread: bool(spread["changes"]))



def retrainings(rows: list[dict]) -> list[dict]:
    """Recipes that `recipe_figures` rows hold trained more than once with the same seed (as other weights): their
    changes from the shipped recipe (seed included), one row's name, digest and final loss per training, the
    distinct machines and library versions (JSON) they trained on, and per kind they all measured whether every
    training refused exactly the same prompts."""
    groups: dict[str, dict[str, dict]] = {}  # changes -> digest -> the first row of those weights
    for row in rows:
        if not row["untuned"]:
            groups.setdefault(json.dumps(row["changes"], sort_keys=True), {}).setdefault(row["model_version"], row)
    return [{"changes": group[0]["changes"], "names": [r["name"] for r in group],
             "versions": [r["model_version"] for r in group],
             "final_losses": [r["training"].get("final_loss") for r in group],
             "machines": sorted({str(r["training"].get("machine")) for r in group}),
             "versions_used": sorted({json.dumps(r["training"].get("versions"), sort_keys=True) for r in group}),
             "same_refusals": {kind: all(set(r[kind]["instructions"]) == set(group[0][kind]["instructions"])
                                         for r in group) for kind in ("harmful", "harmless") if all(r[kind] for r in group)}}
            for group in (list(by_version.values()) for by_version in groups.values()) if len(group) >= 2]
