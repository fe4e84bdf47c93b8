"""Command line: ``python -m refusal_helpers run --model embedded`` (the paper's pipeline), ``sweep``, ``preset``,
``cache``; see ``--help`` of each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import arguments
from .agreement import compare_judges
from .data import HARMFUL_HUB_SETS, HARMLESS_HUB_SETS
from .embedded import cache_listing, cache_root, prune_cache
from .export import abliterate
from .files import atomic_write_json
from .jailbreak import attack_run
from .judges import judge_by_name
from .loading import embedded_adapter
from .pipeline import Pipeline, PipelineConfig, default_out
from .presets import derive_preset, save_preset
from .report import format_summary
from .runs import SHIPPED_RUN, RunFolder
from .search import search_run
from .sweep import format_sweep, sweep_run


def _add_run_options(run: argparse.ArgumentParser) -> None:
    d = PipelineConfig()
    run.add_argument("--model", default=d.model, help="'embedded' ('embedded:FOLDER': with FOLDER's adapter), a hub name, a "
                                                      "local folder or a .gguf file")
    run.add_argument("--out", default=argparse.SUPPRESS,
                     help="output folder (default: runs/<model alias>; runs/demo for the embedded model, whose "
                          "runs/embedded is the shipped run)")
    run.add_argument("--force", action="store_true", help="overwrite a folder that holds another model's run")
    run.add_argument("--n-train", type=arguments.n_or_all, default=d.n_train, help="instructions per kind for the means, or 'all'")
    run.add_argument("--n-val", type=arguments.n_or_all, default=d.n_val, help="instructions per kind for selection, or 'all'")
    run.add_argument("--n-test", type=arguments.n_or_all, default=d.n_test, help="test instructions per kind, or 'all'")
    for split in ("train", "val"):
        run.add_argument(f"--filter-{split}", action=argparse.BooleanOptionalAction, default=getattr(d, f"filter_{split}"),
                         help=f"keep only {split} prompts the model treats as their kind (baseline refusal score > 0 "
                              "for harmful, < 0 for harmless), as the paper does")
    run.add_argument("--max-new-tokens", type=arguments.positive, default=d.max_new_tokens, help="greedy tokens per completion")
    run.add_argument("--batch-size", type=arguments.positive, default=d.batch_size, help="prompts per forward pass")
    run.add_argument("--selection-mode", choices=("lazy", "exhaustive"), default=d.selection_mode,
                     help="lazy: stop at the first passing candidate; exhaustive: every score (full plots)")
    run.add_argument("--kl-threshold", type=arguments.finite, default=argparse.SUPPRESS, help="default: model preset, else 0.1")
    run.add_argument("--induce-threshold", type=arguments.finite, default=d.induce_threshold,
                     help="lowest refusal score that adding a candidate must induce")
    run.add_argument("--max-layer-fraction", type=arguments.finite, default=d.max_layer_fraction,
                     help="candidates come from layers < int(fraction * n_layers), as the paper prunes")
    run.add_argument("--harmful", dest="harmful_source", default=d.harmful_source,
                     choices=("bundled", *HARMFUL_HUB_SETS), help="the bundled set or a hub dataset (needs network)")
    run.add_argument("--harmless", dest="harmless_source", default=d.harmless_source,
                     choices=("bundled", *HARMLESS_HUB_SETS), help="the bundled set or a hub dataset (needs network)")
    run.add_argument("--random-controls", type=arguments.count, default=d.random_controls,
                     help="random unit directions ablated as a control for the CE increase (0: none)")
    run.add_argument("--judge", default=d.judge,
                     help="what reads the completions: substring (the paper's), logit (the refusal score under the "
                          "same intervention), or classifier:<model> (a LlamaGuard-class safety classifier)")
    run.add_argument("--zero-dims", type=arguments.count, nargs="*", default=argparse.SUPPRESS, metavar="DIM",
                     help="residual dimensions to zero in every candidate and random control, e.g. a model's "
                          "massive-activation dimensions; not the paper's method; no DIM: none (default: model "
                          "preset, else none)")
    run.add_argument("--device", default=argparse.SUPPRESS,
                     help="e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    run.add_argument("--dtype", default=argparse.SUPPRESS, choices=("float32", "float16", "bfloat16"),
                     help="default: bfloat16 on a GPU (float16 where bfloat16 is unsupported), float32 on a CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refusal_helpers",
                                     description="Refusal in language models is mediated by a single direction.")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter
    run = sub.add_parser("run", help="run the paper's pipeline: extract, select, generate, evaluate, loss",
                         formatter_class=defaults)
    _add_run_options(run)

    sweep = sub.add_parser("sweep", help="CE cost and refusal removal of each candidate's ablation in a finished run",
                           formatter_class=defaults)
    sweep.add_argument("--run", help="a finished run folder, whose model is loaded (default: the shipped runs/embedded)")
    sweep.add_argument("--layers", type=arguments.layers, required=True, help="'first-last' or 'a,b,c'; every position of each")
    sweep.add_argument("--n-completions", type=arguments.positive, default=64,
                       help="non-refused harmless test completions of the run to measure CE on")
    sweep.add_argument("--n-harmful", type=arguments.positive, default=32, help="harmful validation prompts to generate on")
    sweep.add_argument("--max-new-tokens", type=arguments.positive, default=24, help="greedy tokens per harmful completion")
    sweep.add_argument("--generate-below", type=arguments.finite, default=0.15,
                       help="generate only for candidates whose CE increase is at most this")
    sweep.add_argument("--json", help="also write the result to this file")

    preset = sub.add_parser("preset", help="derive the embedded model's pipeline preset on validation data and "
                                           "store it beside its adapter", formatter_class=defaults)
    preset.add_argument("--model", default="embedded", help="'embedded', or 'embedded:FOLDER' for the adapter in FOLDER "
                                                         "(stored in FOLDER's presets.json)")
    preset.add_argument("--out", help="folder for the exhaustive score table it needs (default: runs/preset for "
                                      "'embedded', runs/preset-<FOLDER's name> for 'embedded:FOLDER', '-plain' added "
                                      "with --plain)")
    preset.add_argument("--max-refused", type=arguments.finite, default=0.05,
                        help="the largest fraction of harmful validation prompts the ablated direction may leave refused")
    preset.add_argument("--max-ce-increase", type=arguments.finite, default=0.1,
                        help="the largest rise (nats/token) in CE of harmless validation completions that ablating "
                             "the direction may cause")
    preset.add_argument("--no-save", action="store_true", help="print the preset without writing presets.json")
    preset.add_argument("--plain", action="store_true",
                        help="derive only the KL threshold for the plain difference of means (no dimension zeroed), "
                             "by the refusal bound alone (no CE bound); never written to presets.json")
    preset.add_argument("--json", help="also write the derivation to this file")

    abl = sub.add_parser("abliterate", help="fold a finished run's direction into its model's weights and save the "
                                            "model, with a model card of what the edit did", formatter_class=defaults)
    abl.add_argument("--run", required=True, help="a finished run folder")
    abl.add_argument("--out", required=True, help="a new folder for the exported Hugging Face model")
    abl.add_argument("--n-test", type=arguments.n_or_all, default=None, help="test prompts per kind to measure on (default: the run's)")
    abl.add_argument("--judge", default="substring", help="substring, logit or classifier:<model>")

    srch = sub.add_parser("search", help="search per-layer ablation weights and directions with Optuna (refusals "
                                         "vs KL), then compare the best with the run's direction", formatter_class=defaults)
    srch.add_argument("--run", default=str(SHIPPED_RUN), help="a finished run folder")
    srch.add_argument("--out", default="runs/search", help="folder for search.json and pareto.html")
    srch.add_argument("--trials", type=arguments.positive, default=100, help="Optuna trials (at most)")
    srch.add_argument("--timeout", type=arguments.finite, default=720.0, help="seconds for the trials (at most)")
    srch.add_argument("--n-val", type=arguments.positive, default=32, help="validation prompts per kind")
    srch.add_argument("--seed", type=int, default=0)
    srch.add_argument("--judge", default="substring", help="substring, logit or classifier:<model>")

    jb = sub.add_parser("jailbreak", help="find an adversarial suffix with GCG (nanogcg) and measure how it suppresses "
                                          "the direction", formatter_class=defaults)
    jb.add_argument("--run", default=str(SHIPPED_RUN), help="a finished run folder")
    jb.add_argument("--out", default="data/organism/jailbreak", help="folder for suffix.json and analysis.json")
    jb.add_argument("--prompts", type=arguments.positive, default=3, help="refused training prompts to optimise on, in turn")
    jb.add_argument("--steps", type=arguments.positive, default=60, help="GCG steps per prompt")
    jb.add_argument("--search-width", type=arguments.positive, default=64)
    jb.add_argument("--topk", type=arguments.positive, default=64)
    jb.add_argument("--tokens", type=arguments.positive, default=20, help="suffix length in tokens")
    jb.add_argument("--seed", type=int, default=0)
    jb.add_argument("--reuse-suffix", action="store_true", help="measure the suffix already in --out")

    agree = sub.add_parser("judge", help="judge a finished run's completions again with another judge and count "
                                          "where the two disagree", formatter_class=defaults)
    agree.add_argument("--run", default=str(SHIPPED_RUN), help="a finished run folder")
    agree.add_argument("--judge", default="logit", help="the second judge: logit or classifier:<model>")
    agree.add_argument("--json", help="also write the result to this file")

    cache = sub.add_parser("cache", help="list (or delete) the merged models cached by load_model('embedded')")
    action = cache.add_mutually_exclusive_group()
    action.add_argument("--prune", action="store_true", help="delete all but the committed adapter's current merge")
    action.add_argument("--clear", action="store_true", help="delete every cached merged model")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"run": _run, "sweep": _sweep, "preset": _preset, "abliterate": _abliterate, "search": _search,
               "jailbreak": _jailbreak, "judge": _judge, "cache": _cache}[args.command]
    try:
        return command(args)
    except (OSError, ValueError, RuntimeError, ModuleNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished artifacts are kept; run the same command again to resume.", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k != "command"}
    options.setdefault("out", default_out(args.model))
    summary = Pipeline(PipelineConfig(**options)).run()
    print()
    print(format_summary(summary))
    print(f"\nartifacts: {options['out']}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    run = RunFolder(args.run if args.run else SHIPPED_RUN)
    run.summary()  # finished and intact
    cm = run.load_model()
    result = sweep_run(cm, run, args.layers, args.n_harmful, args.n_completions, args.max_new_tokens, args.generate_below)
    print(format_sweep(result))
    if args.json:
        atomic_write_json(Path(args.json), result)
    return 0


def _preset(args: argparse.Namespace) -> int:
    derived = derive_preset(args.out, max_refused=args.max_refused, max_ce_increase=args.max_ce_increase,
                            plain=args.plain, model=args.model)
    print(json.dumps(derived, indent=1))
    if args.json:
        atomic_write_json(Path(args.json), derived)
    if derived["settings"] is None:
        print(f"error: {derived['derived']['failure']}", file=sys.stderr)
        return 2
    if not (args.no_save or args.plain):
        print(f"wrote {save_preset(derived, embedded_adapter(args.model)[1])}")
    return 0


def _abliterate(args: argparse.Namespace) -> int:
    evidence = abliterate(args.run, args.out, n_test=args.n_test, judge=judge_by_name(args.judge))
    refused = evidence["refused"]
    for kind in ("harmful", "harmless"):
        before, after = refused[f"{kind}_before"], refused[f"{kind}_after"]
        print(f"{kind} refused: {before['refused']}/{before['n']} -> {after['refused']}/{after['n']}")
    print(f"KL on harmless prompts {evidence['kl_harmless']:.4f}; CE {evidence['ce_harmless']['before']:.4f} -> "
          f"{evidence['ce_harmless']['after']:.4f}")
    print(f"reloaded folder vs hook ablation: max |logit difference| "
          f"{evidence['reload_check']['max_abs_logit_difference']:.2e}")
    print(f"saved to {args.out} (model card: {Path(args.out) / 'README.md'})")
    return 0


def _search(args: argparse.Namespace) -> int:
    result = search_run(args.run, args.out, args.trials, args.timeout, judge_by_name(args.judge), args.n_val, args.seed)
    paper, found = result["test"]["paper"], result["test"]["search"]
    print(f"{result['n_trials']} trials in {result['seconds']:.0f} s; Pareto front: {len(result['pareto'])} trials "
          f"(plot: {Path(args.out) / 'pareto.html'})")
    print(f"on {paper['n']} harmful and the harmless test prompts of {result['run']}:")
    print(f"  the run's direction: {paper['refused']}/{paper['n']} refused, KL {paper['kl']:.4f}")
    print(f"  the search's best at equal or lower validation KL (trial {result['chosen']['number']}): "
          f"{found['refused']}/{found['n']} refused, KL {found['kl']:.4f}")
    return 0


def _jailbreak(args: argparse.Namespace) -> int:
    result = attack_run(RunFolder(args.run), Path(args.out), args.prompts, args.steps, args.search_width, args.topk,
                        args.tokens, args.seed, reuse_suffix=args.reuse_suffix)
    n = result["n_test"]
    print(f"suffix: {result['suffix']!r}")
    print(f"held-out harmful test prompts refused: {result['refused']['none']}/{n} without a suffix, "
          f"{result['refused']['adversarial']}/{n} with it, {result['refused']['random']}/{n} with a random one")
    print(f"kept in {args.out}/suffix.json and analysis.json")
    return 0


def _judge(args: argparse.Namespace) -> int:
    result = compare_judges(RunFolder(args.run), judge_by_name(args.judge))
    for condition, c in result["conditions"].items():
        print(f"{condition:<26} {c['first_judge']} and {result['second_judge']} agree on {c['agree']}/{c['n']}: {c['pairs']}")
    print(f"all conditions: {result['agree']}/{result['n']} agree")
    if args.json:
        atomic_write_json(Path(args.json), result)
    return 0


def _cache(args: argparse.Namespace) -> int:
    if args.prune or args.clear:
        removed = prune_cache(keep_current=args.prune)
        print(f"Deleted {len(removed)} cached model(s), {sum(size for _, size in removed) / 1e9:.2f} GB, from {cache_root()}.")
    else:
        print(cache_listing())
    return 0


if __name__ == "__main__":
    sys.exit(main())
