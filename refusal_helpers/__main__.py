"""Command line: ``python -m refusal_helpers run --model embedded``; ``sweep --run DIR --layers 10-23`` (see ``--help``)."""

from __future__ import annotations

import argparse
import sys

from .data import HARMFUL_HUB_SETS, HARMLESS_HUB_SETS
from .pipeline import PipelineConfig


def _positive(value: str, alternative: str = "", minimum: int = 1) -> int:
    """A whole number >= `minimum` (1 unless `alternative` admits 0), or an error naming what was expected."""
    try:
        n = int(value)
    except ValueError:
        n = None
    if n is None or n < minimum:
        raise argparse.ArgumentTypeError(f"expected a positive whole number{' ' + alternative if alternative else ''}, got {value!r}")
    return n


def _n(value: str) -> int | None:
    return None if value == "all" else _positive(value, "or 'all'")


def _count(value: str) -> int:
    return _positive(value, "or 0", minimum=0)


def _layers(value: str) -> list[int]:
    """Layers as 'a-b' (inclusive) or 'a,b,c'."""
    try:
        if "-" in value:
            first, last = (int(x) for x in value.split("-"))
            layers = list(range(first, last + 1))
        else:
            layers = [int(x) for x in value.split(",")]
    except ValueError:
        layers = []
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected layers as 'first-last' or 'a,b,c' (0 or more), got {value!r}")
    return layers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refusal_helpers",
                                     description="Refusal in language models is mediated by a single direction.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the paper's pipeline: extract, select, generate, evaluate, loss",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = PipelineConfig()
    run.add_argument("--model", default=d.model, help="'embedded', a hub name, a local folder or a .gguf file")
    run.add_argument("--out", default=argparse.SUPPRESS,
                     help="output folder (default: runs/<model alias>; runs/demo for the embedded model, whose "
                          "runs/embedded is the shipped run)")
    run.add_argument("--n-train", type=_n, default=d.n_train, help="instructions per kind for the means, or 'all'")
    run.add_argument("--n-val", type=_n, default=d.n_val, help="instructions per kind for selection, or 'all'")
    run.add_argument("--n-test", type=_n, default=d.n_test, help="test instructions per kind, or 'all'")
    run.add_argument("--max-new-tokens", type=_positive, default=d.max_new_tokens, help="greedy tokens per completion")
    run.add_argument("--batch-size", type=_positive, default=d.batch_size, help="prompts per forward pass")
    run.add_argument("--selection-mode", choices=("lazy", "exhaustive"), default=d.selection_mode,
                     help="lazy: stop at the first passing candidate; exhaustive: every score (full plots)")
    run.add_argument("--kl-threshold", type=float, default=argparse.SUPPRESS, help="default: model preset, else 0.1")
    run.add_argument("--induce-threshold", type=float, default=d.induce_threshold,
                     help="lowest refusal score that adding a candidate must induce")
    run.add_argument("--max-layer-fraction", type=float, default=d.max_layer_fraction,
                     help="candidates come from layers below this fraction of the depth")
    run.add_argument("--harmful", dest="harmful_source", default=d.harmful_source,
                     choices=("bundled", *HARMFUL_HUB_SETS), help="the bundled set or a hub dataset (needs network)")
    run.add_argument("--harmless", dest="harmless_source", default=d.harmless_source,
                     choices=("bundled", *HARMLESS_HUB_SETS), help="the bundled set or a hub dataset (needs network)")
    run.add_argument("--random-controls", type=_count, default=d.random_controls,
                     help="random unit directions ablated as a control for the CE increase (0: none)")
    run.add_argument("--zero-dims", type=_count, nargs="*", default=argparse.SUPPRESS, metavar="DIM",
                     help="residual dimensions to zero in every candidate and random control, e.g. a model's "
                          "massive-activation dimensions; not the paper's method; no DIM: none (default: model "
                          "preset, else none)")
    run.add_argument("--device", default=argparse.SUPPRESS,
                     help="e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    run.add_argument("--dtype", default=argparse.SUPPRESS, choices=("float32", "float16", "bfloat16"),
                     help="default: bfloat16 on a GPU (float16 where bfloat16 is unsupported), float32 on a CPU")

    sweep = sub.add_parser("sweep", help="CE cost and refusal removal of each candidate's ablation in a finished run",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sweep.add_argument("--run", help="a finished run folder, whose model is loaded (default: the shipped runs/embedded)")
    sweep.add_argument("--layers", type=_layers, required=True, help="'first-last' or 'a,b,c'; every position of each")
    sweep.add_argument("--n-completions", type=_positive, default=64,
                       help="non-refused harmless test completions of the run to measure CE on")
    sweep.add_argument("--n-harmful", type=_positive, default=32, help="harmful validation prompts to generate on")
    sweep.add_argument("--max-new-tokens", type=_positive, default=24, help="greedy tokens per harmful completion")
    sweep.add_argument("--generate-below", type=float, default=0.15,
                       help="generate only for candidates whose CE increase is at most this")
    sweep.add_argument("--json", help="also write the result to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        from .pipeline import Pipeline, default_out, format_summary

        options = {k: v for k, v in vars(args).items() if k != "command"}
        options.setdefault("out", default_out(args.model))
        try:
            summary = Pipeline(PipelineConfig(**options)).run()
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print()
        print(format_summary(summary))
        print(f"\nartifacts: {options['out']}")
    elif args.command == "sweep":
        return _sweep(args)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .models import load_model
    from .pipeline import SHIPPED_RUN, run_instructions
    from .sweep import format_sweep, sweep_run

    run = Path(args.run) if args.run else SHIPPED_RUN
    summary = run / "summary.json"
    if not summary.is_file():
        print(f"error: no summary.json in {run}: run the pipeline there to the end first.", file=sys.stderr)
        return 2
    try:
        cm = load_model(json.loads(summary.read_text())["model"])
        harmful = run_instructions("bundled", "harmful", "val", args.n_harmful)
        result = sweep_run(cm, run, args.layers, harmful, args.n_completions, args.max_new_tokens,
                           args.generate_below)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_sweep(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
