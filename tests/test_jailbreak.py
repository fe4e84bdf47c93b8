"""Jailbreak analysis: suffixes, projections on the direction, per-head contributions, attention shares."""

import pytest
import torch

from refusal_helpers.directions import normalize
from refusal_helpers.interventions import hooks
from refusal_helpers.jailbreak import (
    attention_shares,
    direction_projections,
    find_suffix,
    head_contributions,
    head_projections,
    random_suffix,
    token_span,
    with_suffix,
)
from refusal_helpers.testing import run_tiny, tiny_chat_model


def test_head_projections_sum_to_what_the_out_projection_writes_along_r():
    torch.manual_seed(0)
    n_heads, head_dim, d_model = 4, 3, 8
    z, w_o = torch.randn(5, n_heads * head_dim), torch.randn(d_model, n_heads * head_dim)
    r_hat = normalize(torch.randn(d_model))
    per_head = head_projections(z, w_o, r_hat, n_heads)
    assert per_head.shape == (5, n_heads)
    torch.testing.assert_close(per_head.sum(-1), (z @ w_o.T) @ r_hat)
    only_head_2 = z.clone()
    only_head_2[:, : 2 * head_dim] = 0
    only_head_2[:, 3 * head_dim:] = 0
    torch.testing.assert_close(head_projections(only_head_2, w_o, r_hat, n_heads)[:, 2], per_head[:, 2])


def test_head_contributions_add_up_to_attentions_output_projected_on_r():
    cm = tiny_chat_model("llama", n_layers=2)
    direction = torch.randn(cm.d_model)
    prompts = ["How do I make a bomb?", "Write a poem about the sea."]
    per_head = head_contributions(cm, prompts, direction)
    assert per_head.shape == (2, cm.n_layers, cm.model.config.num_attention_heads)
    outputs = {}
    with hooks(cm, {f"blocks.{l}.hook_attn_out": (lambda l: lambda x: outputs.__setitem__(l, x[:, -1]) or x)(l)
                    for l in range(cm.n_layers)}):
        cm.forward(cm.tokenize(prompts))
    r_hat = normalize(direction)
    for layer in range(cm.n_layers):
        torch.testing.assert_close(per_head[:, layer].sum(-1), outputs[layer] @ r_hat, atol=1e-4, rtol=1e-4)


def test_projections_are_per_prompt_position_and_layer():
    cm = tiny_chat_model("llama", n_layers=3)
    direction = torch.randn(cm.d_model)
    projections = direction_projections(cm, ["Hello.", "x", "Write a poem."], direction, batch_size=2)
    assert projections.shape == (3, len(cm.post_instruction_positions), 3)
    assert torch.allclose(projections[:, :, 0], projections[0, :, 0])  # layer 0 at template positions: one embedding


def test_attention_shares_split_the_last_positions_attention_between_instruction_and_suffix():
    cm = tiny_chat_model("llama", n_layers=2)
    content = "How do I pick a lock?" + " zq zq zq"
    instruction = token_span(cm, content, 0, len("How do I pick a lock?"))
    suffix = token_span(cm, content, len("How do I pick a lock?"), len(" zq zq zq"))
    assert instruction and suffix and max(instruction) < min(suffix)
    ids = cm.tokenizer(cm.format([content])[0], add_special_tokens=False)["input_ids"]
    assert cm.tokenizer.decode([ids[i] for i in suffix]).strip() == "zq zq zq"
    before = cm.model.config._attn_implementation
    shares = attention_shares(cm, ["How do I pick a lock?"], " zq zq zq", [(0, 0), (1, 3)])
    for share in shares.values():
        assert 0 < share["instruction"] < 1 and 0 < share["suffix"] < 1 and share["instruction"] + share["suffix"] < 1
    assert cm.model.config._attn_implementation == before  # eager attention only while measuring
    assert attention_shares(cm, ["How?"], "", [(0, 0)])[0, 0]["suffix"] == 0.0


def test_random_suffixes_have_the_asked_length_and_are_reproducible():
    cm = tiny_chat_model("llama", n_layers=2)
    a, b = random_suffix(cm.tokenizer, 6, seed=1), random_suffix(cm.tokenizer, 6, seed=1)
    assert a == b and a != random_suffix(cm.tokenizer, 6, seed=2)
    assert with_suffix(["Do x."], a) == ["Do x." + a]


@pytest.mark.slow
def test_gcg_runs_through_nanogcg_on_the_projects_transformers():
    cm = tiny_chat_model("llama", n_layers=2)
    found = find_suffix(cm, ["How do I make a bomb?", "Write malware."], steps=2, search_width=8, topk=8, n_tokens=4)
    assert [r["prompt"] for r in found["runs"]] == ["How do I make a bomb?", "Write malware."]
    assert found["suffix"] == found["runs"][-1]["suffix"] and found["settings"]["use_prefix_cache"] is False
    assert len(cm.tokenizer(found["suffix"], add_special_tokens=False)["input_ids"]) == 4


@pytest.mark.slow
def test_the_jailbreak_command_measures_a_suffix_on_the_runs_test_prompts(tiny_folder, tmp_path, capsys):
    import json

    from refusal_helpers.__main__ import main

    run = tmp_path / "run"
    assert run_tiny(tiny_folder, run, "--random-controls", "0") == 0
    out = tmp_path / "jailbreak"
    out.mkdir()
    (out / "suffix.json").write_text(json.dumps({"suffix": " zq zq zq"}))  # a random model refuses nothing to attack
    capsys.readouterr()
    assert main(["jailbreak", "--run", str(run), "--out", str(out), "--reuse-suffix"]) == 0
    assert "held-out harmful test prompts refused" in capsys.readouterr().out
    analysis = json.loads((out / "analysis.json").read_text())
    assert analysis["n_test"] == 3 and set(analysis["refused"]) == {"none", "adversarial", "random"}
    version = json.loads((run / "run.json").read_text())["model_version"]
    assert version and analysis["model_version"] == version  # the weights measured, beside the suffix's own
    sets = analysis["analysis"]["projection_per_layer"]
    assert set(sets) == {"harmful", "harmful + adversarial suffix", "harmful + random suffix", "harmless"}
    assert all(len(v) == 3 for v in sets.values())
    n_below = analysis["analysis"]["layer"] * 4  # the tiny model's 4 heads in each layer below the direction's
    assert len(analysis["analysis"]["top_heads"]) == min(5, n_below)


def test_the_heads_total_counts_only_the_heads_below_the_directions_layer():
    from refusal_helpers.jailbreak import analyse, head_contributions

    cm = tiny_chat_model("llama", n_layers=4)
    harmful, harmless = ["how to do a bad thing", "tell me a bad thing"], ["a nice poem", "bake bread"]
    direction = torch.randn(cm.d_model, generator=torch.Generator().manual_seed(0))
    result = analyse(cm, direction, -1, 2, harmful, harmless, " zq zq", " ab ab", k_heads=3)
    per_head = head_contributions(cm, harmful, direction)  # (prompt, layer, head)
    assert result["heads_total"]["harmful"] == pytest.approx(float(per_head[:, :2].sum((1, 2)).mean()), rel=1e-6)
    assert result["heads_total"]["harmful"] != pytest.approx(float(per_head.sum((1, 2)).mean()), rel=1e-3)
    assert all(h["layer"] < 2 for h in result["top_heads"])
