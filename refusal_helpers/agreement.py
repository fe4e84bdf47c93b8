"""How often two judges agree on a finished run's completions.

Each condition's completions are judged again by another judge, under the condition's own intervention (the
logit judge reads the model's first reply token, which the intervention changes), and the verdicts are
compared with the ones the run stored.
"""

from __future__ import annotations

from collections import Counter

from .judges import Judge
from .runs import RunFolder
from .steps import CONDITIONS, intervention


def compare_judges(run: RunFolder, judge: Judge, examples: int = 3) -> dict:
    """Per condition: how many verdicts the run's judge and `judge` share, the crossed counts, and a few
    completions they disagree on."""
    cm = run.load_model()
    direction, selection = run.direction()
    out = {"run": run.label, "model_version": (run.identity() or {}).get("model_version"), "second_judge": judge.name,
           "conditions": {}}
    for condition, spec in CONDITIONS.items():
        record = run.completions(condition)
        items = record["items"]
        with intervention(cm, spec.intervention, direction, selection["layer"]):
            second = judge.judge(cm, [i["instruction"] for i in items], [i["completion"] for i in items])
        pairs = Counter(f"{i['verdict']}/{v}" for i, v in zip(items, second))
        disagree = [{"instruction": i["instruction"], "completion": i["completion"], "first": i["verdict"], "second": v}
                    for i, v in zip(items, second) if i["verdict"] != v]
        out["conditions"][condition] = {"first_judge": record["judge"], "n": len(items),
                                        "agree": len(items) - len(disagree), "pairs": dict(pairs),
                                        "examples": disagree[:examples]}
    total = sum(c["n"] for c in out["conditions"].values())
    out["agree"], out["n"] = sum(c["agree"] for c in out["conditions"].values()), total
    return out
