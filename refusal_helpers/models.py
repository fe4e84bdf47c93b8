"""Loading chat models and finding their parts.

`load_model` returns a `ChatModel`: the Hugging Face model and tokenizer plus everything the method
needs to know about them, found generically from the model itself rather than per-family code:

- prompt formatting through the tokenizer's own chat template;
- the post-instruction positions: template tokens that follow the user's text (e.g. ChatML's
  ``<|im_end|>\\n<|im_start|>assistant\\n``), which sit at the last positions of a left-padded batch;
- refusal-token ids: the first token of typical refusals ("I", "Sorry", "As", ...);
- the decoder blocks, what each attention and MLP adds to the residual stream, the embedding and
  unembedding.

Loading by name (``"embedded"``, a hub name, a folder, a .gguf file) is `refusal_helpers.loading.load_model`;
this module loads Hugging Face folders and GGUF files (`load_pretrained`). Hook names are `hookpoints`'.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .batching import check_instructions
from .devices import resolve_device_dtype

# Child-module names, in order of preference, used to find parts across architectures.
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
ATTN_OUT_PROJ_NAMES = ("o_proj", "c_proj", "out_proj", "dense")
MLP_OUT_PROJ_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2")
POSITION_EMBEDDING_NAMES = ("wpe", "embed_positions")

# Openings of typical refusals; their first tokens are the refusal tokens of the logit refusal score.
REFUSAL_OPENINGS = ("I cannot", "I can't", "I'm sorry", "Sorry", "As an AI", "Unfortunately", "I apologize")

# Probe instructions with different endings: the token suffix they all share after the user's text is
# the post-instruction template.
_PROBE_INSTRUCTIONS = ("x", "Hello world!", "What is 2 + 2?", "Tell me a story about a cat.")

class ArchitectureError(ValueError):
    """The model's layout (blocks, attention, MLP) could not be found."""


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _require_child(module: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    child = _child(module, names)
    if child is None:
        raise ArchitectureError(
            f"Could not find the {what} of {type(module).__name__}: expected a child module named one of "
            f"{names}, found {[n for n, _ in module.named_children()]}."
        )
    return child


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the ModuleList of the text model with one entry per hidden layer."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if n_layers is None:
        raise ArchitectureError(f"{type(model).__name__}'s config names no number of layers.")
    root = model.get_decoder() if hasattr(model, "get_decoder") else model
    for candidate_root in (root, model):
        for _, module in candidate_root.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n_layers:
                return module
    raise ArchitectureError(
        f"Could not find the decoder blocks of {type(model).__name__}: no ModuleList of length "
        f"{n_layers} (num_hidden_layers). Supported layouts are decoder-only HF models such as Llama, "
        "Mistral, Qwen2/3, Gemma 1-3, Phi-3 and GPT-2."
    )


@dataclass
class BlockParts:
    """The modules of one decoder block that the method touches."""

    block: nn.Module
    attn: nn.Module  # attention module (output: tensor or tuple with the tensor first)
    mlp: nn.Module
    attn_writer: nn.Module  # module whose output is added to the residual stream by attention
    mlp_writer: nn.Module  # module whose output is added to the residual stream by the MLP
    attn_out_proj: nn.Module  # last linear map of attention
    mlp_out_proj: nn.Module  # last linear map of the MLP
    post_norms: bool  # a norm sits between the out-projections and the residual add (Gemma 2/3)


def block_parts(block: nn.Module) -> BlockParts:
    """Find attention, MLP and what each writes to the residual stream, for one decoder block."""
    attn = _require_child(block, ATTENTION_NAMES, "attention module")
    mlp = _require_child(block, MLP_NAMES, "MLP module")
    attn_out_proj = _require_child(attn, ATTN_OUT_PROJ_NAMES, "attention output projection")
    mlp_out_proj = _require_child(mlp, MLP_OUT_PROJ_NAMES, "MLP output projection")
    # Sandwich-norm blocks (Gemma 2/3) normalise sublayer outputs before the residual add. Llama's
    # `post_attention_layernorm` is a *pre*-MLP norm, so the tell is `post_feedforward_layernorm`.
    post_ffn = getattr(block, "post_feedforward_layernorm", None)
    post_attn = getattr(block, "post_attention_layernorm", None)
    post_norms = post_ffn is not None and post_attn is not None
    return BlockParts(
        block=block,
        attn=attn,
        mlp=mlp,
        attn_writer=post_attn if post_norms else attn,
        mlp_writer=post_ffn if post_norms else mlp,
        attn_out_proj=attn_out_proj,
        mlp_out_proj=mlp_out_proj,
        post_norms=post_norms,
    )


def common_suffix_length(sequences: list[list[int]]) -> int:
    """Length of the longest suffix that every sequence shares."""
    n = 0
    shortest = min(len(s) for s in sequences)
    while n < shortest and all(s[-1 - n] == sequences[0][-1 - n] for s in sequences):
        n += 1
    return n


def control_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens (BOS, EOS, turn markers such as ``<|im_end|>``) as text."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = set(tokenizer.all_special_tokens) | {t.content for t in added.values() if getattr(t, "special", False)}
    return sorted(t for t in found if t)


def check_no_control_tokens(tokenizer, texts: list[str], what: str = "instruction") -> None:
    """Raise a clear error if a text contains one of the tokenizer's control tokens: the chat template would
    read it as template structure (e.g. a new turn), not as the user's words."""
    tokens = control_tokens(tokenizer)
    for i, text in enumerate(texts):
        found = next((t for t in tokens if t in text), None)
        if found is not None:
            raise ValueError(
                f"{what.capitalize()} {i} ({text[:60]!r}) contains the control token {found!r}, which the tokenizer "
                "would read as chat-template structure (e.g. the end of the user's turn), not as text. Remove it "
                f"or write it differently (e.g. with spaces inside: {' '.join(found)!r})."
            )


def format_prompts(tokenizer, instructions: list[str], system_prompt: str | None = None) -> list[str]:
    """Prompts as the tokenizer's chat template writes them, ending with the assistant's turn opening.

    Instructions (and the system prompt) must not contain the tokenizer's control tokens.
    """
    if isinstance(instructions, str):
        instructions = [instructions]
    check_instructions(instructions)
    check_no_control_tokens(tokenizer, instructions)
    if system_prompt is not None:
        check_no_control_tokens(tokenizer, [system_prompt], "system prompt")
    prompts = []
    for instruction in instructions:
        messages = [{"role": "user", "content": instruction}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return prompts


def find_post_instruction_ids(tokenizer, system_prompt: str | None = None) -> list[int]:
    """Token ids of the template that follows the user's text: the suffix shared by differently ending prompts."""
    prompts = format_prompts(tokenizer, list(_PROBE_INSTRUCTIONS), system_prompt)
    sequences = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    n = common_suffix_length(sequences)
    if n == 0:
        raise ValueError("The chat template adds no tokens after the user's text.")
    return sequences[0][-n:]


@dataclass
class ChatModel:
    """A causal LM with its tokenizer and what the refusal-direction method needs to know about it."""

    model: nn.Module
    tokenizer: object
    name: str = "model"
    system_prompt: str | None = None
    _parts: list[BlockParts] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"The tokenizer of {self.name!r} has no chat template: this method needs a chat (instruct) "
                "model whose tokenizer defines `chat_template` (e.g. Qwen/Qwen2.5-1.5B-Instruct), "
                "not a base model."
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()
        self.blocks = find_blocks(self.model)
        self._parts = [block_parts(block) for block in self.blocks]

    # ----- sizes and placement -------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return self.embed.weight.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ----- parts ---------------------------------------------------------------------------------
    @property
    def embed(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def unembed(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def position_embed(self) -> nn.Embedding | None:
        """Learned absolute position embedding (GPT-2), which also writes to the residual stream."""
        return _child(self.model.get_decoder(), POSITION_EMBEDDING_NAMES)

    def parts(self, layer: int) -> BlockParts:
        """The modules of block `layer` that the method touches (attention, MLP, their out-projections)."""
        return self._parts[layer]

    @property
    def has_post_norms(self) -> bool:
        """Whether sublayer outputs are normalised before the residual add (Gemma 2/3)."""
        return any(p.post_norms for p in self._parts)

    # ----- prompts -------------------------------------------------------------------------------
    def format(self, instructions: list[str]) -> list[str]:
        """Prompts as the chat template writes them, ending with the assistant's turn opening."""
        return format_prompts(self.tokenizer, instructions, self.system_prompt)

    def tokenize(self, instructions: list[str]) -> dict[str, Int[Tensor, "batch seq"]]:
        """Left-padded input ids and attention mask on the model's device (`forward` derives position ids)."""
        batch = self.tokenizer(
            self.format(instructions), return_tensors="pt", padding=True, add_special_tokens=False
        )
        self.check_length(batch["input_ids"].shape[1])
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    @property
    def max_positions(self) -> int | None:
        """How many positions a learned absolute position embedding (GPT-2) can encode; None without one."""
        return None if self.position_embed is None else self.position_embed.num_embeddings

    def check_length(self, n_tokens: int, what: str = "A prompt") -> None:
        """Raise a clear error for a sequence longer than the model's learned positions (it would index past them)."""
        limit = self.max_positions
        if limit is not None and n_tokens > limit:
            raise ValueError(f"{what} of {n_tokens} tokens is longer than the {limit} positions {self.name!r} can "
                             "embed: shorten the instruction (or generate fewer new tokens).")

    @cached_property
    def post_instruction_ids(self) -> list[int]:
        """Token ids of the template that follows the user's text, found from the template itself."""
        return find_post_instruction_ids(self.tokenizer, self.system_prompt)

    @property
    def post_instruction_positions(self) -> list[int]:
        """Negative positions of the post-instruction tokens in a left-padded batch, e.g. [-5, ..., -1]."""
        n = len(self.post_instruction_ids)
        return list(range(-n, 0))

    @property
    def post_instruction_tokens(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self.post_instruction_ids)

    @cached_property
    def refusal_token_ids(self) -> list[int]:
        """First tokens of typical refusal openings, as the model would produce them after the template."""
        prompt = self.format(["x"])[0]
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for opening in REFUSAL_OPENINGS:
            full = self.tokenizer(prompt + opening, add_special_tokens=False)["input_ids"]
            if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
                token = full[len(prompt_ids)]
                if token not in ids:
                    ids.append(token)
        if not ids:
            raise ValueError(f"Could not derive refusal tokens for {self.name!r}.")
        return ids

    # ----- forward passes ------------------------------------------------------------------------
    def forward(
        self, inputs: dict[str, Tensor], logits_to_keep: int = 1
    ) -> Float[Tensor, "batch kept vocab"]:
        """Logits at the last `logits_to_keep` positions (0 keeps all), with position ids that respect left padding."""
        mask = inputs["attention_mask"]
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.model(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            use_cache=False,
        ).logits

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Save the model (safetensors) and its tokenizer with its chat template, loadable by `load_model(folder)`."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        return Path(folder)

    def __repr__(self) -> str:
        return (
            f"ChatModel({self.name!r}, {type(self.model).__name__}, n_layers={self.n_layers}, "
            f"d_model={self.d_model}, device={self.device}, dtype={self.dtype})"
        )


def load_pretrained(
    name_or_path: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    **from_pretrained_kwargs,
) -> ChatModel:
    """A chat model from a Hugging Face folder or hub name, or a .gguf file (de-quantised to `dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = resolve_device_dtype(device, dtype)
    kwargs = dict(from_pretrained_kwargs)
    source = name_or_path
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file not found: {name_or_path}")
        source, kwargs["gguf_file"] = os.path.split(os.path.abspath(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError) as err:
        raise OSError(
            f"Could not load model {name_or_path!r}. Expected 'embedded', a local model folder or .gguf file, "
            "or a Hugging Face Hub name such as 'Qwen/Qwen2.5-1.5B-Instruct' (which needs network access, "
            "and a token from HF_TOKEN for gated models). Underlying error: "
            f"{type(err).__name__}: {err}"
        ) from err
    if "gguf_file" in kwargs:
        dequantized(model)
    model.to(device)
    return ChatModel(model=model, tokenizer=tokenizer, name=name_or_path)


def dequantized(model: nn.Module) -> nn.Module:
    """`model`, loaded from a GGUF file, without the GGUF quantizer state: transformers de-quantises the
    weights into plain tensors, but the leftover state would stop editing and `save_pretrained`."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model
