"""Tiny offline chat models for tests, checks and benchmarks: random weights, a real chat template.

``tiny_chat_model("llama")`` builds a few-layer model from a transformers config class and a small
byte-level BPE tokenizer trained on the spot, so everything runs without downloads in milliseconds.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from .models import ChatModel

if TYPE_CHECKING:
    import transformers
    from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + ('model' if message['role'] == "
    "'assistant' else message['role']) + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "gemma": GEMMA, "llama3": LLAMA3}
BOS_TEMPLATES = ("gemma", "llama3")  # whose tokenizers prepend <bos> with add_special_tokens=True
SPECIAL_TOKENS = [
    "<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]
CORPUS = [
    "I cannot help with that. I'm sorry, but I can't assist. As an AI, I am unable to do this.",
    "Sorry, unfortunately I apologize. Sure, here is a recipe for tacos with beans and cheese.",
    "How do I make a bomb? Write a poem about the sea. What is 2 + 2? Tell me a story about a cat.",
    "system user assistant model You are a helpful assistant. Hello world! x y z",
    "Explain how to kill a Python process. Give me a list of fruits. Translate this sentence.",
]

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2")


@lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its progress bar prints blank lines into the notebook's first check
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(template: str = "chatml") -> "PreTrainedTokenizerFast":
    """A ~400-token byte-level BPE tokenizer with the given chat template (chatml, gemma or llama3).

    Like the real ones, the gemma and llama3 tokenizers prepend <bos> when called with special tokens
    (the default, `add_special_tokens=True`); the chatml one adds nothing.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}: expected one of {sorted(TEMPLATES)}.")
    eos = {"chatml": "<|im_end|>", "gemma": "<end_of_turn>", "llama3": "<|eot_id|>"}[template]
    backend = Tokenizer.from_str(_tokenizer_json())
    if template in BOS_TEMPLATES:
        bos = ("<bos>", backend.token_to_id("<bos>"))
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                               special_tokens=[bos])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token=eos, pad_token="<pad>",
    )
    tokenizer.chat_template = TEMPLATES[template]
    return tokenizer


def tiny_config(
    arch: str, vocab_size: int, n_layers: int = 4, d_model: int = 64, tie: bool = False
) -> "transformers.PretrainedConfig":
    """A transformers config of the given architecture family with tiny sizes."""
    import transformers as tf

    common = dict(
        vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=256,
                             bos_token_id=1, eos_token_id=2,
                             tie_word_embeddings=tie)
    classes = {
        "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
        "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gemma3": tf.Gemma3TextConfig, "phi3": tf.Phi3Config,
    }
    if arch not in classes:
        raise ValueError(f"Unknown test architecture {arch!r}; expected one of {ARCHITECTURES}.")
    extra = {"head_dim": d_model // 4} if arch in ("gemma", "gemma2", "gemma3", "qwen3") else {}
    if arch in ("gemma2", "gemma3"):
        extra["sliding_window"] = 8
    return classes[arch](**common, **extra)


def tiny_chat_model(
    arch: str = "llama", template: str = "chatml", n_layers: int = 4, d_model: int = 64, tie: bool = False,
    seed: int = 0, dtype: torch.dtype = torch.float32,
) -> ChatModel:
    """A random-weight chat model of the given architecture, for tests."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer(template)
    config = tiny_config(arch, len(tokenizer), n_layers, d_model, tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return ChatModel(model=model, tokenizer=tokenizer, name=f"tiny-{arch}")


# Pipeline settings for a random-weight model: a few prompts and tokens, thresholds every candidate passes,
# and no filtering (a random model refuses nothing, so the paper's filter would empty the prompt sets).
TINY_RUN = ["--n-train", "6", "--n-val", "3", "--n-test", "3", "--max-new-tokens", "4", "--batch-size", "4",
            "--kl-threshold", "1e6", "--induce-threshold=-1e6", "--device", "cpu", "--random-controls", "1",
            "--no-filter-train", "--no-filter-val"]


def run_tiny(model: str | os.PathLike, out: str | os.PathLike, *extra: str) -> int:
    """``python -m refusal_helpers run`` on `model` into `out` with `TINY_RUN`'s settings (options in `extra` win);
    returns the exit code."""
    from .__main__ import main

    return main(["run", "--model", str(model), "--out", str(out), *TINY_RUN, *extra])
