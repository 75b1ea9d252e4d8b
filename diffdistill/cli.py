"""``diffdistill``: the command line. Parses arguments and calls the library; nothing else.

    diffdistill train RECIPE [key=value ...]   distill (or fine-tune) as a recipe says
    diffdistill tiny-sd OUT [--arch unet|dit|sd3]   write a tiny pipeline folder, offline
    diffdistill eval PIPELINE_DIR --benchmark ...   FID / KID / CLIP score on the papers' protocol
    diffdistill export RUN_DIR --to OUT        a diffusers folder / single file / LoRA of the student
    diffdistill quickstart [--method dmd2]      the README's first command: distill the bundled digits teacher on CPU
    diffdistill zoo train-digits               rebuild the bundled digits teacher and its judge from a seed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _train(args) -> int:
    from diffdistill.config import load_recipe
    from diffdistill.engine.trainer import train

    cfg = load_recipe(args.recipe, args.overrides)
    run_dir = train(cfg)
    print(f"run folder: {run_dir}")
    return 0


def _tiny_sd(args) -> int:
    from diffdistill.backbones.tiny import write_tiny_pipeline

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {out} exists and is not empty; pass --overwrite to replace it")
    write_tiny_pipeline(out, args.arch, args.seed)
    print(f"wrote a tiny {args.arch} pipeline to {out}; load it with DiffusionPipeline.from_pretrained({str(out)!r})")
    return 0


def _quickstart(args) -> int:
    from diffdistill.zoo.quickstart import results_table, run_quickstart

    overrides = list(args.overrides) + ([f"max_steps={args.steps}"] if args.steps else [])
    results = run_quickstart(args.method, args.out, overrides, num_samples=args.samples, latency_repeats=args.latency_repeats)
    print()
    print(results_table(results))
    print(f"\n{args.method} student: one step, {results['speedup']:.1f}x faster than the 25-step guided teacher per image; "
          f"trained {results['train_steps']} steps in {results['train_seconds']:.0f} s")
    print(f"exported diffusers pipeline: {results['export_dir']}  (DiffusionPipeline.from_pretrained(...)(\"the number seven\", num_inference_steps=1))")
    print(f"grids, loss curve and results.json in {args.out}")
    return 0


def _zoo(args) -> int:
    from diffdistill.zoo import ZOO_ROOT
    from diffdistill.zoo.digits import train_digits_teacher
    from diffdistill.zoo.judge import JUDGE_FILE, save_judge, train_judge

    out = Path(args.out) if args.out else ZOO_ROOT / "digits"
    report = train_digits_teacher(out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps, vae_from=args.vae_from)
    print(f"wrote the digits teacher to {out}: {report}")
    if not args.skip_judge:
        judge, judge_report = train_judge(seed=args.seed)
        path = save_judge(judge, judge_report, Path(args.judge_out) if args.judge_out else JUDGE_FILE)
        print(f"wrote the digits judge to {path}: held-out accuracy {100 * judge_report['held_out_accuracy']:.1f}%")
    return 0


def _eval(args) -> int:
    from diffdistill.eval.run import run_eval

    return run_eval(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffdistill", description="Distill many-step diffusion models into one- and few-step generators.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('diffdistill').__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser("train", help="train as a recipe says", description="Train (distill) as a YAML recipe says; key=value pairs override recipe keys (dotted for sections, e.g. optim.lr=1e-5).")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/sft.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe key, e.g. out=runs/x max_steps=20")
    train.set_defaults(func=_train)

    tiny = verbs.add_parser("tiny-sd", help="write a tiny pipeline folder, offline", description="Write a tiny randomly initialized diffusers pipeline (backbone, VAE, text encoder, tokenizer, scheduler) that plain DiffusionPipeline.from_pretrained loads. For tests and demos.")
    tiny.add_argument("out", help="folder to write")
    tiny.add_argument("--arch", choices=("unet", "dit", "sd3"), default="unet", help="unet: SD-style UNet; dit: class-conditional DiT; sd3: MMDiT rectified flow")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    tiny.set_defaults(func=_tiny_sd)

    quick = verbs.add_parser("quickstart", help="distill the bundled digits teacher to one step on CPU, export and evaluate it",
                             description="Distill zoo:digits (a small text-to-image model trained on real handwritten digits) to one step "
                                         "on CPU, export a one-step diffusers pipeline, and judge teacher (25 steps + CFG), undistilled start "
                                         "(1 step) and student (1 step) on the same prompts: digit-FID, prompt accuracy, latency, speedup.")
    quick.add_argument("--method", default="dmd2", help="a method with a recipes/zoo/digits_METHOD.yaml (default dmd2)")
    quick.add_argument("--out", default="runs/quickstart", help="folder for the run, the export, grids and results.json")
    quick.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    quick.add_argument("--samples", type=int, default=1000, help="images per generator for the judge's metrics")
    quick.add_argument("--latency-repeats", type=int, default=7)
    quick.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe key, e.g. optim.lr=1e-4")
    quick.set_defaults(func=_quickstart)

    zoo = verbs.add_parser("zoo", help="rebuild a bundled teacher", description="Rebuild the teachers shipped in diffdistill/zoo from a seed.")
    zoo_verbs = zoo.add_subparsers(dest="zoo_verb", required=True, metavar="NAME")
    digits = zoo_verbs.add_parser("train-digits", help="train zoo:digits (VAE, then UNet by sft) and its judge",
                                  description="Train the bundled digits teacher (recipes/zoo/digits_teacher.yaml) and the digits judge from a seed.")
    digits.add_argument("--out", default=None, help="pipeline folder to write (default: the package's zoo/weights/digits)")
    digits.add_argument("--judge-out", default=None, help="judge .safetensors to write (default: the package's zoo/weights/digits_judge.safetensors)")
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument("--vae-steps", type=int, default=600)
    digits.add_argument("--unet-steps", type=int, default=None, help="default: the recipe's max_steps")
    digits.add_argument("--vae-from", default=None, metavar="DIR", help="reuse the trained VAE of a digits pipeline folder")
    digits.add_argument("--skip-judge", action="store_true")
    digits.set_defaults(func=_zoo)

    try:
        from diffdistill.eval.run import add_eval_arguments
    except ImportError:  # the evaluation harness is optional at import time
        add_eval_arguments = None
    if add_eval_arguments is not None:
        ev = verbs.add_parser("eval", help="FID / KID / CLIP score of a pipeline", description="Generate with any diffusers pipeline folder and score it on the COCO protocol the papers use.")
        add_eval_arguments(ev)
        ev.set_defaults(func=_eval)
    from diffdistill.export.cli import add_export_arguments, run_export
    ex = verbs.add_parser("export", help="write a run's student as a diffusers folder, single file or LoRA", description="Export the latest checkpoint of a run: a diffusers pipeline folder that plain DiffusionPipeline.from_pretrained samples in K steps, one .safetensors, or a LoRA for the teacher.")
    add_export_arguments(ex)
    ex.set_defaults(func=run_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffdistill.backbones.loading import CheckpointError
    from diffdistill.config import ConfigError
    from diffdistill.engine.trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
