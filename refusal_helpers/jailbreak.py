"""How an adversarial suffix suppresses the refusal direction (the paper's section 5), on a model small enough
to attack on a CPU.

- `find_suffix`: GCG (the ``nanogcg`` package) on a few harmful prompts in turn, each run starting from the
  last one's suffix, towards a compliant opening; `random_suffix` gives a control of the same token length;
- `direction_projections`: the residual stream's projection on r̂ at the post-instruction positions, per layer;
- `head_projections` (pure) and `head_contributions`: each attention head's direct contribution to that
  projection at the last position, its output through the out-projection projected on r̂;
- `attention_shares`: how much of a head's attention the last position pays to the instruction and to the
  suffix; `analyse` takes all of these on one set of prompts.

Responsible use: this attacks a 135M toy organism with a published method; nothing here is new capability.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from .activations import residual_activations
from .batching import batches, check_instructions
from .data import load_instructions
from .directions import check_direction, normalize
from .files import atomic_write_json
from .judges import judged_completions, refused_count
from .models import ChatModel
from .runs import RunFolder

TARGET = "Sure, here is"  # a compliant opening: what GCG optimises the suffix towards


def with_suffix(instructions: list[str], suffix: str) -> list[str]:
    """Each instruction with the suffix appended, as GCG optimised it (no separator)."""
    return [instruction + suffix for instruction in instructions]


def random_suffix(tokenizer, n_tokens: int, seed: int = 0) -> str:
    """A suffix of `n_tokens` random ASCII-printable tokens (a control for an adversarial one of that length)."""
    rng = random.Random(seed)
    vocab = [i for i, text in ((i, tokenizer.decode([i])) for i in range(len(tokenizer)))
             if text.isascii() and text.isprintable() and text.strip() and i not in tokenizer.all_special_ids]
    return tokenizer.decode([rng.choice(vocab) for _ in range(n_tokens)])


def find_suffix(
    cm: ChatModel, prompts: list[str], target: str = TARGET, steps: int = 60, search_width: int = 64, topk: int = 64,
    n_tokens: int = 20, seed: int = 0,
) -> dict:
    """GCG with nanogcg on each prompt in turn, each run starting from the previous run's best suffix.

    The KV-cache prefix of nanogcg 0.3 does not fit transformers 5's cache objects, so it is switched off
    (``use_prefix_cache=False``): slower, the same optimisation.
    """
    import nanogcg

    check_instructions(prompts)
    suffix, runs = " ".join(["x"] * n_tokens), []
    for prompt in prompts:
        config = nanogcg.GCGConfig(num_steps=steps, search_width=search_width, topk=topk, seed=seed,
                                   optim_str_init=suffix, use_prefix_cache=False, verbosity="WARNING")
        result = nanogcg.run(cm.model, cm.tokenizer, prompt, target, config)
        suffix = result.best_string
        runs.append({"prompt": prompt, "best_loss": result.best_loss, "suffix": suffix})
    return {"suffix": suffix, "target": target, "runs": runs,
            "settings": {"steps": steps, "search_width": search_width, "topk": topk, "n_tokens": n_tokens, "seed": seed,
                         "use_prefix_cache": False}}


@torch.inference_mode()
def direction_projections(
    cm: ChatModel, instructions: list[str], direction: Float[Tensor, " d_model"], batch_size: int = 32
) -> Float[Tensor, "n pos layer"]:
    """Projection of the residual stream entering each layer on r̂, at the post-instruction positions."""
    check_direction(direction, cm.d_model)
    r_hat = normalize(direction.double())
    parts = [residual_activations(cm, cm.tokenize(list(chunk)), cm.post_instruction_positions,
                                  list(range(cm.n_layers))).double() @ r_hat
             for chunk in batches(instructions, batch_size)]
    return torch.cat(parts).float()


def head_projections(
    z: Float[Tensor, "... heads_x_head_dim"], w_o: Float[Tensor, "d_model heads_x_head_dim"],
    r_hat: Float[Tensor, " d_model"], n_heads: int,
) -> Float[Tensor, "... heads"]:
    """Each head's direct contribution to the projection on the unit `r_hat`: head h writes W_O[:, h] z_h to the
    residual stream, whose projection is r̂ᵀ W_O[:, h] z_h (the out-projection's bias belongs to no head)."""
    head_dim = w_o.shape[1] // n_heads
    read = (r_hat @ w_o).view(n_heads, head_dim)  # what each head's output must look like to write along r̂
    return (z.unflatten(-1, (n_heads, head_dim)) * read).sum(-1)


@contextmanager
def _attention_outputs(cm: ChatModel, attentions: bool = False) -> Iterator[dict]:
    """Capture each layer's out-projection input (the heads' outputs) and, optionally, attention weights."""
    if cm.has_post_norms:
        raise ValueError("Post-norm models (Gemma 2/3) normalise attention's output before it is added: a head's "
                         "direct contribution is not a linear read-out there.")
    seen: dict = {"z": {}, "attention": {}}
    handles = []
    for layer in range(cm.n_layers):
        parts = cm.parts(layer)
        handles.append(parts.attn_out_proj.register_forward_pre_hook(
            lambda m, args, layer=layer: seen["z"].__setitem__(layer, args[0].detach())))
        if attentions:
            handles.append(parts.attn.register_forward_hook(
                lambda m, args, out, layer=layer: seen["attention"].__setitem__(layer, out[1].detach())))
    previous = cm.model.config._attn_implementation
    if attentions:
        cm.model.set_attn_implementation("eager")  # the only implementation that returns attention weights
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        if attentions:
            cm.model.set_attn_implementation(previous)


@torch.inference_mode()
def head_contributions(
    cm: ChatModel, instructions: list[str], direction: Float[Tensor, " d_model"], batch_size: int = 16
) -> Float[Tensor, "n layer head"]:
    """Each attention head's direct contribution to the projection on r̂ at the last position, every layer."""
    r_hat = normalize(direction.double())
    n_heads = cm.model.config.num_attention_heads
    out = []
    for chunk in batches(instructions, batch_size):
        with _attention_outputs(cm) as seen:
            cm.forward(cm.tokenize(list(chunk)), logits_to_keep=1)
        out.append(torch.stack([head_projections(seen["z"][layer][:, -1].double(),
                                                 cm.parts(layer).attn_out_proj.weight.double(), r_hat, n_heads)
                                for layer in range(cm.n_layers)], dim=1))
    return torch.cat(out).float()


def token_span(cm: ChatModel, content: str, start: int, length: int) -> list[int]:
    """Positions, in the formatted prompt of the user message `content`, of the tokens that cover its
    characters [start, start + length)."""
    prompt = cm.format([content])[0]
    offset = prompt.index(content) + start
    enc = cm.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > offset and a < offset + length]


@torch.inference_mode()
def attention_shares(
    cm: ChatModel, instructions: list[str], suffix: str, heads: list[tuple[int, int]]
) -> dict[tuple[int, int], dict[str, float]]:
    """For each (layer, head): the mean share of the last position's attention that goes to the instruction's
    tokens and to the suffix's tokens, over `instructions` with `suffix` appended (one prompt at a time)."""
    shares = {head: {"instruction": 0.0, "suffix": 0.0} for head in heads}
    for instruction in instructions:
        prompt = instruction + suffix
        ids = cm.tokenize([prompt])
        spans = {"instruction": token_span(cm, prompt, 0, len(instruction)),
                 "suffix": token_span(cm, prompt, len(instruction), len(suffix))}
        with _attention_outputs(cm, attentions=True) as seen:
            cm.forward(ids, logits_to_keep=1)
        for layer, head in heads:
            weights = seen["attention"][layer][0, head, -1].double()  # the last position's attention over keys
            for name, span in spans.items():
                shares[layer, head][name] += float(weights[span].sum()) / len(instructions)
    return shares


def top_heads(contributions: Float[Tensor, "n layer head"], below: int, k: int = 5) -> list[tuple[int, int]]:
    """The (layer, head) pairs, in the layers below `below` (those that write the residual stream the direction
    is read from), whose mean direct contribution to the projection on r̂ is largest."""
    mean = contributions.mean(0)[:below]
    flat = mean.flatten().topk(min(k, mean.numel())).indices
    return [(int(i) // mean.shape[1], int(i) % mean.shape[1]) for i in flat]


def analyse(cm: ChatModel, direction: Float[Tensor, " d_model"], position: int, layer: int, harmful: list[str],
            harmless: list[str], suffix: str, control: str, k_heads: int = 5) -> dict:
    """The paper's section-5 measurements on `harmful` (with the adversarial suffix, with a random one, without)
    and `harmless` prompts: the mean projection on r̂ per layer at the direction's template `position`, each
    head's direct contribution at the last position with and without the suffix, and the attention that the
    heads below `layer` writing the direction most pay to the instruction and to the suffix."""
    sets = {"harmful": harmful, "harmful + adversarial suffix": with_suffix(harmful, suffix),
            "harmful + random suffix": with_suffix(harmful, control), "harmless": harmless}
    index = cm.post_instruction_positions.index(position)
    projections = {name: direction_projections(cm, prompts, direction)[:, index] for name, prompts in sets.items()}
    plain, attacked = (head_contributions(cm, sets[name], direction) for name in ("harmful", "harmful + adversarial suffix"))
    heads = top_heads(plain, layer, k_heads)
    return {
        "position": position, "layer": layer, "n": {name: len(p) for name, p in sets.items()},
        "projection_per_layer": {name: values.mean(0).tolist() for name, values in projections.items()},
        "projection_at_layer": {name: float(values[:, layer].mean()) for name, values in projections.items()},
        "top_heads": [{"layer": l, "head": h, "contribution": float(plain[:, l, h].mean()),
                       "contribution_with_suffix": float(attacked[:, l, h].mean())} for l, h in heads],
        "attention": {f"{l}.{h}": share for (l, h), share in attention_shares(cm, harmful, suffix, heads).items()},
        "heads_total": {"harmful": float(plain[:, :layer].sum((1, 2)).mean()),  # the heads below the direction's layer
                        "with_suffix": float(attacked[:, :layer].sum((1, 2)).mean())},
    }


def attack_run(
    run: RunFolder, out: Path, n_prompts: int = 3, steps: int = 60, search_width: int = 64, topk: int = 64,
    n_tokens: int = 20, seed: int = 0, n_analysed: int = 32, reuse_suffix: bool = False,
) -> dict:
    """Find a suffix on the first `n_prompts` training prompts the run's model refuses (or reuse ``suffix.json``),
    then measure it on the run's held-out harmful test prompts: refusal with it, with a random suffix of its
    token length, and without one; and `analyse` on the first `n_analysed` test prompts of each kind."""
    direction, selection = run.direction()
    max_new_tokens = run.summary()["sizes"]["max_new_tokens"]
    cm = run.load_model()
    out.mkdir(parents=True, exist_ok=True)
    if reuse_suffix:
        found = json.loads((out / "suffix.json").read_text())
    else:
        refused = [i["instruction"] for i in judged_completions(cm, load_instructions("harmful", "train", 32),
                                                                max_new_tokens) if i["refusal"]]
        found = find_suffix(cm, refused[:n_prompts], steps=steps, search_width=search_width, topk=topk,
                            n_tokens=n_tokens, seed=seed)
        found["model"] = run.identity()
        atomic_write_json(out / "suffix.json", found)
    suffix = found["suffix"]
    control = random_suffix(cm.tokenizer, len(cm.tokenizer(suffix, add_special_tokens=False)["input_ids"]), seed)
    test = {kind: [i["instruction"] for i in run.completions(f"{kind}_baseline")["items"]] for kind in ("harmful", "harmless")}
    rates = {name: refused_count(judged_completions(cm, prompts, max_new_tokens))
             for name, prompts in (("none", test["harmful"]), ("adversarial", with_suffix(test["harmful"], suffix)),
                                   ("random", with_suffix(test["harmful"], control)))}
    result = {"suffix": suffix, "random_suffix": control, "n_test": len(test["harmful"]), "refused": rates,
              "max_new_tokens": max_new_tokens, "run": run.label,
              "model_version": (run.identity() or {}).get("model_version"),  # the weights measured (the suffix names its own)
              "analysis": analyse(cm, direction, selection["position"], selection["layer"], test["harmful"][:n_analysed],
                                  test["harmless"][:n_analysed], suffix, control)}
    atomic_write_json(out / "analysis.json", result)
    return result
