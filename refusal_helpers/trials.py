"""Setting recipe trials against shipped adapters, from `figures.recipe_figures` rows (each with its recipe's
changes from the shipped recipe): which shipped adapter a trial varies (`nearest_shipped`) and which trials weigh
each train-only batch (`batch_trials`)."""

from __future__ import annotations

from .embedded import LATER_KEYS, train_only_batches


def _setting(row: dict, key: str, recipe: dict) -> object:
    """A `recipe_figures` row's value of a `recipe_changes` key ("optimizer.lr", ...), `recipe` (the shipped one's)
    where the row leaves it as there."""
    if key in row["changes"]:
        return row["changes"][key]
    section, _, name = key.partition(".")
    return recipe[section][name] if name else {**LATER_KEYS, **recipe}[key]


def changes_between(row: dict, base: dict, recipe: dict) -> dict:
    """The settings in which `row`'s recipe differs from `base`'s (rows whose changes are from `recipe`), as `row` has them."""
    return {k: _setting(row, k, recipe) for k in {**base["changes"], **row["changes"]}
            if _setting(row, k, recipe) != _setting(base, k, recipe)}


def _shipped_rows(rows: list[dict], shipped_order: list[str]) -> list[dict]:
    """The rows of shipped adapters, newest first by `shipped_order`'s digests."""
    by_version: dict[str, dict] = {}
    for row in sorted(rows, key=lambda row: not row["shipped"]):  # the shipped row before others of its weights
        if not row["untuned"]:
            by_version.setdefault(row["model_version"], row)
    return [by_version[version] for version in shipped_order if version in by_version]


def nearest_shipped(rows: list[dict], shipped_order: list[str], recipe: dict) -> dict[str, dict]:
    """For each tried row of `rows` (`recipe_figures` rows of one split), by name: the shipped adapter's row it
    varies (``against``: of the shipped adapters measured there, newest first by `shipped_order`'s digests, the one
    its recipe is fewest settings from; the newest on a tie) and its changes from that one (``changes``). An adapter
    shipped before is set against the shipped one."""
    shipped = _shipped_rows(rows, shipped_order)
    out = {}
    for row in rows:
        others = [s for s in shipped if s is not row]
        if row["shipped"] or row["untuned"] or not others:
            continue
        earlier = row["model_version"] in shipped_order[1:]
        against = others[0] if earlier else min(others, key=lambda s: len(changes_between(row, s, recipe)))
        out[row["name"]] = {"against": against, "changes": changes_between(row, against, recipe)}
    return out


def batch_trials(rows: list[dict], shipped_order: list[str], recipe: dict) -> dict[str, dict]:
    """For each train-only batch of `recipe` (the shipped one), the `recipe_figures` rows that weigh it: the
    adapter it was set against (``without``: the newest shipped one trained without it, by `shipped_order`'s
    digests, newest first) and each adapter trained with it on that one's recipe and seed (``with``; other
    keys may change too, and ``changes`` now says which, from ``without``). A training of a shipped adapter's
    recipe by another name is left out: it only measures the spread. So is a trial nearer (in settings changed)
    to a shipped adapter trained with the batch than to ``without``: it varies that adapter's recipe, not the
    batch. A batch every shipped adapter was trained with has no entry."""

    def setting(row: dict, key: str) -> object:
        return _setting(row, key, recipe)

    tried = [row for row in rows if not row["untuned"]]
    shipped = _shipped_rows(rows, shipped_order)
    shipped_names, shipped_changes = {row["name"] for row in shipped}, [row["changes"] for row in shipped]
    batches = train_only_batches(recipe)
    out = {}
    for batch in batches:
        key = f"{batch}_repeats"
        without = next((row for row in shipped if setting(row, key) == 0), None)
        if without is None:
            continue
        same = [f"{b}_repeats" for b in batches if b != batch] + ["seed"]  # held as in `without`
        shipped_with = [row for row in shipped if setting(row, key) > 0]
        trials = [{**row, "changes": changes_between(row, without, recipe)}
                  for row in tried if setting(row, key) > 0
                  and all(setting(row, k) == setting(without, k) for k in same)
                  and (row["name"] in shipped_names or (row["changes"] not in shipped_changes and all(
                      len(changes_between(row, without, recipe)) <= len(changes_between(row, other, recipe))
                      for other in shipped_with)))]
        if trials:
            out[batch] = {"without": without, "with": trials}
    return out


def trial_preset_of(row: dict, trial_presets: dict[str, dict]) -> dict | None:
    """The preset derivation recorded for the trial `row` (docs/measurements/trial-presets/<name>.json), where it
    was made with that row's weights (the same ``model_version``); None otherwise."""
    derivation = trial_presets.get(row["name"])
    return derivation if derivation and derivation.get("model_version") == row.get("model_version") else None
