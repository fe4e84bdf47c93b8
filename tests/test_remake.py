"""scripts/remake.py: its steps run in order, and a stopped remake continues where it stopped."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "remake.py"
spec = importlib.util.spec_from_file_location("remake", SCRIPT)
remake = importlib.util.module_from_spec(spec)
sys.modules["remake"] = remake  # dataclasses look their module up
spec.loader.exec_module(remake)


def _plan(ran: list[str], fail_at: str | None = None) -> list:
    def action(name):
        def act():
            if name == fail_at:
                raise RuntimeError(f"{name} failed")
            ran.append(name)
        return act
    return [remake.Step(name, action(name)) for name in ("a", "b", "c", "d")]


def test_a_stopped_remake_continues_after_the_finished_steps(tmp_path):
    ran = []
    with pytest.raises(RuntimeError, match="c failed"):
        remake.remake("abc123", _plan(ran, fail_at="c"), state_dir=tmp_path)
    assert ran == ["a", "b"]
    assert json.loads((tmp_path / "abc123.json").read_text()) == {"adapter": "abc123", "done": ["a", "b"]}

    ran.clear()
    remake.remake("abc123", _plan(ran), state_dir=tmp_path)
    assert ran == ["c", "d"]
    assert not (tmp_path / "abc123.json").exists()  # finished: the next remake starts from the first step

    ran.clear()
    remake.remake("abc123", _plan(ran), state_dir=tmp_path)
    assert ran == ["a", "b", "c", "d"]


def test_another_adapter_or_fresh_starts_over(tmp_path):
    ran = []
    with pytest.raises(RuntimeError):
        remake.remake("old", _plan(ran, fail_at="b"), state_dir=tmp_path)
    ran.clear()
    remake.remake("new", _plan(ran), state_dir=tmp_path)
    assert ran == ["a", "b", "c", "d"]
    ran.clear()
    remake.remake("old", _plan(ran), state_dir=tmp_path, fresh=True)
    assert ran == ["a", "b", "c", "d"]


def test_the_steps_are_named_once_and_seed_stability_follows_the_shipped_run(tmp_path, monkeypatch):
    plain = [step.name for step in remake.steps("abc123")]
    with_twin = [step.name for step in remake.steps("abc123", twin=tmp_path)]
    assert len(set(plain)) == len(plain) and plain[0] == "preset" and plain[-1] == "documents"
    assert [name for name in with_twin if name != "seed stability"] == plain
    assert with_twin.index("seed stability") > with_twin.index("shipped run")
    assert plain.index("earlier adapter's run kept") < plain.index("shipped run")
    assert plain.index("preset") < plain.index("earlier preset's run kept") < plain.index("shipped run")
    assert "seed stability" not in plain
    ran = []
    monkeypatch.setattr(remake, "run", lambda *args: ran.append(args))
    next(step for step in remake.steps("abc123", twin=tmp_path) if step.name == "seed stability").action()
    assert [args[-1].rsplit("/", 1)[-1] for args in ran] == ["seed_stability.json", "seed_agreement.json"]
    assert "--all-train" in ran[1] and "--all-train" not in ran[0]
    ran.clear()  # a twin trained with --trajectory is also compared along the two trainings
    (tmp_path / "trajectory").mkdir()
    next(step for step in remake.steps("abc123", twin=tmp_path) if step.name == "seed stability").action()
    assert [args[-1].rsplit("/", 1)[-1] for args in ran][2:] == ["seed_agreement_along.json"] and "--trajectory" in ran[2]
    # the shipped adapter is measured wherever the research log's recipe table and batch paragraphs read it
    assert {"shipped on recipe splits", "shipped on cues split", "shipped on harmful dev",
            "shipped on interpersonal batch"} <= set(plain)


def test_the_earlier_adapters_shipped_run_is_kept_with_its_own_seed_stability_only(tmp_path):
    run, out, stability = tmp_path / "embedded", tmp_path / "earlier", tmp_path / "seed_stability.json"
    run.mkdir()
    summary = {"model_version": "old", "refused": {"harmful_baseline": {"refused": 9, "n": 10}}}
    (run / "summary.json").write_text(json.dumps(summary))
    stability.write_text(json.dumps({"model_version": "old", "cosine": 0.9}))

    assert remake.keep_earlier_run("old", run, stability, out) is None  # the run already has the new weights
    assert not out.exists()
    record = json.loads(remake.keep_earlier_run("new", run, stability, out).read_text())
    assert record == {"model_version": "old", "replaced_by": "new", "summary": summary,
                      "seed_stability": {"model_version": "old", "cosine": 0.9}}
    stability.write_text(json.dumps({"model_version": "new", "cosine": 0.8}))  # measured on other weights
    assert json.loads(remake.keep_earlier_run("new", run, stability, out).read_text())["seed_stability"] is None
    assert remake.keep_earlier_run("new", tmp_path / "missing", stability, out) is None


def test_a_run_of_these_weights_under_another_kl_threshold_is_kept_by_its_threshold(tmp_path):
    run, out = tmp_path / "embedded", tmp_path / "earlier-presets"
    run.mkdir()
    summary = {"model_version": "abc", "selection": {"kl_threshold": 0.2}, "direction": {"layer": 16}}
    (run / "summary.json").write_text(json.dumps(summary))

    assert remake.keep_earlier_preset_run("abc", 0.2, run, out) is None  # the same preset: nothing to keep
    assert remake.keep_earlier_preset_run("other", 0.16, run, out) is None  # other weights: keep_earlier_run's job
    assert not out.exists()
    record = remake.keep_earlier_preset_run("abc", 0.16, run, out)
    assert record.name == "abc-kl0.2.json"
    assert json.loads(record.read_text()) == {"model_version": "abc", "kl_threshold": 0.2,
                                              "replaced_by_kl_threshold": 0.16, "summary": summary}


def test_the_shipped_adapter_on_the_recipe_splits_is_measured_once(tmp_path):
    recipes, evaluated = tmp_path / "recipes", []
    recipes.mkdir()
    (recipes / "other-trial.json").write_text(json.dumps({"model_version": "other"}))

    def evaluate(path, *splits):
        evaluated.append((path, splits))
        path.write_text(json.dumps({"model_version": "abc123"}))

    target = recipes / "shipped-abc123.json"
    assert remake.shipped_measured("abc123", evaluate, recipes, *remake.CUES_SPLITS) == target
    assert evaluated == [(target, remake.CUES_SPLITS)]  # no trial measured these weights: evaluated, on its splits

    evaluated.clear()
    (recipes / "shipped-abc123.json").unlink()
    (recipes / "the-trial.json").write_text(json.dumps({"model_version": "abc123", "harmful": "its figures"}))
    remake.shipped_measured("abc123", evaluate, recipes)
    assert evaluated == [] and not (recipes / "the-trial.json").exists()  # the trial's measurement, renamed
    assert json.loads((recipes / "shipped-abc123.json").read_text())["harmful"] == "its figures"
    assert sorted(p.name for p in recipes.iterdir()) == ["other-trial.json", "shipped-abc123.json"]


def test_an_adapter_whose_trial_found_no_preset_is_not_adopted(tmp_path):
    from refusal_helpers.embedded import adapter_digest, adapter_dir

    adapter = adapter_dir()
    records = tmp_path / "trial-presets"
    records.mkdir()
    assert remake.without_preset(adapter, records) is None  # nothing measured: the remake's own preset step decides
    derived = {"max_ce_increase": 0.1, "max_refused": 0.05, "trail": []}  # as `preset --json` writes it
    found = {"model_version": adapter_digest(adapter), "settings": {"kl_threshold": 0.2}, "derived": derived}
    (records / "found.json").write_text(json.dumps(found))
    (records / "other.json").write_text(json.dumps({"model_version": "other", "settings": None, "derived": derived}))
    assert remake.without_preset(adapter, records) is None
    (records / "none.json").write_text(json.dumps({**found, "settings": None,
                                                   "derived": {**derived, "failure": "No KL threshold"}}))
    assert remake.without_preset(adapter, records) == (f"{records / 'none.json'} found no preset for adapter "
                                                       f"{adapter_digest(adapter)}: No KL threshold")


def test_the_preset_step_starts_from_a_trials_preset_run_of_the_same_weights(tmp_path):
    from refusal_helpers.embedded import adapter_digest
    from refusal_helpers.runs import RECORD_SUFFIX, SCHEMA

    digest, runs = adapter_digest(), tmp_path / "runs"

    def trial_run(name: str, model: str, version: str) -> Path:
        folder = runs / name
        folder.mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"schema": SCHEMA, "model": model, "model_version": version}))
        (folder / "scores.json").write_text("{}")
        (folder / f"scores.json{RECORD_SUFFIX}").write_text(json.dumps({"sha256": "x", "settings": {"model": model}}))
        return folder

    target = runs / "preset"
    trial_run("preset-other-weights", "embedded:/trials/other", "0123456789ab")
    trial_run("preset-plain", "embedded", digest)  # the embedded model's own plain run: not a trial's
    trial_run("preset-the-trial-plain", "embedded:/trials/the-trial", digest)  # a trial's plain run: no dimension zeroed
    assert remake.seed_preset_run(digest, target, runs) is None and not target.exists()
    trial = trial_run("preset-the-trial", "embedded:/trials/the-trial", digest)
    assert remake.seed_preset_run(digest, target, runs) == trial
    assert json.loads((target / "run.json").read_text())["model"] == "embedded"
    assert json.loads((target / f"scores.json{RECORD_SUFFIX}").read_text())["settings"]["model"] == "embedded"
    assert json.loads((trial / "run.json").read_text())["model"] == "embedded:/trials/the-trial"  # the trial's kept
    assert remake.seed_preset_run(digest, target, runs) is None  # already these weights' run: left as it is
    (target / "kept.txt").write_text("")
    assert remake.seed_preset_run("fedcba987654", target, runs) is None and (target / "kept.txt").exists()  # the
    # embedded model's run of other weights: kept (the preset step remakes what changed)
    shutil.rmtree(target)
    trial_run("preset", "embedded:/trials/not-shipped", "fedcba987654")  # a trial's preset run made in the target
    assert remake.seed_preset_run(digest, target, runs) == trial and json.loads((target / "run.json").read_text())["model"] == "embedded"
    shutil.rmtree(target)
    trial_run("preset", "embedded:/trials/not-shipped", "fedcba987654")
    assert remake.seed_preset_run("0123456789ff", target, runs) is None and not target.exists()  # cleared


def test_an_adapter_to_adopt_gets_its_preset_derived_first_unless_its_weights_have_one(tmp_path):
    import subprocess

    from refusal_helpers.embedded import adapter_digest, adapter_dir

    adapter, records = adapter_dir(), tmp_path / "trial-presets"
    records.mkdir()
    derived, calls = {"max_ce_increase": 0.1, "max_refused": 0.05, "trail": [], "failure": "No KL threshold"}, []

    def derive(*args: str, status: int = 2) -> None:  # `preset --json`: the record, then exit 2 (no preset)
        calls.append(args)
        Path(args[-1]).write_text(json.dumps({"model_version": adapter_digest(adapter), "settings": None,
                                              "derived": derived}))
        raise subprocess.CalledProcessError(status, args)

    record = remake.derive_trial_preset(adapter, records, derive)
    assert record == records / f"{adapter.name}.json" and calls[0][-3:] == ("--no-save", "--json", str(record))
    assert calls[0][:5] == ("-m", "refusal_helpers", "preset", "--model", f"embedded:{adapter}")
    assert remake.without_preset(adapter, records).endswith("No KL threshold")  # so it is not adopted
    assert remake.derive_trial_preset(adapter, records, derive) == record and len(calls) == 1  # derived once
    record.rename(records / "named-otherwise.json")
    assert remake.derive_trial_preset(adapter, records, derive) == records / "named-otherwise.json" and len(calls) == 1
    (records / "named-otherwise.json").unlink()
    with pytest.raises(subprocess.CalledProcessError):  # a failure of another kind stops the remake
        remake.derive_trial_preset(adapter, records, lambda *args: derive(*args, status=1))
