import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from refusal_helpers.__main__ import main
from refusal_helpers.report import format_summary
from refusal_helpers.runs import RunFolder, load_direction
from refusal_helpers.selection import choose
from refusal_helpers.steps import CONDITIONS
from refusal_helpers.testing import run_tiny, tiny_chat_model

ARTIFACTS = [
    "candidates.safetensors", "scores.json", "selection.json", "direction.safetensors", "loss.json", "summary.json",
    "plots/selection_scores.html", "plots/projections.html", "plots/cosine_similarity.html", "plots/norms.html",
] + [f"completions/{c}.json" for c in CONDITIONS]
EVERY_ARTIFACT_BUT_THE_SUMMARY = {name for name in ARTIFACTS if name != "summary.json"}


def record(out, name):
    return json.loads((out / f"{name}.record.json").read_text())


def test_cli_end_to_end_writes_every_artifact(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out) == 0
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "harmful, ablation" in printed and "CE loss" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["refusal_rate"]) == set(CONDITIONS)
    candidates = load_file(str(out / "candidates.safetensors"))["candidates"]
    direction, description = load_direction(out)
    assert candidates.shape[1:] == (3, 64)
    assert (direction == candidates[description["position_index"], description["layer"]]).all()
    table = json.loads((out / "scores.json").read_text())["table"]
    assert len(table["bypass"]) == candidates.shape[0] and len(table["bypass"][0]) == 3
    completions = json.loads((out / "completions/harmful_ablation.json").read_text())
    assert completions["n"] == 3 and {"instruction", "completion", "refusal"} <= set(completions["items"][0])
    assert completions["refused"] == sum(item["refusal"] for item in completions["items"])
    assert summary["refused"]["harmful_ablation"] == {"refused": completions["refused"], "harmful": 0, "n": 3}
    assert completions["judge"] == "substring" and completions["verdicts"]["refused"] == completions["refused"]
    assert set(summary["artifacts"]) == EVERY_ARTIFACT_BUT_THE_SUMMARY  # the digest of everything it summarises

    made = summary["compute_s"]
    assert set(made) == {"extract_s", "select_s", "generate_s", "loss_s", "total_s"}
    assert all(v is not None and v >= 0 for v in made.values())
    assert made["total_s"] == pytest.approx(sum(v for k, v in made.items() if k != "total_s"), abs=0.06)

    # A second run skips finished steps: artifacts are not rewritten, and what making them took is kept.
    mtimes = {name: os.stat(out / name).st_mtime_ns for name in ARTIFACTS if name != "summary.json"}
    capsys.readouterr()
    assert run_tiny(tiny_folder, out) == 0
    assert mtimes == {name: os.stat(out / name).st_mtime_ns for name in mtimes}
    again = json.loads((out / "summary.json").read_text())
    assert "candidates.safetensors" in again["reused_artifacts"] and "loss.json" in again["reused_artifacts"]
    assert again["compute_s"] == made
    assert f"making all of them took {made['total_s']:.0f} s" in capsys.readouterr().out
    # Changing a test-time setting redoes only the later steps.
    assert run_tiny(tiny_folder, out, "--max-new-tokens", "3") == 0
    assert os.stat(out / "candidates.safetensors").st_mtime_ns == mtimes["candidates.safetensors"]
    assert os.stat(out / "completions/harmless_actadd.json").st_mtime_ns != mtimes["completions/harmless_actadd.json"]


def test_an_artifact_is_fresh_only_with_its_settings_and_its_own_bytes(tmp_path, capsys):
    run = RunFolder(tmp_path, create=True)
    run.write_json("a.json", {"x": 1}, {"n": 1}, seconds=2.345)
    assert run.fresh("a.json", {"n": 1}) and not run.fresh("a.json", {"n": 2})
    assert run.compute_seconds("a.json") == 2.3 and run.read_json("a.json") == {"x": 1}
    (tmp_path / "a.json").write_text('{"x": 2}\n')  # edited after it was written
    assert not run.fresh("a.json", {"n": 1})
    assert "a.json does not match its record (damaged or edited): remaking it" in capsys.readouterr().out
    with pytest.raises(ValueError, match="a.json does not match its record"):
        run.read_json("a.json")
    (tmp_path / "a.json").unlink()  # no artifact, no record
    assert not run.fresh("a.json", {"n": 1}) and run.compute_seconds("a.json") is None


def test_cli_bad_inputs_are_clear_errors(tiny_folder, tmp_path, capsys):
    assert run_tiny("no-such-org/no-such-model", tmp_path / "a") == 2
    assert "Could not load model" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert run_tiny(tiny_folder, blocker / "sub") == 2
    assert "Cannot write to the output folder" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, expected", [
    ("--n-test", "0", "positive whole number or 'all', got '0'"),
    ("--n-train", "ten", "positive whole number or 'all', got 'ten'"),
    ("--batch-size", "-4", "positive whole number, got '-4'"),
    ("--max-new-tokens", "0", "positive whole number, got '0'"),
    ("--random-controls", "-1", "positive whole number or 0, got '-1'"),
])
def test_cli_rejects_bad_numbers_before_loading_anything(option, value, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and expected in err, err


def test_cli_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 128)" in text and "(default: lazy)" in text and "random unit directions" in text


def test_failed_run_leaves_earlier_artifacts_intact(tiny_folder, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out) == 0
    before = {name: (out / name).read_bytes() for name in ARTIFACTS}
    # impossible thresholds: selection fails; the earlier run, its table and summary included, stays as it was
    assert run_tiny(tiny_folder, out, "--induce-threshold", "1e9") == 2
    assert {name: (out / name).read_bytes() for name in ARTIFACTS} == before
    assert RunFolder(out).finished()


def test_changing_a_threshold_rechooses_without_rescoring(tiny_folder, tmp_path, monkeypatch):
    import refusal_helpers.pipeline as pipeline

    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out, "--selection-mode", "exhaustive") == 0
    table = json.loads((out / "scores.json").read_text())["table"]
    monkeypatch.setattr(pipeline, "score_candidates", lambda *a, **k: pytest.fail("the table was recomputed"))
    assert run_tiny(tiny_folder, out, "--kl-threshold", "1e5", "--selection-mode", "exhaustive") == 0
    assert json.loads((out / "scores.json").read_text())["table"] == table
    assert json.loads((out / "selection.json").read_text())["selection"]["config"]["kl_threshold"] == 1e5


def test_a_lazy_run_reuses_an_exhaustive_table_but_not_the_reverse(tiny_folder, tmp_path, monkeypatch):
    import refusal_helpers.pipeline as pipeline

    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out, "--selection-mode", "exhaustive") == 0
    table = (out / "scores.json").read_bytes()
    direction = (out / "direction.safetensors").read_bytes()
    real_scoring = pipeline.score_candidates
    monkeypatch.setattr(pipeline, "score_candidates", lambda *a, **k: pytest.fail("the full table was rescored"))
    assert run_tiny(tiny_folder, out) == 0  # lazy (the default): the full table has every score it needs
    assert (out / "scores.json").read_bytes() == table
    assert (out / "direction.safetensors").read_bytes() == direction
    assert "scores.json" in json.loads((out / "summary.json").read_text())["reused_artifacts"]

    lazy_out = tmp_path / "lazy"
    monkeypatch.setattr(pipeline, "score_candidates", real_scoring)
    assert run_tiny(tiny_folder, lazy_out) == 0
    modes = []
    monkeypatch.setattr(pipeline, "score_candidates", lambda *a, **k: modes.append(a[5]) or real_scoring(*a, **k))
    assert run_tiny(tiny_folder, lazy_out, "--selection-mode", "exhaustive") == 0  # a lazy table has gaps
    assert modes == ["exhaustive"]


def test_a_new_direction_redoes_interventions_and_loss_but_not_baselines(tiny_folder, tmp_path, monkeypatch):
    import refusal_helpers.pipeline as pipeline

    out = tmp_path / "run"
    args = ("--selection-mode", "exhaustive")
    assert run_tiny(tiny_folder, out, *args) == 0
    first = json.loads((out / "selection.json").read_text())["selection"]
    mtimes = {name: os.stat(out / name).st_mtime_ns for name in ARTIFACTS if name != "summary.json"}

    def other_choice(table, config):
        # the same rule with the first choice excluded
        table.bypass[first["position_index"], first["layer"]] = float("nan")
        return choose(table, config)

    monkeypatch.setattr(pipeline, "choose", other_choice)
    assert run_tiny(tiny_folder, out, *args, "--max-layer-fraction", "0.99") == 0
    second = json.loads((out / "selection.json").read_text())["selection"]
    assert (second["position_index"], second["layer"]) != (first["position_index"], first["layer"])
    changed = {name for name in mtimes if os.stat(out / name).st_mtime_ns != mtimes[name]}
    assert {"loss.json", "completions/harmful_ablation.json", "completions/harmful_ablation_spared.json",
            "completions/harmless_actadd.json"} <= changed
    assert not changed & {"completions/harmful_baseline.json", "completions/harmless_baseline.json",
                          "candidates.safetensors"}


def test_seed_stability_of_a_run_against_its_own_model_and_another(tiny_folder, tmp_path, write_trajectory):
    from refusal_helpers.data import split_instructions
    from refusal_helpers.loading import load_model, model_version
    from refusal_helpers.organism import seed_stability
    from refusal_helpers.organism.experiments import own_directions, seed_agreement

    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out) == 0
    same = seed_stability(load_model(str(tiny_folder), device="cpu"), run=out)
    direction, described = load_direction(out)
    assert (same["position"], same["layer"]) == (described["position"], described["layer"])
    assert abs(same["cosine"] - 1) < 1e-4 and abs(same["norm_ratio"] - 1) < 1e-4
    assert len(same["cosine_per_layer"]) == 3
    assert same["model_version"] == model_version(str(tiny_folder))  # the docs check it is this adapter's
    other_model = tiny_chat_model("qwen2", n_layers=3, seed=1)
    other = seed_stability(other_model, run=out)
    assert other["cosine"] < 0.9  # independent random weights: unrelated directions
    # a reference model's own candidates in place of the run's: made the same way, so the run's model as
    # reference gives the run's figures, and a model against itself agrees everywhere
    as_reference = seed_stability(other_model, run=out, reference=load_model(str(tiny_folder), device="cpu"))
    assert as_reference["model_version"] is None  # a model, not an adapter folder: no digest to name
    assert as_reference["cosine_per_layer"] == pytest.approx(other["cosine_per_layer"], abs=2e-3)
    assert as_reference["norm_ratio"] == pytest.approx(other["norm_ratio"], rel=1e-3)
    itself = seed_stability(other_model, run=out, reference=other_model)
    # (layer 0 is the template token's embedding, the same for both kinds: no direction, cosine 0)
    assert itself["cosine_per_layer"][1:] == [1.0, 1.0] and abs(itself["norm_ratio"] - 1) < 1e-4

    # on more instructions than the run's, beside each model's two disjoint halves of them
    agreement = seed_agreement(other_model, run=out, reference=other_model, n=16)
    assert agreement["n"] == {"harmful": 16, "harmless": 16} and agreement["model_version"] is None
    assert agreement["cosine_per_layer"][1:] == [1.0, 1.0]
    halves = agreement["halves_cosine_per_layer"]
    assert halves["reference"] == halves["other"] and max(halves["reference"][1:]) < 0.99  # 8 prompts apart
    reference = load_model(str(tiny_folder), device="cpu")
    across = seed_agreement(other_model, run=out, reference=reference, n=16)
    instructions = {kind: split_instructions("bundled", kind, "train", 16) for kind in ("harmful", "harmless")}
    whole = [own_directions(cm, instructions, described["position"]) for cm in (reference, other_model)]
    assert across["cosine_per_layer"] == pytest.approx(  # the halves' means make up the whole's
        [round(float(c), 3) for c in torch.nn.functional.cosine_similarity(*whole, dim=-1)], abs=1.5e-3)
    assert max(across["cosine_per_layer"][1:]) < 0.9 and across["halves_cosine_per_layer"]["reference"] != halves["other"]

    zeroed = tmp_path / "zeroed"  # the other model's candidates get the run's zeroed dimensions too
    assert run_tiny(tiny_folder, zeroed, "--zero-dims", "0", "7", "--random-controls", "0") == 0
    same = seed_stability(load_model(str(tiny_folder), device="cpu"), run=zeroed)
    assert abs(same["cosine"] - 1) < 1e-4 and abs(same["norm_ratio"] - 1) < 1e-4

    # along two trainings: at the run's position and with its zeroed dimensions, naming the reference's weights
    from refusal_helpers.embedded import adapter_digest
    from refusal_helpers.organism.experiments import seed_agreement_along

    ours = torch.randn(2, 2, 3, 8)  # (checkpoint, position, layer, d_model)
    theirs = ours.clone()
    theirs[1, 1, :, 7] += 50.0  # the run's position: apart on dimension 7 only
    for name, candidates in (("ours", ours), ("theirs", theirs)):
        write_trajectory(tmp_path / name, candidates, [0.0, 1.0], positions=(described["position"] - 1, described["position"]))
        (tmp_path / name / "adapter_model.safetensors").write_bytes(name.encode())
        (tmp_path / name / "adapter_config.json").write_text("{}")
    along = {run.name: seed_agreement_along(tmp_path / "theirs", run=run, reference=tmp_path / "ours") for run in (out, zeroed)}
    assert along["run"]["model_version"] == adapter_digest(tmp_path / "ours") != adapter_digest(tmp_path / "theirs")
    assert (along["run"]["position"], along["run"]["layer"]) == (described["position"], described["layer"])
    assert max(along["run"]["cosine_per_layer"][1]) < 0.5 and along["zeroed"]["cosine_per_layer"][1] == [1.0] * 3
    (tmp_path / "ours" / "adapter_model.safetensors").unlink()  # a reference still training: no weights to name
    assert seed_agreement_along(tmp_path / "theirs", run=out, reference=tmp_path / "ours")["model_version"] is None


def test_artifacts_record_which_weights_and_precision_made_them(tiny_folder, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    out = tmp_path / "run"
    assert run_tiny(folder, out) == 0
    settings = record(out, "candidates.safetensors")["settings"]
    assert settings["dtype"] == "float32" and len(settings["model_version"]) == 12
    # naming the CPU's default precision is the same run: everything is reused
    assert run_tiny(folder, out, "--dtype", "float32") == 0
    assert "candidates.safetensors" in json.loads((out / "summary.json").read_text())["reused_artifacts"]
    # other weights under the same name: nothing is reused
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    assert run_tiny(folder, out) == 0
    assert "changed since" in capsys.readouterr().out  # a one-line notice: the weights differ, all is remade
    assert json.loads((out / "summary.json").read_text())["reused_artifacts"] == []


def test_zero_dims_reach_every_candidate_and_control_and_are_part_of_the_settings(tiny_folder, tmp_path):
    from refusal_helpers.directions import random_directions, zero_dims
    from refusal_helpers.evaluation import completion_loss
    from refusal_helpers.interventions import ablate
    from refusal_helpers.loading import load_model

    plain, zeroed = tmp_path / "plain", tmp_path / "zeroed"
    assert run_tiny(tiny_folder, plain, "--random-controls", "1") == 0
    assert record(plain, "candidates.safetensors")["settings"]["zero_dims"] == []
    shutil.copytree(plain, zeroed)  # zeroing in a finished run's folder redoes all but the baselines
    assert run_tiny(tiny_folder, zeroed, "--random-controls", "1", "--zero-dims", "5", "2") == 0
    summary = json.loads((zeroed / "summary.json").read_text())
    assert summary["reused_artifacts"] == ["completions/harmful_baseline.json", "completions/harmless_baseline.json"]
    assert summary["direction"]["zero_dims"] == [2, 5]
    assert "residual dims 2, 5 zeroed (not the paper's method)" in format_summary(summary)
    assert json.loads((plain / "summary.json").read_text())["direction"]["zero_dims"] == []
    assert "zeroed" not in format_summary(json.loads((plain / "summary.json").read_text()))
    before = load_file(str(plain / "candidates.safetensors"))["candidates"]
    after = load_file(str(zeroed / "candidates.safetensors"))["candidates"]
    assert (before[..., [2, 5]] != 0).any() and (after[..., [2, 5]] == 0).all()
    assert torch.equal(after, zero_dims(before, [2, 5]))  # the same means, only those entries differ
    direction, _ = load_direction(zeroed)
    assert (direction[[2, 5]] == 0).all()
    assert record(zeroed, "loss.json")["settings"]["zero_dims"] == [2, 5]

    # the control is a random direction with the same entries zeroed
    items = json.loads((zeroed / "completions/harmless_baseline.json").read_text())["items"]
    cm = load_model(str(tiny_folder), device="cpu")
    args = [i["instruction"] for i in items], [i["completion"] for i in items]
    baseline = completion_loss(cm, *args)
    with ablate(cm, zero_dims(random_directions(1, cm.d_model), [2, 5])[0]):
        expected = completion_loss(cm, *args) - baseline
    control = json.loads((zeroed / "loss.json").read_text())["random_controls"]["increases"][0]
    assert abs(control - expected) < 1e-4

    # the same dims in another order reuse every artifact; other dims remake the candidates
    assert run_tiny(tiny_folder, zeroed, "--random-controls", "1", "--zero-dims", "2", "5") == 0
    assert "candidates.safetensors" in json.loads((zeroed / "summary.json").read_text())["reused_artifacts"]
    assert run_tiny(tiny_folder, zeroed, "--random-controls", "1", "--zero-dims", "3") == 0
    assert "candidates.safetensors" not in json.loads((zeroed / "summary.json").read_text())["reused_artifacts"]


def test_settings_come_from_the_embedded_models_preset_unless_given(monkeypatch):
    import refusal_helpers.pipeline as pipeline
    from refusal_helpers.__main__ import build_parser
    from refusal_helpers.pipeline import PipelineConfig

    read_from = []
    monkeypatch.setattr(pipeline, "preset", lambda folder=None: read_from.append(folder) or {"zero_dims": [9, 4],
                                                                                             "kl_threshold": 0.4})
    assert PipelineConfig().dims_to_zero() == (4, 9) and PipelineConfig().selection_config().kl_threshold == 0.4
    assert read_from == [None, None]  # the committed adapter's presets.json
    assert PipelineConfig(zero_dims=(7, 7)).dims_to_zero() == (7,)
    assert PipelineConfig(kl_threshold=0.2).selection_config().kl_threshold == 0.2
    assert PipelineConfig(model="another-model").dims_to_zero() == ()  # presets are the embedded model's
    assert PipelineConfig(model="another-model").selection_config().kl_threshold == 0.1  # the paper's
    args = vars(build_parser().parse_args(["run", "--zero-dims"]))
    assert PipelineConfig(**{k: v for k, v in args.items() if k != "command"}).dims_to_zero() == ()  # no DIM: none
    assert "zero_dims" not in vars(build_parser().parse_args(["run"]))  # absent: the preset decides


def synthetic_summary() -> dict:
    return {"model": "m", "direction": {"position": -1, "layer": 3, "bypass": -2.0, "induce": 1.0, "kl": 0.2, "norm": 5.0,
                                        "zero_dims": []},
            "refusal_rate": {c: 0.5 for c in CONDITIONS}, "refused": {c: {"refused": 1, "n": 2} for c in CONDITIONS},
            "ce_loss": {"baseline": 0.3, "ablation": 0.4, "increase": 0.1,
                        "first_token_spared": {"ablation": 0.35, "increase": 0.05},
                        "random_controls": {"seed": 0, "increases": [], "mean_increase": None}},
            "timings_s": {"total_s": 12.0}, "compute_s": {"total_s": 30.0}, "reused_artifacts": [], "peak_rss_mib": 100}


def test_summary_lists_few_random_controls_condenses_many_and_ranks_the_direction():
    summary = synthetic_summary()
    assert "harmful, ablation" in format_summary(summary) and "1/2" in format_summary(summary)
    for label in (c.label for c in CONDITIONS.values()):  # every condition has its row
        assert label in format_summary(summary)

    def with_controls(increases: list[float]) -> str:
        summary["ce_loss"].update(increase=0.1, random_controls={"seed": 0, "increases": increases,
                                                                 "mean_increase": sum(increases) / len(increases)})
        return format_summary(summary)

    few = with_controls([0.3, 0.04, 0.08])
    assert ("3 random unit directions ablated instead: +0.140 on average (+0.300, +0.040, +0.080); "
            "2 of 3 cost less than the direction") in few
    many = with_controls([0.9, 0.01, 0.05, 0.02, 0.3, 0.04, 0.03, 0.2])  # median 0.045
    assert "8 random unit directions ablated instead: +0.194 on average" in many
    assert "(median +0.045, +0.010 to +0.900)" in many and "+0.300" not in many  # condensed, not listed
    assert "5 of 8 cost less than the direction" in many


def test_loss_step_reports_random_direction_controls(tiny_folder, tmp_path, capsys):
    from refusal_helpers.directions import random_directions
    from refusal_helpers.evaluation import completion_loss
    from refusal_helpers.interventions import ablate
    from refusal_helpers.loading import load_model

    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out, "--random-controls", "2") == 0
    assert "2 random unit directions ablated instead" in capsys.readouterr().out
    loss = json.loads((out / "loss.json").read_text())
    controls = loss["random_controls"]["increases"]
    assert len(controls) == 2 and controls[0] != controls[1]
    assert abs(loss["random_controls"]["mean_increase"] - sum(controls) / 2) < 1e-9
    # each control is the loss with that random direction ablated, minus the same baseline
    items = json.loads((out / "completions/harmless_baseline.json").read_text())["items"]
    cm = load_model(str(tiny_folder), device="cpu")
    args = [i["instruction"] for i in items], [i["completion"] for i in items]
    baseline = completion_loss(cm, *args)
    with ablate(cm, random_directions(2, cm.d_model)[1]):
        expected = completion_loss(cm, *args) - baseline
    assert abs(controls[1] - expected) < 1e-4
    direction, _ = load_direction(out)
    with ablate(cm, direction, spare_first_token=True):
        spared = completion_loss(cm, *args)
    assert abs(loss["first_token_spared"]["ablation"] - spared) < 1e-4
    assert abs(loss["first_token_spared"]["increase"] - (spared - baseline)) < 1e-9
    assert abs(loss["first_token_spared"]["ablation"] - loss["ablation"]) > 1e-6  # not the plain ablation again

    assert run_tiny(tiny_folder, out, "--random-controls", "0") == 0  # a new setting redoes the loss step only
    assert "random unit directions" not in capsys.readouterr().out
    assert json.loads((out / "loss.json").read_text())["random_controls"] == {"seed": 0, "increases": [], "mean_increase": None}


def test_a_direction_with_new_values_at_the_same_candidate_redoes_what_used_it(tiny_folder, tmp_path, monkeypatch):
    """Other training data change the direction's values but maybe not its (position, layer): the completions
    under interventions and the loss must not be reused from the old direction."""
    import refusal_helpers.pipeline as pipeline

    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out, "--selection-mode", "exhaustive") == 0
    first = json.loads((out / "selection.json").read_text())["selection"]
    old_direction, _ = load_direction(out)

    def same_candidate(table, config):  # the rule, restricted to the first run's choice
        keep = table.bypass[first["position_index"], first["layer"]].clone()
        table.bypass[:] = float("nan")
        table.bypass[first["position_index"], first["layer"]] = keep
        return choose(table, config)

    monkeypatch.setattr(pipeline, "choose", same_candidate)
    assert run_tiny(tiny_folder, out, "--selection-mode", "exhaustive", "--n-train", "5") == 0
    new_direction, second = load_direction(out)
    assert (second["position_index"], second["layer"]) == (first["position_index"], first["layer"])
    assert not torch.equal(new_direction, old_direction)
    reused = set(json.loads((out / "summary.json").read_text())["reused_artifacts"])
    used_direction = {"loss.json", "completions/harmful_ablation.json", "completions/harmful_ablation_spared.json",
                      "completions/harmful_actadd.json", "completions/harmless_actadd.json"}
    assert not reused & used_direction
    assert {"completions/harmful_baseline.json", "completions/harmless_baseline.json"} <= reused
    digest = RunFolder(out).digest("direction.safetensors")
    for name in used_direction:
        assert record(out, name)["settings"]["inputs"]["direction.safetensors"] == digest


def test_each_condition_is_made_under_its_own_intervention(tiny_folder, tmp_path):
    from refusal_helpers.evaluation import completion_loss
    from refusal_helpers.generation import generate
    from refusal_helpers.interventions import ablate, add
    from refusal_helpers.loading import load_model

    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out) == 0
    cm = load_model(str(tiny_folder), device="cpu")
    direction, described = load_direction(out)
    r = 50 * direction / direction.norm()  # a larger copy, only to check that the conditions can differ at all
    saved = {c: json.loads((out / f"completions/{c}.json").read_text()) for c in CONDITIONS}
    contexts = {"harmful_baseline": lambda d: torch.no_grad(), "harmful_ablation": lambda d: ablate(cm, d),
                "harmful_ablation_spared": lambda d: ablate(cm, d, spare_first_token=True),
                "harmful_actadd": lambda d: add(cm, d, described["layer"], coeff=-1.0),
                "harmless_baseline": lambda d: torch.no_grad(),
                "harmless_actadd": lambda d: add(cm, d, described["layer"], coeff=1.0)}
    assert set(contexts) == set(CONDITIONS)
    for condition, make_context in contexts.items():
        instructions = [i["instruction"] for i in saved[condition]["items"]]
        with make_context(direction):
            expected = generate(cm, instructions, max_new_tokens=4, batch_size=4, progress=False)
        assert [i["completion"] for i in saved[condition]["items"]] == expected, condition
    # Subtracting and adding are distinguishable on this model, so a swapped sign would fail above.
    harmful = [i["instruction"] for i in saved["harmful_actadd"]["items"]]
    with add(cm, r, described["layer"], coeff=-1.0):
        minus = generate(cm, harmful, max_new_tokens=4, batch_size=4, progress=False)
    with add(cm, r, described["layer"], coeff=1.0):
        plus = generate(cm, harmful, max_new_tokens=4, batch_size=4, progress=False)
    assert minus != plus
    # Ablation with and without the first token spared give the same few tokens here, so check the
    # pipeline's spared intervention on the loss, where the two differ.
    from refusal_helpers.steps import intervention
    items = saved["harmful_ablation"]["items"]
    pairs = [i["instruction"] for i in items], [i["completion"] for i in items]

    def loss_with(context) -> float:
        with context:
            return completion_loss(cm, *pairs)
    spared = loss_with(intervention(cm, "ablation_spared", direction, described["layer"]))
    assert spared == pytest.approx(loss_with(ablate(cm, direction, spare_first_token=True)), abs=1e-6)
    assert abs(spared - loss_with(ablate(cm, direction))) > 1e-6
    loss = json.loads((out / "loss.json").read_text())
    items = saved["harmless_baseline"]["items"]
    args = [i["instruction"] for i in items], [i["completion"] for i in items]
    with ablate(cm, direction):
        assert loss["ablation"] == pytest.approx(completion_loss(cm, *args), abs=1e-5)
    assert loss["baseline"] == pytest.approx(completion_loss(cm, *args), abs=1e-5)
    assert loss["ablation"] != loss["baseline"]


@pytest.mark.parametrize("option, value, expected", [
    ("--max-layer-fraction", "80", "max_layer_fraction is a fraction of the depth in (0, 1], got 80.0"),
    ("--kl-threshold", "-1", "kl_threshold bounds a KL divergence, so it must be >= 0, got -1.0"),
    ("--device", "xpu", "Unsupported device 'xpu': expected 'cpu', 'cuda' or 'cuda:N'"),
    ("--device", "meta", "Unsupported device 'meta'"),
])
def test_cli_rejects_bad_thresholds_before_loading_anything(option, value, expected, tmp_path, capsys, monkeypatch):
    import refusal_helpers.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["run", option, value, "--out", str(tmp_path / "run")]) == 2
    assert expected in capsys.readouterr().err


def test_an_empty_output_folder_is_an_error(capsys, monkeypatch):
    import refusal_helpers.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["run", "--out", ""]) == 2
    assert "The output folder is empty ('')" in capsys.readouterr().err


def test_pipeline_refuses_a_model_other_than_the_configured_one(tmp_path):
    from refusal_helpers.pipeline import Pipeline, PipelineConfig

    with pytest.raises(ValueError, match="config.model is 'embedded'"):
        Pipeline(PipelineConfig(out=str(tmp_path)), cm=tiny_chat_model("llama", n_layers=2))


def test_asking_for_more_instructions_than_a_split_has_warns():
    from refusal_helpers.data import load_instructions, split_instructions

    available = len(load_instructions("harmful", "val"))
    with pytest.warns(UserWarning, match=f"has {available}: using {available}"):
        assert len(split_instructions("bundled", "harmful", "val", available + 5)) == available


def test_default_output_folders_never_name_the_shipped_run(tmp_path, monkeypatch):
    from refusal_helpers.pipeline import default_out

    assert default_out("embedded") == "runs/demo"
    assert default_out("Qwen/Qwen2.5-1.5B-Instruct") == "runs/Qwen2.5-1.5B-Instruct"
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path / "tiny")
    assert default_out(".") == default_out("../tiny/") == "runs/tiny"
    assert default_out("model.Q4.gguf") == "runs/model.Q4"


def test_one_local_model_under_several_spellings_is_one_model(tiny_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out) == 0
    monkeypatch.chdir(tiny_folder.parent)
    assert run_tiny(f"{tiny_folder.name}/", out) == 0  # relative, with a trailing slash
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["reused_artifacts"]) == EVERY_ARTIFACT_BUT_THE_SUMMARY
    assert "model not loaded" in summary["machine"]


def test_changed_instructions_are_never_paired_with_old_results(tiny_folder, tmp_path, monkeypatch):
    import refusal_helpers.data as data

    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out) == 0
    original = data.load_instructions

    def edited(kind, split, *args):  # the bundled harmless test file, edited after the run
        items = original(kind, split, *args)
        return items[:1] + ["An instruction added later."] + items[2:] if (kind, split) == ("harmless", "test") else items

    monkeypatch.setattr(data, "load_instructions", edited)
    assert run_tiny(tiny_folder, out) == 0
    reused = set(json.loads((out / "summary.json").read_text())["reused_artifacts"])
    assert {"candidates.safetensors", "scores.json", "completions/harmful_baseline.json",
            "completions/harmful_ablation.json", "completions/harmful_actadd.json"} <= reused
    assert not reused & {"completions/harmless_baseline.json", "completions/harmless_actadd.json", "loss.json"}
    items = json.loads((out / "completions/harmless_baseline.json").read_text())["items"]
    assert items[1]["instruction"] == "An instruction added later."


def test_asking_for_more_prompts_than_a_split_has_reuses_the_whole_split(tiny_folder, tmp_path):
    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out, "--n-val", "all") == 0
    with pytest.warns(UserWarning, match="val instructions but 'bundled' has"):
        assert run_tiny(tiny_folder, out, "--n-val", "5000") == 0
    from refusal_helpers.data import load_instructions

    summary = json.loads((out / "summary.json").read_text())
    assert "scores.json" in summary["reused_artifacts"]
    assert summary["sizes"]["harmful_val"] == len(load_instructions("harmful", "val")) and summary["sizes"]["harmless_test"] == 3


def test_data_sources_are_checked_before_anything_loads(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--harmless", "advbench"])  # a harmful set as the harmless one
    assert "invalid choice: 'advbench'" in capsys.readouterr().err
    from refusal_helpers.pipeline import Pipeline, PipelineConfig

    with pytest.raises(ValueError, match="Unknown harmful source 'advbnech'"):
        Pipeline(PipelineConfig(harmful_source="advbnech", device="cpu"))


def test_ablation_sweep_measures_each_candidate_under_its_own_ablation(tiny_folder, tmp_path, monkeypatch):
    from refusal_helpers import sweep
    from refusal_helpers.evaluation import completion_loss
    from refusal_helpers.generation import generate
    from refusal_helpers.interventions import ablate
    from refusal_helpers.loading import load_model

    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out) == 0
    cm = load_model(str(tiny_folder), device="cpu")
    candidates = load_file(str(out / "candidates.safetensors"))["candidates"]
    items = json.loads((out / "completions/harmless_baseline.json").read_text())["items"]
    harmless, completions = [i["instruction"] for i in items], [i["completion"] for i in items]
    harmful = [i["instruction"] for i in json.loads((out / "completions/harmful_baseline.json").read_text())["items"]]
    cells = [(-1, 1), (-2, 2)]
    # Judge as refused exactly what the first cell's plain ablation generates, so the count shows which
    # generations were judged: that cell's, under its ablation, gives all of them.
    with ablate(cm, candidates[-1, 1]):
        ablated = generate(cm, harmful, 4, 32)
    assert ablated != generate(cm, harmful, 4, 32)  # precondition: ablation changes what is generated
    monkeypatch.setattr("refusal_helpers.judges.is_refusal", lambda completion: completion in ablated)

    baseline, costs = sweep.ablation_sweep(cm, candidates, cells, harmless, completions, harmful, max_new_tokens=4,
                                           generate_below=float("inf"), progress=False)
    assert baseline == pytest.approx(completion_loss(cm, harmless, completions), abs=1e-6)
    for cost, (position, layer) in zip(costs, cells):
        assert (cost.position, cost.layer) == (position, layer)
        for spare, increase in ((False, cost.ce_increase), (True, cost.ce_increase_spared)):
            with ablate(cm, candidates[position, layer], spare_first_token=spare):
                assert increase == pytest.approx(completion_loss(cm, harmless, completions) - baseline, abs=1e-5)
        assert cost.ce_increase != cost.ce_increase_spared
    assert costs[0].refused == len(harmful)
    _, skipped = sweep.ablation_sweep(cm, candidates, cells[:1], harmless, completions, harmful,
                                      generate_below=float("-inf"), progress=False)
    assert skipped[0].refused is None and skipped[0].refused_spared is None  # too costly: not generated
    with pytest.raises(ValueError, match="outside the candidates"):
        sweep.ablation_sweep(cm, candidates, [(-1, 3)], harmless, completions, harmful, progress=False)


def test_sweep_cli_covers_every_position_of_the_layers_asked(tiny_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out) == 0
    capsys.readouterr()
    report = tmp_path / "sweep.json"
    args = ["sweep", "--run", str(out), "--n-harmful", "3", "--n-completions", "2", "--max-new-tokens", "4"]
    assert main([*args, "--layers", "1-2", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    n_pos = load_file(str(out / "candidates.safetensors"))["candidates"].shape[0]
    assert sorted((c["position"], c["layer"]) for c in result["candidates"]) == [
        (p, l) for p in range(-n_pos, 0) for l in (1, 2)]
    assert result["n_completions"] == 2 and result["n_harmful"] == 3
    printed = capsys.readouterr().out
    assert printed.startswith(f"baseline CE {result['baseline_ce']:.3f}") and len(printed.splitlines()) == 2 + 2 * n_pos
    assert main([*args, "--layers", "3"]) == 2
    assert "outside the candidates" in capsys.readouterr().err
    assert main([*args, "--layers", "1", "--run", str(tmp_path)]) == 2
    assert "is not finished (no summary.json)" in capsys.readouterr().err
    monkeypatch.setattr("refusal_helpers.__main__.SHIPPED_RUN", tmp_path / "shipped")
    assert main(["sweep", "--layers", "1"]) == 2  # no --run: the shipped run
    assert f"No run folder at {tmp_path / 'shipped'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--layers", "one"])


def test_the_papers_filter_keeps_the_prompts_the_model_treats_as_their_kind(tiny_folder, tmp_path, monkeypatch):
    """With filtering on (the default), candidates come from harmful prompts scored > 0 and harmless ones < 0."""
    import refusal_helpers.selection.scoring as scoring
    from refusal_helpers.data import load_instructions
    from refusal_helpers.loading import load_model
    from refusal_helpers.steps import extract

    harmful, harmless = load_instructions("harmful", "train", 6), load_instructions("harmless", "train", 6)
    verdict = {**{x: (1.0 if i % 2 else -1.0) for i, x in enumerate(harmful)},  # keeps harmful 1, 3, 5
               **{x: (-1.0 if i < 4 else 2.0) for i, x in enumerate(harmless)}}  # keeps harmless 0-3
    monkeypatch.setattr(scoring, "refusal_scores", lambda cm, instructions, batch_size=32: torch.tensor(
        [verdict.get(x, 1.0 if x in load_instructions("harmful", "val") else -1.0) for x in instructions]))
    out = tmp_path / "run"
    assert run_tiny(tiny_folder, out, "--filter-train", "--filter-val") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["filter"]["train_kept"] == {"harmful": 3, "harmless": 4}
    assert summary["filter"]["val_kept"] == {"harmful_val": 3, "harmless_val": 3}
    expected = extract(load_model(str(tiny_folder), device="cpu"), harmful[1::2], harmless[:4], progress=False)
    torch.testing.assert_close(load_file(str(out / "candidates.safetensors"))["candidates"], expected["candidates"])
    assert record(out, "candidates.safetensors")["settings"]["filter_train"] is True
    monkeypatch.setattr(scoring, "refusal_scores", lambda cm, instructions, batch_size=32: -torch.ones(len(instructions)))
    assert run_tiny(tiny_folder, tmp_path / "none", "--filter-train") == 2  # no harmful prompt is refused
