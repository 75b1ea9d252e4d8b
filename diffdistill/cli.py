"""``diffdistill``: the command line. Parses arguments and calls the library; nothing else.

    diffdistill train RECIPE [key=value ...]   distill (or fine-tune) as a recipe says
    diffdistill encode-latents RECIPE --to DIR  the recipe's images through its teacher's VAE once, as latent shards
    diffdistill tiny-sd OUT [--arch unet|dit|sd3|sd35|sdxl|flux|sana]   write a tiny pipeline folder, offline
    diffdistill eval PIPELINE_DIR --benchmark ...   FID / KID / CLIP score on the papers' protocol
    diffdistill export RUN_DIR --to OUT        a diffusers folder / single file / LoRA of the student
    diffdistill quickstart [--method dmd2_gan]      the README's first command: distill the bundled digits teacher on CPU
    diffdistill zoo train-digits               rebuild the bundled digits teacher and its judge from a seed
    diffdistill plan RECIPE [key=value ...] --gpus N --gpu-memory 80GB   predict per-GPU memory from config files
"""

from __future__ import annotations

# Each verb imports what it runs inside its own function, on purpose: the library pulls in torch and
# diffusers (seconds), and `diffdistill --help` or a typo in a verb should answer at once.
import argparse
import json
import sys
import traceback
from pathlib import Path

from diffdistill.eval.arguments import add_eval_arguments  # light: argparse only


def _train(args) -> int:
    from diffdistill.config import load_recipe  # lazy: see the note at the top
    from diffdistill.quality import evaluator_for  # lazy: see the note at the top
    from diffdistill.run import train  # lazy: see the note at the top

    cfg = load_recipe(args.recipe, args.overrides)
    run_dir = train(cfg, evaluator_for(cfg))
    print(f"run folder: {run_dir}")
    return 0


def _encode_latents(args) -> int:
    from diffdistill.config import load_recipe  # lazy: see the note at the top
    from diffdistill.data.sources import encode_dataset  # lazy: see the note at the top
    from diffdistill.teachers import resolve_teacher  # lazy: see the note at the top

    cfg = load_recipe(args.recipe, args.overrides)
    teacher = resolve_teacher(cfg.teacher, config=cfg.teacher_config, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code,
                              seed=cfg.seed)
    out = encode_dataset(cfg, teacher, args.to, args.shard_size)
    print(f"wrote latent shards to {out}; train on them with data.source=latents data.path={out}")
    return 0


def _tiny_sd(args) -> int:
    from diffdistill.backbones.tiny import write_tiny_pipeline  # lazy: see the note at the top

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"error: {out} exists and is not empty; pass --overwrite to replace it")
    write_tiny_pipeline(out, args.arch, args.seed)
    print(f"wrote a tiny {args.arch} pipeline to {out}; load it with DiffusionPipeline.from_pretrained({str(out)!r})")
    if args.arch == "flux":  # FluxPipeline's default is 128 x 128 latents (FLUX.1's 1024 px)
        print("Flux has no sample_size: train this one at its tiny size with data.resolution=16, and sample it with height=16 width=16")
    return 0


def _quickstart(args) -> int:
    from diffdistill.zoo.quickstart import floors_report, results_table, run_quickstart, training_summary  # lazy: see the note at the top

    overrides = list(args.overrides) + ([f"max_steps={args.steps}"] if args.steps else [])
    results = run_quickstart(args.method, args.out, overrides, num_samples=args.samples, latency_repeats=args.latency_repeats)
    print()
    print(results_table(results))
    print(f"\n{args.method} student: one step, {results['speedup']:.1f}x faster than the 25-step guided teacher per image; "
          f"{training_summary(results)}")
    print(f"exported diffusers pipeline: {results['export_dir']}  (DiffusionPipeline.from_pretrained(...)(\"the number seven\", num_inference_steps=1))")
    print(f"grids, loss curve and results.json in {args.out}")
    print(floors_report(results))
    return 0


def _zoo(args) -> int:
    from diffdistill.zoo import ZOO_ROOT  # lazy: see the note at the top
    from diffdistill.zoo.digits import train_digits_teacher  # lazy: see the note at the top
    from diffdistill.zoo.judge import JUDGE_FILE, save_judge, train_judge  # lazy: see the note at the top

    out = Path(args.out) if args.out else ZOO_ROOT / "digits"
    report = train_digits_teacher(out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps, vae_from=args.vae_from)
    print(f"wrote the digits teacher to {out}: {report}")
    if not args.skip_judge:
        judge, judge_report = train_judge(seed=args.seed)
        path = save_judge(judge, judge_report, Path(args.judge_out) if args.judge_out else JUDGE_FILE)
        print(f"wrote the digits judge to {path}: held-out accuracy {100 * judge_report['held_out_accuracy']:.1f}%")
    return 0


def _eval(args) -> int:
    from diffdistill.eval.run import run_eval  # lazy: see the note at the top

    return run_eval(args)


FORMAT_CHOICES = ("diffusers", "single-file", "lora", "original")  # diffdistill.export.FORMATS, without importing it (see the note at the top)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `diffdistill train` run folder (its out=)")
    parser.add_argument("--to", dest="out", required=True, metavar="OUT", help="folder to write (a .safetensors path for --format single-file)")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="diffusers",
                        help="diffusers: a pipeline folder (default); single-file: one .safetensors with metadata; lora: adapters for the "
                             "teacher; original: one .safetensors in the reference layout for ComfyUI/A1111 (SD1.5/2.x, SDXL: UNet, VAE, text "
                             "encoders; SD3/SD3.5, Flux: the transformer alone)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps the export is checked and documented for (default: all training timesteps)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="use the EMA weights (default: if the run kept them)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of the SVD extraction (--format lora)")
    parser.add_argument("--lora-layout", choices=("diffusers", "kohya"), default="diffusers",
                        help="--format lora keys: diffusers/peft (default), or kohya's, which ComfyUI and A1111/Forge read (UNet teachers)")
    parser.add_argument("--teacher", default=None, metavar="PATH", help="the teacher pipeline, if it moved since training")
    parser.add_argument("--checkpoint", default="latest", metavar="WHICH",
                        help="latest (default), best (the best in-training quality of a run with eval_every), or a step number")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new export is complete)")
    parser.add_argument("--scheduler", default=None, metavar="NAME",
                        help="the diffusers folder's scheduler, checked: the export writes the one that reproduces the student (VP: lcm, "
                             "phased: euler; flow-matching: flow-match-euler) and refuses any other, above all one of the other noise family")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")


def _summary(info: dict) -> str:
    lines = [f"wrote {info['format']} export of {info['checkpoint']} ({'EMA' if info['ema'] else 'raw'} weights) to {info['out']}"]
    if "max_abs_diff_vs_sampler" in info:
        lines.append(f"checked: {info['steps']}-step pipeline output vs diffdistill's sampler, max |diff| = {info['max_abs_diff_vs_sampler']:.2e}")
    if info["format"] == "lora":
        lines.append(f"LoRA rank {info['rank']} ({info['source']}), {info['layers']} layers: relative Frobenius error mean "
                     f"{info['mean_relative_frobenius']:.3g}, max {info['max_relative_frobenius']:.3g}; max |output diff| "
                     f"{info['max_abs_output_diff']:.3g} (teacher vs student {info['max_abs_output_diff_teacher']:.3g}); "
                     f"{len(info['unrepresented'])} parameters without a LoRA form")
    if info["format"] == "original":
        sampling = info["sampling"]
        if info["contents"] == "transformer":
            lines.append("the transformer alone: in ComfyUI, models/diffusion_models and \"Load Diffusion Model\", with the teacher's "
                         "text encoders and VAE loaded beside it")
        guidance = f", Flux guidance {sampling['guidance']}" if "guidance" in sampling else ""
        lines.append(f"sample it with {sampling['steps']} step(s) at timesteps {sampling['timesteps']}, CFG 1 (guidance is baked in{guidance}): "
                     "in ComfyUI the LCM sampler with the sgm_uniform scheduler")
    return "\n".join(lines)


def _export(args) -> int:
    from diffdistill.export import export_run  # lazy: see the note at the top

    info = export_run(args.run_dir, args.out, args.format, args.steps, args.ema, args.overwrite, args.rank, args.teacher, args.lora_layout,
                      args.checkpoint, args.scheduler)
    print(json.dumps(info, indent=2, default=str) if args.json else _summary(info))
    return 0


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/sd15/dmd2.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe key, e.g. teacher=/path/to/pipeline-folder")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs the run uses (FSDP shards over them)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB or 24GB (read as GiB)")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch per GPU (default: batch_size / (gpus x grad_accum))")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: data.resolution, else the backbone's)")
    parser.add_argument("--lora-rank", type=int, default=64, help="rank of the LoRA tiers (default 64, or the recipe's critic_lora_rank)")
    parser.add_argument("--replicate-teacher", action="store_true", help="under FSDP keep a whole teacher on every GPU")


def _plan(args) -> int:
    from diffdistill.plan import run_plan  # lazy: see the note at the top

    return run_plan(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffdistill", description="Distill many-step diffusion models into one- and few-step generators.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('diffdistill').__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (also: DIFFDISTILL_DEBUG=1)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser("train", help="train as a recipe says", description="Train (distill) as a YAML recipe says; key=value pairs override recipe keys (dotted for sections, e.g. optim.lr=1e-5).")
    train.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/sft.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe key, e.g. out=runs/x max_steps=20")
    train.set_defaults(func=_train)

    enc = verbs.add_parser("encode-latents", help="encode a recipe's images with its teacher's VAE once, as latent shards",
                           description="Run the teacher's VAE once over the recipe's image data (data.source digits, imagefolder, webdataset "
                                       "or hf_dataset) and write latent shards that training reads with data.source=latents data.path=DIR.")
    enc.add_argument("recipe", help="recipe YAML whose teacher and data to use")
    enc.add_argument("overrides", nargs="*", metavar="key=value", help="override a recipe key, e.g. data.path=/data/images")
    enc.add_argument("--to", required=True, help="new folder for the shards and their index.json")
    enc.add_argument("--shard-size", type=int, default=1024, help="latents per shard file")
    enc.set_defaults(func=_encode_latents)

    tiny = verbs.add_parser("tiny-sd", help="write a tiny pipeline folder, offline", description="Write a tiny randomly initialized diffusers pipeline (backbone, VAE, text encoder, tokenizer, scheduler) that plain DiffusionPipeline.from_pretrained loads. For tests and demos.")
    tiny.add_argument("out", help="folder to write")
    tiny.add_argument("--arch", choices=("unet", "dit", "sd3", "sd35", "sdxl", "flux", "sana"), default="unet",
                      help="unet: SD-style UNet; dit: class-conditional DiT; sd3: MMDiT rectified flow; sd35: SD3.5's MMDiT (qk norms, dual "
                           "attention); sdxl: SDXL-style UNet, two text encoders; flux: guidance-distilled Flux (FLUX.1-dev-shaped); "
                           "sana: Sana with a Gemma 2 text encoder")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    tiny.set_defaults(func=_tiny_sd)

    quick = verbs.add_parser("quickstart", help="distill the bundled digits teacher to one step on CPU, export and evaluate it",
                             description="Distill zoo:digits (a small text-to-image model trained on real handwritten digits) to one step "
                                         "on CPU, export a one-step diffusers pipeline, and judge teacher (25 steps + CFG), undistilled start "
                                         "(1 step) and student (1 step) on the same prompts: digit-FID, prompt accuracy, latency, speedup.")
    quick.add_argument("--method", default="dmd2_gan",  # zoo.quickstart.QUICKSTART_METHOD (not imported: see the note at the top)
                       help="a recipe recipes/zoo/digits_METHOD.yaml (default dmd2_gan: DMD2 with its GAN term on real digits)")
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

    ev = verbs.add_parser("eval", help="FID / KID / CLIP score of a pipeline", description="Generate with any diffusers pipeline folder and score it on the COCO protocol the papers use.")
    add_eval_arguments(ev)
    ev.set_defaults(func=_eval)
    ex = verbs.add_parser("export", help="write a run's student as a diffusers folder, single file or LoRA", description="Export a checkpoint of a run (the latest, the best, or a step): a diffusers pipeline folder that plain DiffusionPipeline.from_pretrained samples in K steps, one .safetensors, or a LoRA for the teacher.")
    _export_arguments(ex)
    ex.set_defaults(func=_export)
    pl = verbs.add_parser("plan", help="predict per-GPU training memory of a recipe from config files (no weights, no GPU)",
                          description="A prediction, not a measurement: builds the teacher's backbone, VAE and text encoders from their "
                                      "config.json on the meta device, measures activations there, and prints a Markdown table of "
                                      "per-GPU GiB by component for a ladder of memory tiers, the cheapest that fits marked.")
    _plan_arguments(pl)
    pl.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # first: --help and usage errors answer before torch loads
    from diffdistill.cli_errors import (  # lazy: see the note at the top
        EXIT_ERROR,
        EXIT_INTERRUPTED,
        Interrupted,
        debug_requested,
        expected_errors,
        one_line,
    )
    from diffdistill.engine import trainer  # lazy: see the note at the top

    debug = debug_requested(args.debug)
    try:
        return args.func(args)
    except trainer.TrainingInterrupted as e:  # SIGINT / SIGTERM in training: a checkpoint was written; 130 / 143
        print(e, file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        _traceback_if(debug)
        print("interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        raise Interrupted(EXIT_INTERRUPTED) from None
    except trainer.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except expected_errors() as e:
        _traceback_if(debug)
        print(one_line(e), file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        _traceback_if(debug)
        print(one_line(e), file=sys.stderr)
        e.code = EXIT_ERROR  # re-raised, so callers that catch SystemExit still see its message; the shell sees 2
        raise


def _traceback_if(debug: bool) -> None:
    if debug:
        traceback.print_exc()


if __name__ == "__main__":
    raise SystemExit(main())
