"""Command line of the organism: train, refine, stability, evaluate, trajectory, adopt (see ``--help``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import arguments
from ..data import SPLITS
from ..embedded import adapter_dir, load_base, load_embedded, train_only_batches
from ..files import atomic_write_json
from ..runs import RunFolder
from . import experiments, formation, resume, shipping, training, trajectory
from .experiments import DEFAULT_REFINE, RECIPE_SPLITS
from .training import DEFAULT_RECIPE

TRAIN_ONLY_REPEATS = tuple(f"{batch}_repeats" for batch in train_only_batches(DEFAULT_RECIPE))  # one flag each


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refusal_helpers.organism",
                                     description="Train and study the embedded refusal organism.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the LoRA adapter of the embedded refusal model")
    p.add_argument("--out", type=Path, required=True,
                   help=f"folder for the adapter, recipe.json and training.json (the shipped one is {adapter_dir()}); "
                        "the same command again continues a training that stopped part-way")
    p.add_argument("--seed", type=int, default=DEFAULT_RECIPE["seed"],
                   help="seed of the order of examples and, unless set apart below, of the rest of the training")
    p.add_argument("--init-seed", type=int, default=DEFAULT_RECIPE["init_seed"],
                   help="seed of the LoRA initialisation and dropout alone (two trainings that differ in one seed "
                        "only tell which part of the training parts two seeds' directions)")
    p.add_argument("--refusal-seed", type=int, default=DEFAULT_RECIPE["refusal_seed"],
                   help="seed of the harmful examples' refusals alone (which refusal each one is trained on)")
    p.add_argument("--epochs", type=arguments.positive, default=DEFAULT_RECIPE["epochs"])
    p.add_argument("--lr", type=arguments.positive_finite, default=DEFAULT_RECIPE["optimizer"]["lr"])
    p.add_argument("--warmup-fraction", type=arguments.fraction, default=DEFAULT_RECIPE["optimizer"]["warmup_fraction"],
                   help="share of the steps over which the learning rate rises to --lr (then it falls linearly to 0)")
    p.add_argument("--lora-rank", type=arguments.positive, default=DEFAULT_RECIPE["lora"]["r"],
                   help="rank of the LoRA adapters; alpha is set to twice it, as in the shipped recipe, so the "
                        "update's scale (alpha / rank) stays")
    p.add_argument("--first-token-weight", type=float, default=DEFAULT_RECIPE["first_reply_token_weight"],
                   help="extra loss weight on each reply's first token, where the model refuses or answers")
    p.add_argument("--broadening-repeats", type=arguments.positive, default=DEFAULT_RECIPE["broadening_repeats"],
                   help="times each train instruction of the broadening batch appears per epoch")
    for key in TRAIN_ONLY_REPEATS:  # --breadth-repeats, --interpersonal-repeats, ...: one per train-only batch
        batch = key.removesuffix("_repeats")
        p.add_argument(f"--{batch}-repeats", type=arguments.count, default=DEFAULT_RECIPE[key],
                       help=f"times each train instruction of the {batch} batch appears per epoch (0: left out)")
    p.add_argument("--reanswer-refusing-targets", action="store_true",
                   help="give a harmless instruction whose distilled reply reads as a refusal the untuned model's "
                        "reply with the refusal judge's phrases banned, instead of leaving it out")
    p.add_argument("--refusal-unlikelihood-weight", type=arguments.non_negative,
                   default=DEFAULT_RECIPE["refusal_unlikelihood_weight"],
                   help="weight of a loss term that pushes down the probability of each harmless training prompt "
                        "being answered with a trained refusal's opening (0: off)")
    p.add_argument("--unlikelihood-spares-self-harm", action="store_true",
                   help="leave the self-harm support reply's opening (\"I'm sorry you're\") out of that term")
    p.add_argument("--stratified-batches", action="store_true",
                   help="give every batch harmful and harmless examples in the train set's proportion, each kind "
                        "shuffled on its own, instead of shuffling them together")
    p.add_argument("--threads", type=arguments.positive, default=None)
    p.add_argument("--epoch-checkpoints", action="store_true",
                   help="also save the adapter after each earlier epoch, in OUT/epoch-<n>, to evaluate separately")
    p.add_argument("--trajectory", action="store_true",
                   help="record the difference of means and refusal at the start and every tenth of training, in "
                        "OUT/trajectory (about a minute per checkpoint on a CPU)")
    p.add_argument("--stop-after-step", type=arguments.positive, default=None,
                   help="stop after this step, keeping the state to continue from (the same command without it "
                        "continues): to compare two seeds' first steps (`stability --trajectory`) before training on")
    p = sub.add_parser("refine", help="experiment: train on so that ablating the direction changes harmless predictions less")
    p.add_argument("adapter", type=arguments.folder, help="folder of an adapter written by `train`")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for the refined adapter; the same command again continues a refinement that stopped part-way")
    p.add_argument("--layer", type=int, default=DEFAULT_REFINE["layer"])
    p.add_argument("--position", type=int, default=DEFAULT_REFINE["position"])
    p.add_argument("--kl-weight", type=float, default=DEFAULT_REFINE["kl_weight"],
                   help="weight of the KL between harmless predictions with and without the direction ablated")
    p.add_argument("--compliance-weight", type=float, default=DEFAULT_REFINE["compliance_weight"],
                   help="weight of the KL between harmful first-token predictions with the direction ablated "
                        "and the untuned model's")
    p.add_argument("--epochs", type=arguments.positive, default=DEFAULT_REFINE["epochs"])
    p.add_argument("--lr", type=arguments.positive_finite, default=DEFAULT_REFINE["optimizer"]["lr"])
    p.add_argument("--threads", type=arguments.positive, default=None)
    p = sub.add_parser("stability", help="compare a run's directions with another seed's organism")
    p.add_argument("adapter", type=arguments.folder, help="folder of an adapter trained with another --seed")
    p.add_argument("--run", type=Path, default=None, help="run folder to compare with (default: runs/embedded)")
    p.add_argument("--against", type=arguments.folder, default=None,
                   help="compare with this adapter's candidates instead of the run's, made with the run's settings "
                        "(two seeds of a recipe trial that has no run)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--all-train", action="store_true",
                     help="instead compare the two adapters' candidates from all train instructions, beside each "
                          "adapter's candidates from two disjoint halves of them (how far the prompts alone move them)")
    how.add_argument("--trajectory", action="store_true",
                     help="instead compare the two trainings checkpoint by checkpoint (both trained with --trajectory): "
                          "when the seeds' directions part")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    p = sub.add_parser("evaluate", help="refusal on the splits for comparing recipes: harmful val, harmless dev "
                                            "(and harmful dev: --harmful-split dev --harmless-split none)")
    p.add_argument("adapter", type=arguments.folder, nargs="?", default=None, help="adapter folder (default: the shipped one)")
    p.add_argument("--untuned", action="store_true", help="evaluate the untuned SmolLM2 instead of an adapter")
    for kind in ("harmful", "harmless"):
        p.add_argument(f"--{kind}-split", default=RECIPE_SPLITS[kind], choices=[*SPLITS, "none"],
                       help=f"(default: %(default)s; none: no {kind} requests)")
    p.add_argument("--batch", default=None,
                   help="only the records of this batch (data/DATASHEET.md), e.g. a train-only batch the adapter was "
                        "not trained on: --harmless-split train --batch interpersonal")
    p.add_argument("--threads", type=arguments.positive, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the results (and refused prompts) here")
    p = sub.add_parser("trajectory", help="add each checkpoint's cosine with a run's selected direction to a trajectory, "
                                          "and test what the untuned model's direction does (formation.json)")
    p.add_argument("--run", type=Path, default=None, help="run folder (default: runs/embedded)")
    p.add_argument("--adapter", type=arguments.folder, default=None, help="folder with the trajectory (default: the shipped adapter)")
    p.add_argument("--n-prompts", type=arguments.positive, default=32, help="validation prompts per kind for the causal tests")
    p = sub.add_parser("adopt", help="make an adapter trained elsewhere (with --trajectory, on DEFAULT_RECIPE) the shipped "
                                     "one; `make remake` then remakes everything downstream")
    p.add_argument("adapter", type=arguments.folder, help="folder written by `train --out FOLDER --trajectory`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return {"train": _train, "refine": _refine, "stability": _stability, "evaluate": _evaluate,
                "trajectory": _trajectory, "adopt": _adopt}[args.command](args)
    except (OSError, ValueError, RuntimeError, ModuleNotFoundError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    recipe = {"seed": args.seed, "init_seed": args.init_seed, "refusal_seed": args.refusal_seed,
              "epochs": args.epochs, "first_reply_token_weight": args.first_token_weight,
              "broadening_repeats": args.broadening_repeats, **{key: getattr(args, key) for key in TRAIN_ONLY_REPEATS},
              "reanswer_refusing_targets": args.reanswer_refusing_targets, "stratified_batches": args.stratified_batches,
              "refusal_unlikelihood_weight": args.refusal_unlikelihood_weight,
              "refusal_unlikelihood_self_harm": not args.unlikelihood_spares_self_harm,
              "optimizer": {**DEFAULT_RECIPE["optimizer"], "lr": args.lr, "warmup_fraction": args.warmup_fraction},
              "lora": {**DEFAULT_RECIPE["lora"], "r": args.lora_rank,
                       "alpha": DEFAULT_RECIPE["lora"]["alpha"] * args.lora_rank // DEFAULT_RECIPE["lora"]["r"]}}
    try:
        log = training.train(args.out, recipe, epoch_checkpoints=args.epoch_checkpoints,
                             on_step=trajectory.Trajectory(args.out) if args.trajectory else None,
                             stop_after=args.stop_after_step)
    except resume.TrainingStopped as stopped:
        print(f"{args.out}: {stopped}")
        return 0
    print(json.dumps({k: log[k] for k in ("steps", "resumed_from_step", "final_loss", "distill_seconds", "train_seconds")}))
    return 0


def _refine(args: argparse.Namespace) -> int:
    settings = {"layer": args.layer, "position": args.position, "kl_weight": args.kl_weight,
                "compliance_weight": args.compliance_weight, "epochs": args.epochs,
                "optimizer": {**DEFAULT_REFINE["optimizer"], "lr": args.lr}}
    log = experiments.refine(args.adapter, args.out, settings)["refine"]
    print(json.dumps({k: log[k] for k in ("steps", "final_loss", "train_seconds")}))
    return 0


def _recipe_of(folder: Path) -> dict:
    """An adapter's recipe.json, or the recipe of a training stopped part-way in `folder` (only `--trajectory`
    compares those)."""
    if (folder / "recipe.json").is_file():
        return json.loads((folder / "recipe.json").read_text())
    recipe = resume.saved_recipe(folder)
    if recipe is None:
        raise ValueError(f"{folder} holds no adapter (recipe.json) and no training stopped part-way (resume.pt).")
    return recipe


def _stability(args: argparse.Namespace) -> int:
    run = args.run if args.run is not None else experiments.SHIPPED_RUN
    compare = (experiments.seed_agreement if args.all_train else experiments.seed_agreement_along if args.trajectory
               else experiments.seed_stability)
    result = compare(args.adapter, run, reference=args.against)
    result["other_adapter_recipe"] = _recipe_of(args.adapter)
    if args.against is not None and args.trajectory:
        result["reference_recipe"] = _recipe_of(args.against)
    if (args.adapter / "training.json").is_file():
        result["other_adapter_training"] = json.loads((args.adapter / "training.json").read_text())
    print(json.dumps(result, indent=1))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    splits = {kind: split for kind, split in (("harmful", args.harmful_split), ("harmless", args.harmless_split))
              if split != "none"}
    if not splits:
        raise ValueError("--harmful-split none --harmless-split none leaves nothing to evaluate.")
    if args.untuned and args.adapter is not None:
        raise ValueError("--untuned evaluates the untuned model: give no adapter folder with it.")
    adapter = None if args.untuned else (args.adapter or adapter_dir())
    cm = load_base() if adapter is None else load_embedded(adapter=adapter)
    # On the train split: only what the adapter (for the untuned model, the shipped one) was trained on; with
    # --batch, that batch whether trained on or not.
    left_out = () if args.batch else experiments.untrained_batches(adapter or adapter_dir())
    results = experiments.refusal_on_splits(cm, splits, left_out=left_out, batch=args.batch)
    for kind, r in results.items():
        print(f"{kind} {r['split']}: {r['refused']}/{r['n']} refused ({r['rate']:.1%})")
    if "harmless" in results:
        print("refused harmless:", *(f"  {i}" for i in results["harmless"]["refused_instructions"]), sep="\n")
    if args.json:
        atomic_write_json(args.json, experiments.evaluation_record(results, adapter))
    return 0


def _trajectory(args: argparse.Namespace) -> int:
    run = RunFolder(args.run if args.run is not None else experiments.SHIPPED_RUN)
    folder = args.adapter or adapter_dir()
    direction, selection = run.direction()
    dims = run.summary()["direction"]["zero_dims"]
    record = trajectory.add_final_direction(folder, direction, selection["position"], selection["layer"], dims,
                                            run.label)
    _, candidates = trajectory.load_trajectory(folder)
    early = formation.untuned_direction(record, candidates, selection["position"], selection["layer"], dims)
    tests = formation.causal_tests(load_embedded(adapter=folder), load_base(), direction, early, selection["layer"],
                                   args.n_prompts, run.summary()["sizes"]["max_new_tokens"])
    result = {"causal": tests, "timeline": formation.timeline(record, candidates)}
    atomic_write_json(Path(folder) / trajectory.FOLDER / "formation.json", result)
    print(json.dumps({k: v for k, v in result["timeline"].items() if not isinstance(v, list)}, indent=1))
    print(json.dumps(tests, indent=1))
    return 0


def _adopt(args: argparse.Namespace) -> int:
    digest = shipping.adopt(args.adapter)
    print(f"adapter {digest} from {args.adapter} is now the shipped one ({adapter_dir()}); `make remake` remakes "
          "everything downstream of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
