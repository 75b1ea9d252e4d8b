"""``diffdistill export RUN_DIR --to OUT``: arguments and the call; the work is in :mod:`diffdistill.export`."""

from __future__ import annotations

import argparse
import json

FORMAT_CHOICES = ("diffusers", "single-file", "lora")  # kept in step with diffdistill.export.FORMATS (imported lazily)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a `diffdistill train` run folder (its out=)")
    parser.add_argument("--to", dest="out", required=True, metavar="OUT", help="folder to write (a .safetensors path for --format single-file)")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="diffusers",
                        help="diffusers: a pipeline folder (default); single-file: one .safetensors with metadata; lora: adapters for the teacher")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps the export is checked and documented for (default: all training timesteps)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None, help="use the EMA weights (default: if the run kept them)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of the SVD extraction (--format lora)")
    parser.add_argument("--teacher", default=None, metavar="PATH", help="the teacher pipeline, if it moved since training")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new export is complete)")
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
    return "\n".join(lines)


def run_export(args) -> int:
    from diffdistill.export import export_run

    info = export_run(args.run_dir, args.out, args.format, args.steps, args.ema, args.overwrite, args.rank, args.teacher)
    print(json.dumps(info, indent=2, default=str) if args.json else _summary(info))
    return 0
