"""The figures the README's model card, recipe.json and the notebook quote agree with the shipped runs.

Re-running the shipped pipeline (or retraining the adapter) changes `runs/embedded/` (the embedded model's
preset) and `runs/embedded-plain/` (the paper's plain difference of means); these tests name every
document that then needs its figures updated.
"""

import json
import re
from pathlib import Path
from statistics import median

import pytest

from refusal_helpers.data import load_records
from refusal_helpers.pipeline import SHIPPED_RUN

ROOT = Path(__file__).resolve().parent.parent
PLAIN_RUN = ROOT / "runs" / "embedded-plain"
CONDITIONS = {  # README row label -> completions file
    "harmful, baseline": "harmful_baseline",
    "harmless, baseline": "harmless_baseline",
    "harmful, direction ablated at all layers": "harmful_ablation",
    "harmful, ablated at all layers, each prompt's first token spared": "harmful_ablation_spared",
    "harmful, direction subtracted at its layer (coefficient -1)": "harmful_actadd",
    "harmless, direction added at its layer (coefficient +1)": "harmless_actadd",
}


def completions(condition: str, run: Path = SHIPPED_RUN) -> dict:
    return json.loads((run / "completions" / f"{condition}.json").read_text())


def rate_cell(run: dict) -> str:
    return f"{percent(run['refusal_rate'])} ({sum(item['refusal'] for item in run['items'])}/{run['n']}"


def percent(rate: float) -> str:
    return f"{100 * rate:.1f}%"


def control_figures(loss: dict) -> str:
    """How the README and the notebook quote a run's random-direction control."""
    increases = loss["random_controls"]["increases"]
    cheaper = sum(x < loss["increase"] for x in increases)
    return (f"by {loss['random_controls']['mean_increase']:+.2f} on average (median {median(increases):+.3f}, "
            f"{min(increases):+.3f} to {max(increases):+.3f}), and {cheaper} of the {len(increases)}")


@pytest.fixture(scope="module")
def readme() -> str:
    return (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def summary() -> dict:
    return json.loads((SHIPPED_RUN / "summary.json").read_text())


@pytest.fixture(scope="module")
def plain() -> dict:
    return json.loads((PLAIN_RUN / "summary.json").read_text())


@pytest.mark.parametrize("label", CONDITIONS)
def test_model_card_refusal_rates_are_the_shipped_runs(readme, label):
    run, plain_run = completions(CONDITIONS[label]), completions(CONDITIONS[label], PLAIN_RUN)
    for made in (run, plain_run):
        assert sum(item["refusal"] for item in made["items"]) / made["n"] == pytest.approx(made["refusal_rate"])
    row = next(line for line in readme.splitlines() if line.startswith(f"| {label} | "))
    assert row.startswith(f"| {label} | {rate_cell(run)}")  # the preset's run, then the plain one's last
    assert row.endswith(f"| {rate_cell(plain_run)}) |")


def test_model_card_counts_refused_edgy_but_benign_prompts(readme):
    edgy = {r["instruction"] for r in load_records("harmless", "test") if r["category"] == "edgy_benign"}
    items = [item for item in completions("harmless_baseline")["items"] if item["instruction"] in edgy]
    assert f"{sum(item['refusal'] for item in items)} of {len(items)} edgy-but-benign" in readme


def test_model_card_direction_and_loss_are_the_shipped_runs(readme, summary):
    direction = json.loads((SHIPPED_RUN / "direction.json").read_text())
    assert f"layer {direction['layer']} of 30 (norm {direction['norm']:.1f})" in readme
    assert (f"bypass {direction['bypass']:.2f}, induce {direction['induce']:+.2f}, KL {direction['kl']:.2f}"
            in " ".join(readme.split()))
    assert summary["direction"]["zero_dims"] == [507] and f"dimension {507} zeroed" in readme
    text = " ".join(readme.split())
    loss = summary["ce_loss"]
    assert f"{loss['baseline']:.3f} -> {loss['ablation']:.3f} nats/token under ablation ({loss['increase']:+.2f}" in text
    assert control_figures(loss) in text
    assert f"(+{loss['first_token_spared']['increase']:.3f} either way" in text


def test_model_card_plain_direction_figures_are_the_plain_runs(readme, plain):
    assert not plain["direction"].get("zero_dims") and plain["selection"]["kl_threshold"] == 0.7  # made before the key
    direction = json.loads((PLAIN_RUN / "direction.json").read_text())
    text = " ".join(readme.split())
    assert (f"means selects layer {direction['layer']} (norm {direction['norm']:.1f}; bypass {direction['bypass']:.2f}, "
            f"induce {direction['induce']:+.2f}, KL {direction['kl']:.2f})") in text
    loss = plain["ce_loss"]
    assert f"costs {loss['baseline']:.3f} -> {loss['ablation']:.3f} nats/token ({loss['increase']:+.2f}" in text
    assert control_figures(loss) in text
    assert f"cuts the cost from {loss['increase']:+.2f} to {loss['first_token_spared']['increase']:+.2f}" in text


def test_recipe_measured_figures_are_the_shipped_runs(summary):
    measured = json.loads((ROOT / "data" / "organism" / "recipe.json").read_text())["measured"]
    assert measured["refusal_rate"] == {k: round(v, 4) for k, v in summary["refusal_rate"].items()}
    loss = summary["ce_loss"]
    assert measured["ce_loss"]["baseline"] == round(loss["baseline"], 4)
    assert measured["ce_loss"]["ablation"] == round(loss["ablation"], 4)
    assert measured["ce_loss"]["increase"] == round(loss["increase"], 4)
    assert measured["ce_loss"]["first_token_spared_increase"] == round(loss["first_token_spared"]["increase"], 4)
    assert measured["ce_loss"]["random_direction_controls"] == [round(x, 4) for x in loss["random_controls"]["increases"]]
    assert measured["direction"] == {**{k: summary["direction"][k] for k in ("position", "layer", "zero_dims")},
                                     "kl_threshold": summary["selection"]["kl_threshold"]}
    assert measured["test_split"] == {"harmful": completions("harmful_baseline")["n"],
                                      "harmless": completions("harmless_baseline")["n"]}


def test_notebook_quotes_the_shipped_runs_figures(summary, plain):
    cells = json.loads((ROOT / "solutions.ipynb").read_text())["cells"]
    text = " ".join(" ".join("".join(c["source"]).split()) for c in cells if c["cell_type"] == "markdown")
    rates = summary["refusal_rate"]
    harmful = ", ".join(percent(rates[k]) for k in ("harmful_baseline", "harmful_ablation")) + " and " + percent(rates["harmful_actadd"])
    harmless = percent(rates["harmless_baseline"]) + " and " + percent(rates["harmless_actadd"])
    loss = summary["ce_loss"]
    assert f"gives {harmful}; {harmless}; and {loss['baseline']:.3f} -> {loss['ablation']:.3f} ({loss['increase']:+.2f})" in text
    assert control_figures(loss) in text
    plain_loss = plain["ce_loss"]
    increases = plain_loss["random_controls"]["increases"]
    assert (f"the cross-entropy rises by {plain_loss['increase']:+.2f}, and 32 random directions with nothing zeroed by "
            f"{plain_loss['random_controls']['mean_increase']:+.2f} on average (median {median(increases):+.3f}") in text
    assert f"it cuts the plain direction's {plain_loss['increase']:+.2f} to {plain_loss['first_token_spared']['increase']:+.2f}" in text


def test_notebook_quotes_its_own_executed_figures():
    cells = json.loads((ROOT / "solutions.ipynb").read_text())["cells"]
    text = " ".join(" ".join("".join(c["source"]).split()) for c in cells if c["cell_type"] == "markdown")
    outputs = "".join("".join(o.get("text", "")) for c in cells if c["cell_type"] == "code" for o in c["outputs"])
    found = re.search(r"CE loss on harmless completions: (\d\.\d+) -> (\d\.\d+) nats/token", outputs)
    assert found, "the executed notebook prints no CE loss line"
    before, after = (float(x) for x in found.groups())
    assert f"a cross-entropy of {found[1]} -> {found[2]} nats/token ({after - before:+.2f})" in text
    rates = dict(re.findall(r"^(\w+ / [\w ]+?)\s+(\d+)%\s+\(n=\d+\)$", outputs, flags=re.M))
    assert f"gives {rates['harmful / baseline']}% harmful refusal, {rates['harmful / ablation']}% under ablation" in text
    assert f"{rates['harmless / baseline']}% harmless refusal and {rates['harmless / add r']}% with $r$ added" in text
