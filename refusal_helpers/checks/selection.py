"""Checks for section 6: the paper's filters and choice."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from ..selection import ScoreTable, SelectionConfig, choose, passing_mask
from .core import CheckFailed, call, learner_check, ok

# ----- 6. selection ----------------------------------------------------------------------------------
SELECTION_CONFIG = SelectionConfig(max_layer_fraction=0.8, kl_threshold=0.25, induce_threshold=0.5)
NAN = float("nan")
# (position index, layer): (bypass, kl, induce). Every other cell has bypass 5 + its index / 10 and fails the KL
# filter (KL 5). Passing candidates all have positive bypass scores, the chosen one lies on both thresholds,
# and each wrong rule of _WRONG_RULES picks a cell of its own.
_SPECIAL_CELLS = {
    (0, 2): (0.3, 0.5, 1.0),     # KL above the threshold
    (0, 4): (4.5, 0.0625, 1.0),  # the highest passing bypass
    (0, 5): (0.5, NAN, 1.0),     # KL not computed
    (0, 9): (0.2, 0.0625, 1.0),  # 9 < 0.8 * 12 = 9.6, but the paper keeps layers < int(9.6) = 9: excluded
    (0, 10): (0.1, 0.0625, 1.0),  # in the last 20% of layers
    (1, 3): (1.0, 0.25, 0.5),    # the answer: on the KL and the induce threshold
    (1, 4): (2.0, 0.25, 1.0),    # on the KL threshold
    (1, 5): (0.4, 0.0625, -1.0),  # induce below the threshold
    (1, 6): (1.5, 0.0625, 0.25),  # passes the paper's thresholds (KL 0.1, induce 0), not the config's
    (2, 1): (NAN, 0.0625, 1.0),  # bypass not computed
    (2, 2): (3.0, 0.0625, 0.5),  # on the induce threshold
    (2, 3): (0.6, 0.0625, NAN),  # induce not computed
    (2, 5): (4.0, 0.0625, 1.0),  # strictly within both thresholds
}


def _selection_table() -> ScoreTable:
    """A (3 positions, 12 layers) table for SELECTION_CONFIG with NaN, ties to thresholds and positive bypass."""
    bypass = 5 + torch.arange(36, dtype=torch.float32).view(3, 12) / 10
    kl, induce = torch.full((3, 12), 5.0), torch.ones(3, 12)
    for cell, (b, k, i) in _SPECIAL_CELLS.items():
        bypass[cell], kl[cell], induce[cell] = b, k, i
    return ScoreTable([-3, -2, -1], bypass, induce, kl, 2.0, -3.0)


def _rule_mask(table: ScoreTable, config: SelectionConfig, rule: str) -> Tensor:
    """The candidates that a wrong filtering rule (a key of _WRONG_RULES) keeps."""
    n_pos, n_layers = table.shape
    every = torch.ones(n_pos, n_layers, dtype=torch.bool)
    layer = torch.arange(n_layers).expand(n_pos, n_layers)
    bound = int(config.max_layer_fraction * n_layers)
    kl_max, induce_min = (0.1, 0.0) if rule == "paper thresholds" else (config.kl_threshold, config.induce_threshold)
    layers_ok = {"no layer filter": every,
                 "float bound": layer < config.max_layer_fraction * n_layers}.get(rule, layer < bound)
    kl_ok = {"no kl filter": every, "kl <": table.kl < kl_max, "both strict": table.kl < kl_max,
             "nan kl": ~(table.kl > kl_max)}.get(rule, table.kl <= kl_max)
    induce_ok = {"no induce filter": every, "induce >": table.induce > induce_min,
                 "both strict": table.induce > induce_min,
                 "nan induce": ~(table.induce < induce_min)}.get(rule, table.induce >= induce_min)
    bypass_ok = every if rule == "nan bypass" else ~table.bypass.isnan()
    return layers_ok & kl_ok & induce_ok & bypass_ok


# Wrong selection rules, each named by its message; every one picks a different cell of _selection_table.
_WRONG_RULES = {
    "fill 0": "you picked a candidate your filters exclude: the excluded cells got a score that is not above the "
              "passing ones. Fill them with +inf, `torch.where(mask, bypass, float('inf'))`, before the argmin: 0 (or "
              "NaN) beats every passing score when they are all positive, as here.",
    "argmin of masked values": "an argmin over the masked values `bypass[mask]` counts passing candidates, not cells "
                               "of the table. Keep the table's shape (e.g. `torch.where(mask, bypass, "
                               "float('inf'))`) before taking the argmin.",
    "highest": "Pick the LOWEST bypass score: ablating the best direction removes refusal the most.",
    "no layer filter": "the choice is in the last 20% of layers, which max_layer_fraction excludes: keep layers "
                       "< int(max_layer_fraction * n_layers).",
    "float bound": "layer 9 of 12 is pruned: the paper's code keeps layers below int(0.8 * 12) = 9 (it discards "
                   "`layer >= int(n_layers * 0.8)`), and `layer < 0.8 * n_layers` keeps layer 9 too. Round the bound "
                   "down: `layer < int(config.max_layer_fraction * n_layers)`.",
    "no kl filter": "discard candidates whose KL divergence is above the threshold.",
    "kl <": "a candidate whose KL equals the threshold passes: use `kl <= kl_threshold`, not `<`.",
    "induce >": "a candidate whose induce score equals the threshold passes: use `induce >= induce_threshold`, not "
                "`>`.",
    "both strict": "candidates on a threshold pass: use `kl <= kl_threshold` and `induce >= induce_threshold` (not "
                   "`<` and `>`).",
    "nan kl": "a candidate whose KL is NaN (not computed) passed your KL filter: NaN must not pass. `kl <= threshold` "
              "is False for NaN, but `~(kl > threshold)` is True.",
    "nan induce": "a candidate whose induce score is NaN (not computed) passed your induce filter: NaN must not pass. "
                  "`induce >= threshold` is False for NaN, but `~(induce < threshold)` is True.",
    "no induce filter": "discard candidates whose induce (addition) score is below the threshold.",
    "nan bypass": "skip candidates whose bypass score is NaN (not computed): NaN compares as neither larger nor "
                  "smaller, and argmin picks it.",
    "paper thresholds": "you used the paper's thresholds (KL 0.1, induce 0.0): take them from `config.kl_threshold` "
                        "and `config.induce_threshold`.",
}


def _rule_choice(table: ScoreTable, config: SelectionConfig, rule: str) -> tuple[int, int]:
    """The (position_index, layer) that a wrong rule of _WRONG_RULES picks."""
    n_layers, passing, inf = table.shape[1], passing_mask(table, config), torch.tensor(float("inf"))
    if rule == "fill 0":
        flat = torch.where(passing, table.bypass, 0.0).argmin()
    elif rule == "argmin of masked values":
        flat = table.bypass[passing].argmin()
    elif rule == "highest":
        flat = torch.where(passing, table.bypass, -inf).argmax()
    else:
        flat = torch.where(_rule_mask(table, config, rule), table.bypass, inf).argmin()
    return int(flat) // n_layers, int(flat) % n_layers


@learner_check
def check_choose_direction(fn: Callable) -> None:
    """fn(table: ScoreTable, config: SelectionConfig) -> (position_index, layer) of the chosen candidate;
    a ValueError when no candidate passes."""
    table, config = _selection_table(), SELECTION_CONFIG
    expected = choose(table, config)
    got = _chosen(fn, table, config)
    if got != (expected.position_index, expected.layer):
        for rule, message in _WRONG_RULES.items():
            if got == _rule_choice(table, config, rule):
                raise CheckFailed(message)
        raise CheckFailed(f"Expected (position_index, layer) = {(expected.position_index, expected.layer)}, got {got}.")
    # Each setting of `config` is used, not a copy of SELECTION_CONFIG's.
    for field, value in (("max_layer_fraction", 1.0), ("kl_threshold", 0.5), ("induce_threshold", -1.0)):
        other = dataclasses.replace(config, **{field: value})
        ref = choose(table, other)
        if _chosen(fn, table, other) != (ref.position_index, ref.layer):
            raise CheckFailed(f"With config.{field} = {value} your choice did not change as it should: use "
                              f"`config.{field}`, don't hard-code it.")
    # Two passing candidates tie for the lowest bypass score: either is right.
    tied = ScoreTable([-2, -1], torch.tensor([[3.0, 1.0, 2.0, 5.0, 0.0], [1.0, 4.0, 1.0, 2.0, 6.0]]),
                      torch.ones(2, 5), torch.zeros(2, 5))
    tied.kl[1, 0] = 1.0
    got = _chosen(fn, tied, config)
    if got not in ((0, 1), (1, 2)):
        raise CheckFailed(f"With two candidates tied for the lowest bypass score, (0, 1) and (1, 2), you returned "
                          f"{got}.")
    _no_candidate_raises(fn, table)
    ok("check_choose_direction", f"chose position index {expected.position_index}, layer {expected.layer}")


def _chosen(fn: Callable, table: ScoreTable, config: SelectionConfig) -> tuple[int, int]:
    got = call(fn, {"table": table, "config": config})
    try:
        position_index, layer = (int(v) for v in got)
    except (TypeError, ValueError, RuntimeError):
        why = ": did your function forget `return`?" if got is None else \
            " (when candidates tie for the lowest score, return one of them)."
        shown = got.tolist() if isinstance(got, Tensor) else got
        raise CheckFailed(f"Return one (position_index, layer) pair of ints, got {shown!r}{why}") from None
    return position_index, layer


def _no_candidate_raises(fn: Callable, table: ScoreTable) -> None:
    """With no candidate passing, the learner's function must raise a ValueError."""
    try:
        none_pass = call(fn, {"table": table, "config": SelectionConfig(induce_threshold=1e9)})
    except ValueError:
        return
    except (IndexError, RuntimeError) as err:
        if isinstance(err, NotImplementedError):
            raise
        raise CheckFailed(f"With no candidate passing the filters (induce_threshold=1e9) your function raised "
                          f"{type(err).__name__}: {str(err).rstrip('.')}. Check whether any candidate passes first, "
                          "and raise a ValueError if none does.") from None
    raise CheckFailed(f"With no candidate passing the filters (induce_threshold=1e9) you returned {none_pass!r}: "
                      "raise a ValueError instead, so that a failed selection cannot go unnoticed.")
