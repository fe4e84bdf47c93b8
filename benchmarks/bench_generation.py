"""Greedy batched generation with ablation vs plain model.generate, tokens per second (target: >= 0.85x).

The library side also tokenises the prompts and decodes the completions, which the plain side does not:
the ratio is a lower bound on what the ablation hooks cost.
"""

import torch
from common import interleaved, load, machine, parser, save

from refusal_helpers.data import load_instructions
from refusal_helpers.generation import GREEDY, generate
from refusal_helpers.interventions import ablate


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(repeats=3)
    args = p.parse_args()
    cm = load(args)
    prompts = load_instructions("harmful", "val", n=args.batch_size)
    inputs = cm.tokenize(prompts)
    direction = torch.randn(cm.d_model)
    kwargs = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                  pad_token_id=cm.tokenizer.pad_token_id, **GREEDY)

    @torch.inference_mode()
    def plain():  # model.generate directly, no library code in the way
        cm.model.generate(**inputs, **kwargs)

    @torch.inference_mode()
    def ablated():  # the library path: generate() under ablation hooks at every layer
        with ablate(cm, direction):
            generate(cm, prompts, args.max_new_tokens, batch_size=args.batch_size,
                     min_new_tokens=args.max_new_tokens)

    t = interleaved(cm, {"plain": plain, "ablated": ablated}, args.repeats)
    tokens = args.batch_size * args.max_new_tokens
    print(f"machine: {machine(cm)}; batch {args.batch_size}, {args.max_new_tokens} new tokens each")
    print(f"plain generate:   {tokens / t['plain']:8.1f} tokens/s")
    print(f"ablated generate: {tokens / t['ablated']:8.1f} tokens/s")
    save(args, "generation", {"model": cm.name, "machine": machine(cm), "batch": args.batch_size,
                              "new_tokens": args.max_new_tokens, "plain_tokens_s": tokens / t["plain"],
                              "ablated_tokens_s": tokens / t["ablated"], "ratio": t["plain"] / t["ablated"]})
    print(f"ablated/plain generation throughput: {t['plain'] / t['ablated']:.3f}x (target >= 0.85x)")


if __name__ == "__main__":
    main()
