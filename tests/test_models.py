import pytest
import torch

from refusal_helpers.loading import load_model
from refusal_helpers.models import ArchitectureError, ChatModel, common_suffix_length, find_blocks
from refusal_helpers.testing import ARCHITECTURES, tiny_chat_model, tiny_tokenizer

EXPECTED_WRITERS = {  # (attention writer, MLP writer) class-name fragments per family
    "llama": ("Attention", "MLP"), "gemma2": ("RMSNorm", "RMSNorm"), "gemma3": ("RMSNorm", "RMSNorm"),
    "gpt2": ("Attention", "MLP"),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_module_discovery(arch):
    cm = tiny_chat_model(arch, n_layers=3)
    assert cm.n_layers == 3 and cm.d_model == 64
    for layer in range(3):
        parts = cm.parts(layer)
        assert parts.block is cm.blocks[layer]
        assert parts.attn_out_proj.weight.shape[0 if arch != "gpt2" else 1] == 64
        assert parts.mlp_out_proj.weight.shape[0 if arch != "gpt2" else 1] == 64
        attn_kind, mlp_kind = EXPECTED_WRITERS.get(arch, ("Attention", "MLP"))
        assert attn_kind in type(parts.attn_writer).__name__
        assert mlp_kind in type(parts.mlp_writer).__name__
    assert cm.has_post_norms == (arch in ("gemma2", "gemma3"))
    assert (cm.position_embed is not None) == (arch == "gpt2")
    assert cm.unembed.weight.shape == (len(cm.tokenizer), 64)


@pytest.mark.parametrize(
    "template, expected",
    [
        ("chatml", "<|im_end|>\n<|im_start|>assistant\n"),
        ("gemma", "<end_of_turn>\n<start_of_turn>model\n"),
        ("llama3", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    ],
)
def test_post_instruction_tokens_follow_the_template(template, expected):
    cm = tiny_chat_model("llama", template=template, n_layers=2)
    assert cm.tokenizer.decode(cm.post_instruction_ids) == expected
    n = len(cm.post_instruction_ids)
    assert cm.post_instruction_positions == list(range(-n, 0))
    # In a left-padded batch the template tokens are the last n of every row.
    batch = cm.tokenize(["a", "a much longer instruction with many words in it"])
    for row in batch["input_ids"]:
        assert row[-n:].tolist() == cm.post_instruction_ids


def test_left_padding_and_no_duplicate_bos():
    cm = tiny_chat_model("llama", template="gemma", n_layers=2)
    batch = cm.tokenize(["short", "a longer instruction here"])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1, 0] == 1
    bos = cm.tokenizer.bos_token_id
    assert (batch["input_ids"][1] == bos).sum() == 1


def test_refusal_tokens_are_first_tokens_of_refusals(llama):
    from refusal_helpers.models import REFUSAL_OPENINGS

    tokens = [llama.tokenizer.decode([t]) for t in llama.refusal_token_ids]
    assert tokens[:2] == ["I", "Sorry"]
    assert len(set(tokens)) == len(tokens)
    assert all(any(o.startswith(t) for o in REFUSAL_OPENINGS) for t in tokens)


def test_no_chat_template_is_a_clear_error(llama):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        ChatModel(model=llama.model, tokenizer=tokenizer)


def test_unfindable_blocks_is_a_clear_error(llama):
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = llama.model.config
            self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(ArchitectureError, match="decoder blocks"):
        find_blocks(Weird())


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="Could not load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model", device="cpu")
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing.gguf"), device="cpu")


def test_load_model_from_a_local_folder(tmp_path, llama):
    llama.save_pretrained(tmp_path)
    cm = load_model(str(tmp_path), device="cpu", dtype="float32")
    inputs = cm.tokenize(["Hello world!"])
    torch.testing.assert_close(cm.forward(inputs), llama.forward(inputs))
    assert not cm.model.config.to_dict().get("trust_remote_code", False)


def test_common_suffix_length():
    assert common_suffix_length([[1, 2, 3], [9, 2, 3], [3]]) == 1
    assert common_suffix_length([[1, 2], [3, 4]]) == 0


def test_forward_respects_left_padding(llama):
    alone = llama.forward(llama.tokenize(["Hello world!"]))
    padded = llama.forward(llama.tokenize(["Hello world!", "a much longer instruction with many words"]))
    torch.testing.assert_close(padded[:1], alone, atol=1e-4, rtol=1e-4)


def test_hub_datasets_fail_offline_with_a_clear_message(monkeypatch):
    from refusal_helpers.data import load_hub_instructions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="Could not load 'advbench'.*load_instructions"):
        load_hub_instructions("advbench")
    with pytest.raises(ValueError, match="Unknown hub dataset"):
        load_hub_instructions("no-such-set")


def test_bundled_splits_are_fixed_disjoint_and_categorised():
    from refusal_helpers.data import categories, load_instructions, load_records

    harmful = load_records("harmful")
    assert len(harmful) >= 300 and len(categories("harmful")) == 12
    assert len(load_records("harmless")) >= 600 and "edgy_benign" in categories("harmless")
    for kind in ("harmful", "harmless"):
        splits = [set(load_instructions(kind, s)) for s in ("train", "val", "test", "dev", "cues")]
        assert all(not (a & b) for i, a in enumerate(splits) for b in splits[i + 1:])
    # dev: both kinds; its harmful half is the harmful_dev batch alone
    assert len(load_instructions("harmful", "dev")) >= 300 and len(load_instructions("harmless", "dev")) >= 500
    assert {r["batch"] for r in load_records("harmful", "dev")} == {"harmful_dev"}
    assert {r["split"] for r in load_records("harmful") if r["batch"] == "harmful_dev"} == {"dev"}
    # the held-out cue split: both kinds, and only the cues batch
    assert len(load_instructions("harmful", "cues")) >= 40 and len(load_instructions("harmless", "cues")) >= 100
    for kind in ("harmful", "harmless"):
        in_split = {r["id"] for r in load_records(kind, "cues")}
        assert in_split == {r["id"] for r in load_records(kind) if r["batch"] == "cues"}
    assert load_instructions("harmful", "test", n=3) == load_instructions("harmful", "test")[:3]
    with pytest.raises(ValueError, match="Unknown split"):
        load_instructions("harmful", "validation")


def _merge_module(data):
    """data/merge.py, the helpers every batch build shares (a script folder, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("merge", data / "merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deduplication_drops_excluded_topics_near_copies_and_exact_copies():
    from refusal_helpers.data import data_dir

    merge = _merge_module(data_dir())
    existing = {"harmful": [], "harmless": [{"id": "harmless-0000", "instruction": "How do I bake a lemon drizzle cake at home?"}]}
    drafts = {"harmful": [], "harmless": [
        {"instruction": "How should I split my rent with two flatmates fairly?", "category": "money", "group": "g"},
        {"instruction": "how do I bake a lemon-drizzle cake at home", "category": "food", "group": "g"},
        {"instruction": "Which houseplants survive a dark north-facing flat?", "category": "home", "group": "g"},
        {"instruction": "Which houseplants survive a dark north-facing flat, please?", "category": "home", "group": "g"},
    ]}
    categories = {"harmful": set(), "harmless": {"money", "food", "home"}}
    kept, dropped = merge.deduplicate(existing, drafts, categories, 0.4, excluded=(r"\bRENT\b",))
    assert [d["instruction"] for d in kept["harmless"]] == ["Which houseplants survive a dark north-facing flat?"]
    assert [(d["line"], d["reason"]) for d in dropped] == [(1, "excluded topic"), (2, "exact duplicate"), (4, "jaccard 0.89")]
    assert dropped[0]["matches"] == r"\bRENT\b"  # the pattern matched, case-insensitively
    assert merge.dropped_counts(dropped)["harmless"] == {"excluded topic": 1, "exact duplicate": 1, "jaccard vs new": 1}
    kept, dropped = merge.deduplicate(existing, drafts, categories, 0.4)  # nothing excluded by default
    assert "excluded topic" not in merge.dropped_counts(dropped)["harmless"] and len(kept["harmless"]) == 2


def test_the_batch_builds_reproduce_the_bundled_sets_byte_for_byte(tmp_path):
    import subprocess
    import sys

    from refusal_helpers.data import data_dir

    data = data_dir()
    source = data / "instructions"
    # in merge order, each on the one before's output: the first leaves out the batches merged after it
    order = _merge_module(data).BATCH_ORDER
    given = source
    for batch in order:
        out = tmp_path / batch
        subprocess.run([sys.executable, str(data / batch / "build.py"), "--source", str(given), "--out", str(out),
                        "--report", str(out / "build_report.json")], check=True, capture_output=True)
        assert (out / "build_report.json").read_bytes() == (data / batch / "build_report.json").read_bytes()
        lines = [line for kind in ("harmful", "harmless") for line in (out / f"{kind}.jsonl").read_text().splitlines()]
        assert any(f'"batch": "{batch}"' in line for line in lines)
        assert not any(f'"batch": "{later}"' in line for later in order[order.index(batch) + 1:] for line in lines)
        if given != source:  # a merge only appends: every record the one before wrote keeps its line, id included
            for kind in ("harmful", "harmless"):
                before = (given / f"{kind}.jsonl").read_text().splitlines()
                assert (out / f"{kind}.jsonl").read_text().splitlines()[:len(before)] == before, (batch, kind)
        given = out
    for kind in ("harmful", "harmless"):
        assert (given / f"{kind}.jsonl").read_bytes() == (source / f"{kind}.jsonl").read_bytes()
