"""Direction selection: the straightforward per-candidate loop vs the library (target: >= 4x, same choice).

The straightforward loop is the paper's reference procedure written plainly: for every candidate in the
allowed layers (the same ones the library scores), three full forward passes over the validation prompts (ablation on harmful, addition on harmless, ablation on
harmless for KL), computing logits at every position although only the last is used. The library (lazy
mode) scores bypass for every allowed candidate, then checks the filters in bypass order; its ablated
passes run the prompts' shared prefix (system prompt, user header) once per candidate and reuse its KV
cache for every prompt, and keep logits at the last position only; induce passes run only the layers
above the candidate. Each side runs once (the loop takes minutes), the library first.
"""

import time

import torch

from common import load, machine, parser
from refusal_helpers.activations import mean_activations
from refusal_helpers.data import load_instructions
from refusal_helpers.directions import ZERO_NORM, diff_of_means, zero_dims
from refusal_helpers.interventions import ablate, add
from refusal_helpers.metrics import kl_divergence, refusal_score
from refusal_helpers.pipeline import PipelineConfig
from refusal_helpers.selection import ScoreTable, choose, layer_mask, select_direction


@torch.inference_mode()
def last_full_logits(cm, inputs):
    return cm.forward(inputs, logits_to_keep=0)[:, -1].float()


@torch.inference_mode()
def straightforward(cm, candidates, harmful, harmless, config):
    harmful_in, harmless_in = cm.tokenize(harmful), cm.tokenize(harmless)
    ids = cm.refusal_token_ids
    base = last_full_logits(cm, harmless_in)
    n_pos, n_layers, _ = candidates.shape
    allowed = layer_mask(n_pos, n_layers, config.max_layer_fraction)
    nan = torch.full((n_pos, n_layers), float("nan"))
    bypass, induce, kl = nan.clone(), nan.clone(), nan.clone()
    for p in range(n_pos):
        for layer in range(n_layers):
            r = candidates[p, layer]
            if not allowed[p, layer] or r.norm() <= ZERO_NORM:
                continue
            with ablate(cm, r):
                bypass[p, layer] = refusal_score(last_full_logits(cm, harmful_in), ids).mean()
                kl[p, layer] = kl_divergence(base, last_full_logits(cm, harmless_in)).mean()
            with add(cm, r, layer):
                induce[p, layer] = refusal_score(last_full_logits(cm, harmless_in), ids).mean()
    return choose(ScoreTable(cm.post_instruction_positions[-n_pos:], bypass, induce, kl), config)


def main() -> None:
    p = parser(__doc__)
    # The pipeline's default sizes, on which the embedded preset's KL threshold was set (with fewer
    # validation prompts the scores, and so the candidates that pass it, change). Fewer positions keep the
    # straightforward loop to minutes.
    p.add_argument("--n-train", type=int, default=PipelineConfig.n_train)
    p.add_argument("--n-val", type=int, default=PipelineConfig.n_val)
    p.add_argument("--positions", type=int, default=3, help="use only the last N post-instruction positions (0: all)")
    p.add_argument("--kl-threshold", type=float, default=None)
    args = p.parse_args()
    cm = load(args)
    positions = cm.post_instruction_positions[-(args.positions or len(cm.post_instruction_positions)):]
    # the model's preset (KL threshold, zeroed dimensions) as the pipeline applies it
    preset = PipelineConfig(model=args.model, kl_threshold=args.kl_threshold,
                            induce_threshold=-1e9 if args.model.startswith("tiny-") else 0.0)
    candidates = zero_dims(diff_of_means(
        mean_activations(cm, load_instructions("harmful", "train", n=args.n_train), positions),
        mean_activations(cm, load_instructions("harmless", "train", n=args.n_train), positions),
    ).float(), preset.dims_to_zero())
    harmful, harmless = load_instructions("harmful", "val", n=args.n_val), load_instructions("harmless", "val", n=args.n_val)
    config = preset.selection_config()

    start = time.perf_counter()
    library, _, _ = select_direction(cm, candidates, harmful, harmless, config, mode="lazy", progress=False)
    t_library = time.perf_counter() - start
    start = time.perf_counter()
    reference = straightforward(cm, candidates, harmful, harmless, config)
    t_reference = time.perf_counter() - start

    same = (library.position_index, library.layer) == (reference.position_index, reference.layer)
    print(f"machine: {machine(cm)}; {candidates.shape[0]} positions x {candidates.shape[1]} layers, "
          f"{args.n_val} validation prompts per kind")
    print(f"straightforward loop: {t_reference:8.1f} s -> position {reference.position}, layer {reference.layer}")
    print(f"library (lazy):       {t_library:8.1f} s -> position {library.position}, layer {library.layer}")
    print(f"selection speedup: {t_reference / t_library:.2f}x (target >= 4x), same choice: {same}")


if __name__ == "__main__":
    main()
