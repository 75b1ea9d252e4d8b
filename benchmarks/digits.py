"""The digits benchmark: every method's one-step student of ``zoo:digits``, judged on the same prompts.

    python benchmarks/digits.py --minutes 20 --json digits.json          # every recipes/zoo/digits_*.yaml
    python benchmarks/digits.py --methods dmd2 dmd2_gan --minutes 10 --out runs/digits-bench

Each method trains from its recipe (``recipes/zoo/digits_METHOD.yaml``) for a wall-clock budget
(``--minutes``; or ``--steps``), is exported as a diffusers folder and judged like the quickstart:
digit-FID, prompt accuracy, digits covered, latency per image at batch 1 and its speedup against
the teacher at 25 guided steps, and the backbone speedup per image at a throughput batch (64).
The teacher and the undistilled one-step start are judged once, on the same prompts and noise.
``--eval-only`` judges the runs already under ``--out`` again without training. Prints one markdown table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import diffdistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffdistill.zoo import digits_methods  # noqa: E402
from diffdistill.zoo.quickstart import TEACHER_STEPS  # noqa: E402


def backbone_seconds_per_image(pipe, steps: int, guidance: float, batch: int = 64, repeats: int = 5) -> float:
    """Median time spent inside the backbone's forward per image (all steps of a call), at ``batch`` prompts a call.

    At batch 1 on a CPU a small UNet's call is mostly fixed overhead, and a batched CFG pass costs
    far less than two single passes; a throughput batch measures what the passes themselves cost.
    """
    import statistics

    import torch

    total = {"t": 0.0}
    def start(module, args, kwargs):
        total["tic"] = time.perf_counter()
    def stop(module, args, output):
        total["t"] += time.perf_counter() - total["tic"]
    handles = [pipe.unet.register_forward_pre_hook(start, with_kwargs=True), pipe.unet.register_forward_hook(stop)]
    times = []
    try:
        for i in range(repeats + 1):
            total["t"] = 0.0
            with torch.inference_mode():
                pipe(["the number seven"] * batch, num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
                     generator=torch.Generator().manual_seed(i))
            times.append(total["t"])
    finally:
        for h in handles:
            h.remove()
    return statistics.median(times[1:]) / batch


def table(rows: list[dict]) -> str:
    lines = ["| generator | steps | train | digit-FID | prompt acc. | digits | latency / image | speedup | backbone speedup |",
             "|---|---|---|---|---|---|---|---|---|"]  # latency: batch 1; backbone speedup: batch 64
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | | {r['error']} | | | | | |")
            continue
        train = f"{r['train_steps']} st / {r['train_seconds'] / 60:.1f} min" if "train_steps" in r else ""
        lines.append(f"| {r['name']} | {r['steps']}{' + CFG' if r['guidance'] > 1 else ''} | {train} | {r['digit_fid']:.2f} | "
                     f"{100 * r['prompt_accuracy']:.1f}% | {r['digits_covered']}/10 | {1000 * r['latency_s']:.1f} ms | "
                     f"{r['speedup']:.1f}x | {r['backbone_speedup']:.1f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=None, help=f"default: all of {', '.join(digits_methods())}")
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget per method")
    parser.add_argument("--steps", type=int, default=None, help="a step budget instead of --minutes")
    parser.add_argument("--samples", type=int, default=1000, help="images per generator for the judge")
    parser.add_argument("--out", type=Path, default=Path("runs/digits-bench"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-only", action="store_true", help="judge the finished runs under --out again; train nothing")
    args = parser.parse_args(argv)
    methods = args.methods or digits_methods()
    unknown = [m for m in methods if m not in digits_methods()]
    if unknown:
        parser.error(f"no digits recipe for {unknown}; choose from {', '.join(digits_methods())}")

    from diffdistill.config import load_recipe
    from diffdistill.export import export_run
    from diffdistill.zoo import zoo_path
    from diffdistill.zoo.judge import load_judge
    from diffdistill.zoo.quickstart import (distill, evaluation_prompts, initial_noise, judge_generator, latent_shape, load_pipeline,
                                            recipe_path)

    judge = load_judge()
    teacher = load_pipeline(zoo_path("digits"))
    prompts, labels = evaluation_prompts(args.samples)
    latents = initial_noise(args.samples, latent_shape(teacher), args.seed)
    guidance = float(load_recipe(recipe_path("dmd2")).method["guidance"])
    rows = []
    for name, steps in (("teacher", TEACHER_STEPS), ("start", 1)):
        metrics, _ = judge_generator(teacher, steps, guidance, prompts, labels, latents, judge)
        rows.append({"name": name, **metrics, "backbone_s": backbone_seconds_per_image(teacher, steps, guidance)})
        print(f"{name}: digit-FID {metrics['digit_fid']:.2f}, prompt accuracy {100 * metrics['prompt_accuracy']:.1f}%", flush=True)
    budget = [f"max_steps={args.steps}"] if args.steps else ["max_steps=1000000", f"time_limit_minutes={args.minutes}"]
    for method in methods:
        run_dir = args.out / method / "run"
        try:
            if args.eval_only:
                seconds = last_logged_row(run_dir)["train_seconds"]
            else:
                _, seconds, _ = distill(method, run_dir, [*budget, f"seed={args.seed}", "checkpoint_every=1000000"])
            export_run(run_dir, args.out / method / "student", "diffusers", overwrite=True)
        except Exception as e:  # one method's failure (e.g. a student the exporter cannot write) is a row, not the end
            rows.append({"name": method, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            print(f"{method}: {rows[-1]['error']}", flush=True)
            continue
        student = load_pipeline(args.out / method / "student")
        metrics, _ = judge_generator(student, 1, 1.0, prompts, labels, latents, judge)
        rows.append({"name": method, **metrics, "train_seconds": seconds, "train_steps": last_logged_row(run_dir)["step"],
                     "backbone_s": backbone_seconds_per_image(student, 1, 1.0)})
        print(f"{method}: digit-FID {metrics['digit_fid']:.2f}, prompt accuracy {100 * metrics['prompt_accuracy']:.1f}%", flush=True)
    for r in rows:
        if "error" not in r:
            r["speedup"] = rows[0]["latency_s"] / r["latency_s"]
            r["backbone_speedup"] = rows[0]["backbone_s"] / r["backbone_s"]
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def last_logged_row(run_dir: Path) -> dict:
    """The run's last metrics row, with its step and training time (steps / it_per_s of an uninterrupted run)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") != "eval"]  # eval_every's rows carry no training speed
    row = rows[-1] if rows else {}
    step = int(row.get("step", 0))
    return {**row, "step": step, "train_seconds": step / row["it_per_s"] if row.get("it_per_s") else float("nan")}


if __name__ == "__main__":
    raise SystemExit(main())
