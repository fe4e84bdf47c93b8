"""Judges as plugins: substring, logit refusal score, and a safety classifier (a tiny random model offline)."""

import pytest

from refusal_helpers.interventions import add
from refusal_helpers.judges import (
    ClassifierJudge,
    LogitJudge,
    SubstringJudge,
    judge_by_name,
    judged_completions,
    parse_safety,
)
from refusal_helpers.testing import run_tiny, tiny_chat_model


def test_substring_judge_reads_refusal_phrases():
    cm = tiny_chat_model("llama", n_layers=2)
    verdicts = SubstringJudge().judge(cm, ["a", "b", "c"], ["I'm sorry, I can't.", "Sure: step one.", "i cannot"])
    assert verdicts == ["refused", "complied", "refused"]
    with pytest.raises(ValueError, match="one completion per instruction"):
        SubstringJudge().judge(cm, ["a", "b"], ["x"])


def test_logit_judge_is_the_sign_of_the_refusal_score_under_the_active_intervention():
    from refusal_helpers.evaluation import refusal_scores

    cm = tiny_chat_model("llama", n_layers=2)
    prompts = ["Hello.", "Write a poem.", "x"]
    scores = refusal_scores(cm, prompts)
    assert LogitJudge().judge(cm, prompts, ["", "", ""]) == ["refused" if s > 0 else "complied" for s in scores]
    # under an intervention the judge reads the intervened model's scores
    push = cm.unembed.weight[cm.refusal_token_ids].sum(0).detach()
    with add(cm, 50 * push / push.norm(), layer=1):
        pushed = refusal_scores(cm, prompts)
        assert LogitJudge().judge(cm, prompts, ["", "", ""]) == ["refused" if s > 0 else "complied" for s in pushed]
    assert (pushed - scores).min() > 0.5  # the intervention raised every score


@pytest.mark.parametrize("text, verdict", [("safe", "complied"), ("unsafe\nS1", "harmful"), (" Unsafe.", "harmful"),
                                           ("maybe", None), ("", None)])
def test_a_classifiers_answer_is_parsed(text, verdict):
    assert parse_safety(text) == verdict


def test_the_classifier_judge_reads_the_exchange_through_its_own_chat_template(tmp_path, monkeypatch):
    tiny_chat_model("qwen2", n_layers=2, seed=5).save_pretrained(tmp_path / "guard")  # standing in for LlamaGuard
    judge = judge_by_name(f"classifier:{tmp_path / 'guard'}")
    assert isinstance(judge, ClassifierJudge)
    seen = []
    real_decode = type(judge.classifier().tokenizer).batch_decode

    def answers(self, ids, **kwargs):  # the random model's words, read as a classifier's answers in turn
        texts = real_decode(self, ids, **kwargs)
        seen.extend(texts)
        return ["unsafe\nS2" if i % 2 else "safe" for i in range(len(texts))]

    monkeypatch.setattr(type(judge.classifier().tokenizer), "batch_decode", answers)
    cm = tiny_chat_model("llama", n_layers=2)
    assert judge.judge(cm, ["How?", "Why?", "What?"], ["A.", "B.", "C."]) == ["complied", "harmful", "complied"]
    assert len(seen) == 3
    monkeypatch.setattr(type(judge.classifier().tokenizer), "batch_decode", lambda self, ids, **kw: ["banana"] * len(ids))
    with pytest.raises(ValueError, match="not 'safe' or 'unsafe'"):
        judge.judge(cm, ["How?"], ["A."])


def test_judge_names_are_checked():
    assert judge_by_name("substring").name == "substring" and judge_by_name("logit").name == "logit"
    for bad in ("classifier", "substrings", "logit:x"):
        with pytest.raises(ValueError):
            judge_by_name(bad)


def test_judged_completions_carry_the_verdict_and_the_refusal_flag(monkeypatch):
    import refusal_helpers.judges as judges

    cm = tiny_chat_model("llama", n_layers=2)
    monkeypatch.setattr(judges, "generate", lambda cm, instructions, *a, **k: ["I can't." if "bomb" in i else "Ok."
                                                                                for i in instructions])
    items = judged_completions(cm, ["a bomb?", "a cake?"], judge=SubstringJudge())
    assert [(i["verdict"], i["refusal"]) for i in items] == [("refused", True), ("complied", False)]


def test_a_second_judge_rereads_each_condition_under_its_intervention(tiny_folder, tmp_path, capsys, monkeypatch):
    import json

    import refusal_helpers.agreement as agreement
    from refusal_helpers.__main__ import main

    run = tmp_path / "run"
    assert run_tiny(tiny_folder, run, "--random-controls", "0") == 0
    seen = []
    real = agreement.intervention
    monkeypatch.setattr(agreement, "intervention", lambda cm, kind, d, layer: seen.append(kind) or real(cm, kind, d, layer))
    assert main(["judge", "--run", str(run), "--judge", "logit", "--json", str(tmp_path / "a.json")]) == 0
    assert seen == [None, "ablation", "ablation_spared", "subtract", None, "add"]
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["n"] == 18 and 0 <= result["agree"] <= 18 and "all conditions:" in capsys.readouterr().out
    from refusal_helpers.runs import RunFolder

    assert result["model_version"] == RunFolder(run).identity()["model_version"] is not None  # the weights judged
    for c in result["conditions"].values():
        assert sum(c["pairs"].values()) == c["n"] == 3
        assert c["agree"] == sum(n for pair, n in c["pairs"].items() if pair.split("/")[0] == pair.split("/")[1])
