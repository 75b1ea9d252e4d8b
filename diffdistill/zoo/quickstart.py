"""The quickstart job: distill ``zoo:digits`` to one step on CPU, export it, and measure what it bought.

Three generators are judged on the same prompts and the same initial noise, each through a plain
diffusers pipeline:

* ``teacher`` -- the bundled teacher, 25 DDIM steps with classifier-free guidance;
* ``start``   -- the same teacher sampled in one step (what the student is initialized from);
* ``student`` -- the exported one-step pipeline, loaded with ``DiffusionPipeline.from_pretrained``.

Each gets digit-FID, prompt accuracy and per-digit accuracy from the digits judge
(:mod:`diffdistill.zoo.judge`) and a latency per image at batch 1. The run folder receives sample
grids (one column per digit), a loss-curve PNG and ``results.json``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from diffdistill.config import load_recipe
from diffdistill.data.digits import digit_prompt
from diffdistill.engine.checkpoint import latest_checkpoint
from diffdistill.engine.logging import save_grid
from diffdistill.export import export_run
from diffdistill.plots import labelled_grid, loss_figure
from diffdistill.run import train
from diffdistill.zoo import ZOO_RECIPES, digits_methods, zoo_path
from diffdistill.zoo.judge import judge_samples, load_judge
from diffdistill.zoo.quality import (
    TEACHER_STEPS,
    DigitsQuality,
    evaluation_prompts,
    generate_images,
    initial_noise,
    latent_shape,
    load_pipeline,
)


# The quickstart's default: DMD2 with its GAN term on real digits, the head on the frozen teacher's features
# (recipes/zoo/digits_dmd2_gan.yaml), the best digits recipe measured (README "Measured here").
QUICKSTART_METHOD = "dmd2_gan"

# What the default quickstart must reach (issue 14's floors): digit-FID at most 1.3x the teacher's 25-step
# value, prompt accuracy at least 95%, every digit covered.
QUICKSTART_FLOORS = {"fid_ratio": 1.3, "prompt_accuracy": 0.95, "digits_covered": 10}


def recipe_path(method: str) -> Path:
    path = ZOO_RECIPES / f"digits_{method}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no digits recipe for method {method!r} ({path}); available: {', '.join(digits_methods()) or 'none'}")
    return path


@torch.no_grad()
def latency_per_image(pipe, steps: int, guidance: float, repeats: int = 7) -> float:
    """Median seconds for one prompt at batch 1, end to end (text, backbone, decode), after a warm-up call."""
    times = []
    for i in range(repeats + 1):
        tic = time.perf_counter()
        pipe([digit_prompt(i % 10, i)], num_inference_steps=steps, guidance_scale=guidance, output_type="pt",
             generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - tic)
    return statistics.median(times[1:])


def save_loss_curve(metrics_file: Path, path: Path, keys=("loss_generator", "loss_critic")) -> Path | None:
    """The run's generator and critic losses against the step, a panel each (matplotlib)."""
    rows = [json.loads(line) for line in Path(metrics_file).read_text().splitlines() if line.strip()]
    return loss_figure(rows, path, keys)


def distill(method: str, run_dir: Path, overrides: list[str] | None = None):
    """Trains the method's digits recipe into ``run_dir`` (resuming if it holds a run); returns (its config,
    seconds, steps trained by this call: 0 when the run folder already held the finished run)."""
    cfg = load_recipe(recipe_path(method), [f"out={run_dir}", *(overrides or [])])
    start = finished_step(run_dir) if cfg.resume else 0
    tic = time.perf_counter()
    train(cfg, DigitsQuality.for_config(cfg) if cfg.eval_every else None)
    return cfg, time.perf_counter() - tic, max(cfg.max_steps - start, 0)


def finished_step(run_dir: Path) -> int:
    """The step of the run folder's latest checkpoint (0 without one): where training will resume."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return 0
    return int(json.loads((checkpoint / "state.json").read_text()).get("step", 0))


def training_record(out: Path, seconds: float, steps_this_run: int) -> dict:
    """What results.json says about training. A run reused whole trained nothing now: its time is the
    one an earlier quickstart measured (kept from results.json), never this call's few seconds."""
    if steps_this_run > 0:
        return {"train_seconds": seconds, "train_steps_this_run": steps_this_run, "train_reused": False}
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    return {"train_seconds": previous.get("train_seconds"), "train_steps_this_run": 0, "train_reused": True}


def training_summary(results: dict) -> str:
    """One sentence on training that is true whether the run was trained now, resumed, or reused."""
    steps, seconds = results["train_steps"], results["train_seconds"]
    if results.get("train_reused"):
        measured = f"trained earlier in {seconds:.0f} s" if seconds is not None else "its training time was not recorded"
        return f"reused the finished run in {results['run_dir']} ({steps} steps; {measured})"
    resumed = f" (resumed at step {steps - results['train_steps_this_run']})" if results["train_steps_this_run"] < steps else ""
    return f"trained {results['train_steps_this_run']} steps{resumed} in {seconds:.0f} s"


def judge_generator(pipe, steps: int, guidance: float, prompts: list[str], labels: list[int], latents: torch.Tensor, judge,
                    latency_repeats: int = 7) -> tuple[dict, torch.Tensor]:
    """One pipeline's judged metrics (and its images) on the given prompts and initial noise."""
    images = generate_images(pipe, prompts, latents, steps, guidance)
    metrics = {"steps": steps, "guidance": guidance, **judge_samples(judge, images, labels),
               "latency_s": latency_per_image(pipe, steps, guidance, latency_repeats)}
    return metrics, images


def evaluate(teacher_dir, student_dir, *, num_samples: int = 1000, guidance: float, seed: int = 0,
             latency_repeats: int = 7, grids_dir: Path | None = None) -> dict:
    """Judges teacher (25 steps, guided), start (teacher, 1 step) and student (exported, 1 step)."""
    judge = load_judge()
    teacher, student = load_pipeline(teacher_dir), load_pipeline(student_dir)
    prompts, labels = evaluation_prompts(num_samples)
    latents = initial_noise(num_samples, latent_shape(teacher), seed)
    runs = {"teacher": (teacher, TEACHER_STEPS, guidance), "start": (teacher, 1, guidance), "student": (student, 1, 1.0)}
    results, images = {}, {}
    for name, (pipe, steps, scale) in runs.items():
        results[name], images[name] = judge_generator(pipe, steps, scale, prompts, labels, latents, judge, latency_repeats)
        if grids_dir is not None:
            save_grid((images[name][:40] + 1) / 2, Path(grids_dir) / f"{name}.png", columns=10)
    if grids_dir is not None:  # teacher, start and student rows: the same noise and prompts (digits 0-9)
        labels = {name: f"{name}\n{steps} step{'s' if steps > 1 else ''}{' + CFG' if scale != 1 else ''}\n"
                        f"{1000 * results[name]['latency_s']:.0f} ms" for name, (_, steps, scale) in runs.items()}
        labelled_grid({labels[name]: (images[name][:10] + 1) / 2 for name in runs}, prompts[:10], Path(grids_dir) / "teacher_start_student.png")
    results["speedup"] = results["teacher"]["latency_s"] / results["student"]["latency_s"]
    results["judge_held_out_accuracy"] = judge.report.get("held_out_accuracy")
    return results


def floors_missed(results: dict, floors: dict = QUICKSTART_FLOORS) -> list[str]:
    """The quickstart floors the student misses, each as a line naming its value and the floor ([] when all are met)."""
    student, ratio = results["student"], results["student"]["digit_fid"] / results["teacher"]["digit_fid"]
    missed = []
    if ratio > floors["fid_ratio"]:
        missed.append(f"digit-FID {student['digit_fid']:.2f} is {ratio:.2f}x the teacher's (floor {floors['fid_ratio']}x)")
    if student["prompt_accuracy"] < floors["prompt_accuracy"]:
        missed.append(f"prompt accuracy {100 * student['prompt_accuracy']:.1f}% (floor {100 * floors['prompt_accuracy']:.0f}%)")
    if student["digits_covered"] < floors["digits_covered"]:
        missed.append(f"{student['digits_covered']}/10 digits covered (floor {floors['digits_covered']})")
    return missed


def floors_report(results: dict, floors: dict = QUICKSTART_FLOORS) -> str:
    """One line: the floors, and whether the student met them."""
    missed = floors_missed(results, floors)
    return (f"quickstart floors (digit-FID <= {floors['fid_ratio']}x the teacher's, prompt accuracy >= {100 * floors['prompt_accuracy']:.0f}%, "
            f"{floors['digits_covered']}/10 digits): " + ("met" if not missed else "missed: " + "; ".join(missed)))


def results_table(results: dict) -> str:
    lines = ["| generator | steps | digit-FID | prompt accuracy | digits covered | latency / image | speedup |", "|---|---|---|---|---|---|---|"]
    base = results["teacher"]["latency_s"]
    for name in ("teacher", "start", "student"):
        r = results[name]
        lines.append(f"| {name} | {r['steps']}{' + CFG' if r['guidance'] > 1 else ''} | {r['digit_fid']:.2f} | {100 * r['prompt_accuracy']:.1f}% | "
                     f"{r['digits_covered']}/10 | {1000 * r['latency_s']:.1f} ms | {base / r['latency_s']:.1f}x |")
    return "\n".join(lines)


def run_quickstart(method: str = QUICKSTART_METHOD, out="runs/quickstart", overrides: list[str] | None = None, num_samples: int = 1000,
                   latency_repeats: int = 7, teacher: str = "zoo:digits") -> dict:
    """Distill, export, evaluate; writes ``out/results.json``, grids and a loss curve, and returns the results."""
    out = Path(out)
    overrides = [f"teacher={teacher}", *(overrides or [])]
    teacher_dir = zoo_path(teacher.split(":", 1)[1]) if teacher.startswith("zoo:") else Path(teacher)
    tic = time.perf_counter()
    run_dir = out / "run"
    cfg, train_seconds, steps_this_run = distill(method, run_dir, overrides)
    export_dir = out / "student"
    export_run(run_dir, export_dir, "diffusers", overwrite=True)
    guidance = float(cfg.method.get("guidance", cfg.sample_guidance))
    results = evaluate(teacher_dir, export_dir, num_samples=num_samples, guidance=guidance, latency_repeats=latency_repeats, grids_dir=out)
    loss_curve = save_loss_curve(run_dir / "metrics.jsonl", out / "loss_curve.png")
    results.update(method=method, export_dir=str(export_dir), run_dir=str(run_dir), train_steps=cfg.max_steps,
                   **training_record(out, train_seconds, steps_this_run),
                   total_seconds=time.perf_counter() - tic, loss_curve=str(loss_curve) if loss_curve else None, teacher_guidance=guidance)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


__all__ = ["QUICKSTART_FLOORS", "QUICKSTART_METHOD", "evaluate", "evaluation_prompts", "floors_missed", "floors_report", "generate_images", "results_table", "run_quickstart", "save_loss_curve", "training_summary"]
