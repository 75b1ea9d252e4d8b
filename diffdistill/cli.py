"""``diffdistill``: the command line. Parses arguments and calls the library; nothing else.

    diffdistill train RECIPE [key=value ...]   distill (or fine-tune) as a recipe says
    diffdistill tiny-sd OUT [--arch unet|dit|sd3]   write a tiny pipeline folder, offline
    diffdistill eval PIPELINE_DIR --benchmark ...   FID / KID / CLIP score on the papers' protocol
    diffdistill export RUN_DIR --to OUT        a diffusers folder / single file / LoRA of the student
    diffdistill quickstart                     the README's first command: a real run, on CPU, in minutes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


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
    """Until the bundled digits teacher lands: a short real training run on the tiny SD, on digits."""
    from diffdistill.config import load_recipe
    from diffdistill.engine.trainer import train

    recipe = RECIPES_DIR / "tiny" / "sft.yaml"
    cfg = load_recipe(recipe, [f"out={args.out}", f"max_steps={args.steps}", "resume=false"])
    run_dir = train(cfg)
    grids = sorted((run_dir / "samples").glob("*.png"))
    print(f"quickstart done: run folder {run_dir}; checkpoints in {run_dir / 'checkpoints'}")
    if grids:
        print(f"sample grid: {grids[-1]}")
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

    quick = verbs.add_parser("quickstart", help="a real run on CPU in minutes", description="Train on the bundled digits data on CPU, write checkpoints and a sample grid.")
    quick.add_argument("--out", default="runs/quickstart")
    quick.add_argument("--steps", type=int, default=60)
    quick.set_defaults(func=_quickstart)

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
