"""How far adapters of one recipe lie apart: trained with other seeds (`seed_spreads`) or again with the same
seed (`retrainings`), from `figures.recipe_figures` rows."""

from __future__ import annotations

import json

KINDS = ("harmful", "harmless")


def group_by_changes(rows: list[dict], drop: tuple[str, ...] = ()) -> list[list[dict]]:
    """The tuned adapters' rows grouped by their changes from the shipped recipe (the keys in `drop` aside), in the
    order each group first appears."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if not row["untuned"]:
            recipe = {k: v for k, v in row["changes"].items() if k not in drop}
            groups.setdefault(json.dumps(recipe, sort_keys=True), []).append(row)
    return list(groups.values())


def measured_kinds(group: list[dict]) -> list[str]:
    """The kinds (harmful, harmless) that every row of `group` measured."""
    return [kind for kind in KINDS if all(row[kind] for row in group)]


def seed_spreads(rows: list[dict]) -> list[dict]:
    """How far adapters of one recipe trained more than once (other seeds, or the same seed again) lie apart on
    the recipe splits, for each recipe that `recipe_figures` rows hold two or more times: its changes from the
    shipped recipe (the seed aside), the rows' names, and per kind they all measured the largest difference in
    refused prompts.
    The shipped recipe comes first."""
    spreads = [{"changes": {k: v for k, v in group[0]["changes"].items() if k != "seed"},
                "names": [r["name"] for r in group],
                **{kind: max(r[kind]["refused"] for r in group) - min(r[kind]["refused"] for r in group)
                   for kind in measured_kinds(group)}}
               for group in group_by_changes(rows, drop=("seed",)) if len(group) >= 2]
    return sorted(spreads, key=lambda spread: bool(spread["changes"]))


def largest_spread(spreads: list[dict]) -> dict[str, int | None] | None:
    """Per kind, the largest of `seed_spreads` (None for a kind none of them measured); None without any spread."""
    if not spreads:
        return None
    return {kind: max((s[kind] for s in spreads if kind in s), default=None) for kind in KINDS}


def retrainings(rows: list[dict]) -> list[dict]:
    """Recipes that `recipe_figures` rows hold trained more than once with the same seed (as other weights): their
    changes from the shipped recipe (seed included), one row's name, digest and final loss per training, the
    distinct machines and library versions (JSON) they trained on, and per kind they all measured whether every
    training refused exactly the same prompts."""
    found = []
    for rows_of_recipe in group_by_changes(rows):
        by_version: dict[str, dict] = {}  # digest -> the first row of those weights
        for row in rows_of_recipe:
            by_version.setdefault(row["model_version"], row)
        group = list(by_version.values())
        if len(group) >= 2:
            found.append({
                "changes": group[0]["changes"], "names": [r["name"] for r in group],
                "versions": [r["model_version"] for r in group],
                "final_losses": [r["training"].get("final_loss") for r in group],
                "machines": sorted({str(r["training"].get("machine")) for r in group}),
                "versions_used": sorted({json.dumps(r["training"].get("versions"), sort_keys=True) for r in group}),
                "same_refusals": {kind: all(set(r[kind]["instructions"]) == set(group[0][kind]["instructions"])
                                            for r in group) for kind in measured_kinds(group)}})
    return found
