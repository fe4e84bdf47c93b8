"""How far adapters of one recipe lie apart: their refusal rates trained with other seeds (`seed_spreads`) or again
with the same seed (`retrainings`), from `figures.recipe_figures` rows; and their directions, from seed-stability
measurements (`seed_figures`, `seed_parting`)."""

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


def stability_at(stability: dict | None, direction: dict) -> dict | None:
    """A seed-stability measurement read at `direction`'s layer. Its cosine per layer covers every layer of one
    position, so a run whose rule picks another layer there (a re-derived preset on the same weights) is read
    from it; the norm ratio, measured at one layer only, is None elsewhere. None where the positions differ."""
    if stability is None or stability["position"] != direction["position"]:
        return None
    if stability["layer"] == direction["layer"]:
        return stability
    layer = direction["layer"]
    return {**stability, "layer": layer, "cosine": stability["cosine_per_layer"][layer], "norm_ratio": None}


def twin_seed(stability: dict | None, recipe: dict) -> int | str:
    """The seed of the organism that measured `stability` (from its recipe; "N" where the record predates it), or,
    unmeasured, a seed other than `recipe`'s for the one to train."""
    if stability is None:
        return recipe["seed"] + 1
    return (stability.get("other_adapter_recipe") or {}).get("seed", "N")


def agree_through(cosines: list[float], target: float = 0.95) -> int:
    """The last layer up to which every cosine of two seeds' candidates, per layer from layer 1, reaches `target`
    (0 where layer 1's does not)."""
    last = 0
    while last + 1 < len(cosines) and cosines[last + 1] >= target:
        last += 1
    return last


def seed_figures(stability: dict, target: float = 0.95, passing_layers: list[int] | None = None) -> dict:
    """Where two seeds' candidates agree: the last layer up to which every cosine reaches `target`
    (`agree_through`), the lowest cosine with its layer, and among `passing_layers` (those whose candidate at the
    compared position the selection's filters let through) the best cosine with its layer (None without any)."""
    cosines = stability["cosine_per_layer"]
    lowest = min(range(1, len(cosines)), key=cosines.__getitem__)
    best = max(passing_layers or [], key=cosines.__getitem__, default=None)
    return {"agree_through": agree_through(cosines, target), "lowest_layer": lowest, "lowest": cosines[lowest],
            "best_passing": None if best is None else {"layer": best, "cosine": cosines[best],
                                                       "layers": sorted(passing_layers)}}


def seed_parting(along: dict | None, direction: dict, target: float = 0.95) -> dict | None:
    """When two seeds' trainings part at `direction`'s layer, from `seed_agreement_along`: the cosine and step of
    each checkpoint, the first step below `target` with its share of training (None if none), and the highest
    cosine at the checkpoints after it (None if none); where measured, the cosine between what the two trainings
    added to the untuned candidate and the size of the reference's addition relative to it, per checkpoint (None
    at the start), and per checkpoint the last layer up to which every layer agrees to `target` (`agree_through`).
    None where the position differs."""
    if along is None or along["position"] != direction["position"]:
        return None
    cosines = [row[direction["layer"]] for row in along["cosine_per_layer"]]
    below = next((i for i, c in enumerate(cosines) if c < target), None)
    return {"layer": direction["layer"], "steps": along["steps"], "fractions": along["fractions"], "cosines": cosines,
            "n_train": along["settings"]["n_train"],
            "parted_at": None if below is None else along["steps"][below],
            "parted_fraction": None if below is None else along["fractions"][below],
            "highest_after": max(cosines[below + 1:], default=None) if below is not None else None,
            "added": [row and row[direction["layer"]] for row in along.get("added_cosine_per_layer", [])] or None,
            "added_ratio": [row and row[direction["layer"]] for row in along.get("added_norm_ratio", [])] or None,
            "agree_through": [agree_through(row, target) for row in along["cosine_per_layer"]]}


def at_shares(shares: list[float], wanted: list[float], within: float = 0.005) -> list[int | None]:
    """For each share of training in `wanted`, the index of the nearest of `shares` (a training's checkpoints'
    fractions of its steps), or None where none lies within `within`: trainings with other step counts round their
    checkpoints' shares differently (251 of 838 steps, 503 of 1676)."""
    nearest = [min(range(len(shares)), key=lambda i: abs(shares[i] - f), default=None) for f in wanted]
    return [i if i is not None and abs(shares[i] - f) <= within else None for i, f in zip(nearest, wanted)]


def parting_at_shares(parting: dict | None, fractions: list[float]) -> dict | None:
    """`parting`'s steps, cosines, additions' cosines and lengths, and layers agreeing, at its checkpoints at each
    share of training in `fractions` (`at_shares`); None where one has none."""
    at = at_shares(parting["fractions"] if parting else [], fractions)
    if None in at:
        return None
    keys = ("steps", "cosines", "added", "added_ratio", "agree_through")
    return {key: [parting[key][i] for i in at] if parting.get(key) else None for key in keys}
