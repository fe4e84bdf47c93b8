"""Direction selection: the paper's own procedure vs the library (target: >= 4x, the same choice, scores that agree).

The paper's procedure is `refusal_helpers.reference`, its released code's definitions written plainly: for
every candidate in the allowed layers, three full forward passes over the padded validation prompts
(ablation on harmful, addition on harmless, ablation on harmless for KL), logits at every position although
only the last is used, and its epsilons inside the logs. The library (lazy mode) scores bypass for every
allowed candidate, then checks the filters in bypass order; its ablated passes run the prompts' shared prefix
(system prompt, user header) once per candidate and reuse its KV cache for every prompt, and keep logits at
the last position only; induce passes run only the layers above the candidate. Each side runs once (the
reference takes minutes), the library first; the scores both computed are compared, and the largest
differences printed.
"""

import time

import torch
from common import load, machine, parser, save

from refusal_helpers.activations import mean_activations
from refusal_helpers.data import load_instructions
from refusal_helpers.directions import ZERO_NORM, diff_of_means, zero_dims
from refusal_helpers.pipeline import PipelineConfig
from refusal_helpers.reference import paper_choice, paper_scores
from refusal_helpers.selection import allowed_layers, keep_consistent, select_direction


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
    train = load_instructions("harmful", "train", n=args.n_train), load_instructions("harmless", "train", n=args.n_train)
    if not args.model.startswith("tiny-"):
        train = keep_consistent(cm, *train)
    candidates = zero_dims(diff_of_means(mean_activations(cm, train[0], positions), mean_activations(cm, train[1], positions))
                           .float(), preset.dims_to_zero())
    harmful, harmless = load_instructions("harmful", "val", n=args.n_val), load_instructions("harmless", "val", n=args.n_val)
    if not args.model.startswith("tiny-"):  # the pipeline's (the paper's) filter; a random-weight model refuses nothing
        harmful, harmless = keep_consistent(cm, harmful, harmless)
    config = preset.selection_config()

    start = time.perf_counter()
    library, _, table = select_direction(cm, candidates, harmful, harmless, config, mode="lazy", progress=False)
    t_library = time.perf_counter() - start
    cells = [(p, layer) for p in range(candidates.shape[0]) for layer in range(allowed_layers(cm.n_layers, config.max_layer_fraction))
             if candidates[p, layer].norm() > ZERO_NORM]
    start = time.perf_counter()
    paper = paper_scores(cm, candidates, harmful, harmless, cells)
    t_reference = time.perf_counter() - start
    p_index, p_layer = paper_choice(paper, cm.n_layers, config.kl_threshold, config.induce_threshold)

    computed = {name: [(abs(float(getattr(table, name)[cell]) - s[name]), cell) for cell, s in paper.items()
                       if not torch.isnan(getattr(table, name)[cell])] for name in ("bypass", "induce", "kl")}
    same = (library.position_index, library.layer) == (p_index, p_layer)
    print(f"machine: {machine(cm)}; {candidates.shape[0]} positions x {candidates.shape[1]} layers, "
          f"{len(harmful)} + {len(harmless)} validation prompts")
    for name, diffs in computed.items():
        worst, cell = max(diffs)
        print(f"{name}: {len(diffs)} scores both computed, largest |library - paper| {worst:.2e} at {cell}")
    print(f"paper's procedure: {t_reference:8.1f} s -> position {positions[p_index]}, layer {p_layer}")
    print(f"library (lazy):    {t_library:8.1f} s -> position {library.position}, layer {library.layer}")
    save(args, "selection", {
        "model": cm.name, "machine": machine(cm), "positions": len(positions), "n_layers": cm.n_layers,
        "validation": {"harmful": len(harmful), "harmless": len(harmless)},
        "largest_difference": {name: max(diffs)[0] for name, diffs in computed.items()},
        "scores_compared": {name: len(diffs) for name, diffs in computed.items()},
        "paper_s": round(t_reference, 1), "library_s": round(t_library, 1), "speedup": t_reference / t_library,
        "paper_choice": [positions[p_index], p_layer], "library_choice": [library.position, library.layer], "same_choice": same})
    print(f"selection speedup: {t_reference / t_library:.2f}x (target >= 4x), same choice: {same}")


if __name__ == "__main__":
    main()
