"""Forward pass with ablation hooks at every layer vs a plain forward pass (target: <= 1.15x)."""

import torch
from common import interleaved, load, machine, parser, save

from refusal_helpers.data import load_instructions
from refusal_helpers.interventions import ablate


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    cm = load(args)
    inputs = cm.tokenize(load_instructions("harmless", "val", n=args.batch_size))
    direction = torch.randn(cm.d_model)

    @torch.inference_mode()
    def plain():
        cm.forward(inputs, logits_to_keep=1)

    @torch.inference_mode()
    def ablated():
        with ablate(cm, direction):
            cm.forward(inputs, logits_to_keep=1)

    t = interleaved(cm, {"plain": plain, "ablated": ablated}, args.repeats)
    print(f"machine: {machine(cm)}; batch {tuple(inputs['input_ids'].shape)}, {3 * cm.n_layers} hooks")
    print(f"plain forward:   {t['plain'] * 1000:8.1f} ms (median of {args.repeats})")
    print(f"ablated forward: {t['ablated'] * 1000:8.1f} ms")
    save(args, "hooks", {"model": cm.name, "machine": machine(cm), "batch": list(inputs["input_ids"].shape),
                         "hooks": 3 * cm.n_layers, "plain_ms": t["plain"] * 1000, "ablated_ms": t["ablated"] * 1000,
                         "ratio": t["ablated"] / t["plain"], "repeats": args.repeats})
    print(f"ablation forward overhead: {t['ablated'] / t['plain']:.3f}x (target <= 1.15x)")


if __name__ == "__main__":
    main()
