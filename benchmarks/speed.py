"""Latency of a many-step guided teacher against its exported one-step student, in one run.

Both are plain diffusers pipelines called the way a user calls them, on the same prompts, device
and dtype. Each call is broken down by timing the pipeline's own pieces as it runs: prompt
encoding (``pipe.encode_prompt``, tokenizer included), every backbone forward (a CFG step is one
batched forward of two evaluations), and ``vae.decode``; "other" is the rest (scheduler, latents,
post-processing, Python). The student's *floor* is text encoding + one backbone pass + one decode
as measured in the same calls: what no one-step sampler can beat.

    python benchmarks/speed.py --teacher TEACHER_DIR --student EXPORTED_DIR             # 50 steps, CFG 7.5
    python benchmarks/speed.py --tiny --teacher-steps 50 --json speed.json             # tiny SD, built here
    python benchmarks/speed.py --tiny sd3 --teacher-steps 28 --batch 64                 # tiny SD3 (or flux), exported here

``--tiny`` writes the tiny SD pipeline (``diffdistill tiny-sd``) as teacher and, without
``--student``, a student of the same architecture (its zero guidance embedding and one-step
LCMScheduler; latency does not depend on the weights). ``--tiny sd3|flux`` writes that tiny
flow-matching pipeline, trains its one-step DMD2 student for two steps and exports it with
``diffdistill export``; the student is called exactly as its model card says (no CFG, the
student's sigma), the teacher as its pipeline's default (SD3: CFG, two evaluations a step;
Flux: its guidance embedding, one). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import diffdistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["a photograph of a cat", "a red car on a street", "a bowl of fruit", "a handwritten digit 7"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Breakdown:
    """Wraps a pipeline's encode_prompt, backbone forward and vae.decode with timers (seconds)."""

    def __init__(self, pipe, device: str):
        self.pipe, self.device = pipe, device
        self.backbone = getattr(pipe, "unet", None) or pipe.transformer
        self.reset()
        self._wrap(pipe, "encode_prompt", "text")
        self._wrap(pipe.vae, "decode", "decode")
        self.backbone.register_forward_pre_hook(self._start_backbone, with_kwargs=True)
        self.backbone.register_forward_hook(self._stop_backbone)

    def reset(self) -> None:
        self.times = {"text": 0.0, "backbone": 0.0, "decode": 0.0}
        self.calls, self.evaluations = 0, 0
        self._t0 = None

    def _wrap(self, owner, name: str, key: str) -> None:
        if not hasattr(owner, name):
            return
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            _sync(self.device)
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            _sync(self.device)
            self.times[key] += time.perf_counter() - t0
            return out

        setattr(owner, name, timed)  # an instance attribute shadows the method the pipeline calls

    def _start_backbone(self, module, args, kwargs):
        _sync(self.device)
        sample = args[0] if args else next(iter(kwargs.values()))
        self._batch = sample.shape[0]
        self._t0 = time.perf_counter()

    def _stop_backbone(self, module, args, output):
        _sync(self.device)
        self.times["backbone"] += time.perf_counter() - self._t0
        self.calls += 1
        self.evaluations += self._batch


def _call(pipe, prompts: list, steps: int, guidance: float, seed: int, extra: dict):
    generator = torch.Generator("cpu").manual_seed(seed)
    if type(pipe).__name__ == "DiTPipeline":  # class-conditional: "prompts" become class ids
        labels = [i % 10 for i in range(len(prompts))]
        return pipe(class_labels=labels, num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pt")
    kwargs = {"num_inference_steps": steps, "guidance_scale": guidance, **extra}
    return pipe(prompts, generator=generator, output_type="pt", **kwargs)


def timed_call(pipe, timer: Breakdown, prompts: list, steps: int, guidance: float, seed: int, device: str, extra: dict) -> dict:
    """One pipeline call: its wall time and the breakdown, all for the whole batch."""
    timer.reset()
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        _call(pipe, prompts, steps, guidance, seed, extra)
    _sync(device)
    return {"total": time.perf_counter() - t0, **timer.times, "calls": timer.calls, "evaluations": timer.evaluations // len(prompts)}


def summarize(runs: list, n: int, steps: int, guidance: float) -> dict:
    """Per-image numbers of the median call (by wall time), and the spread over calls."""
    median = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
    per_image = {k: median[k] / n for k in ("total", "text", "backbone", "decode")}
    per_image["other"] = per_image["total"] - per_image["text"] - per_image["backbone"] - per_image["decode"]
    per_image["backbone_per_call"] = median["backbone"] / max(median["calls"], 1) / n
    return {"steps": steps, "guidance": guidance, "calls": median["calls"], "evaluations": median["evaluations"],
            "per_image_s": per_image, "stdev_s": statistics.pstdev(r["total"] for r in runs) / n, "repeats": len(runs)}


def measure_pair(teacher, student, prompts: list, args, student_call: dict | None = None) -> dict:
    """Teacher and student calls alternate, so a busy machine slows both alike. ``student_call``: the
    student's call as its export says it (steps and guidance in it win; sizes apply to both)."""
    student_call = dict(student_call or {})
    student_steps = student_call.pop("num_inference_steps", args.student_steps)
    student_guidance = student_call.pop("guidance_scale", 1.0)
    shared = {k: v for k, v in student_call.items() if k != "sigmas"}  # sizes, text length
    calls = {"teacher": shared, "student": student_call}
    settings = {"teacher": (teacher, args.teacher_steps, args.teacher_guidance), "student": (student, student_steps, student_guidance)}
    timers = {name: Breakdown(pipe, args.device) for name, (pipe, _, _) in settings.items()}
    runs = {name: [] for name in settings}
    for i in range(args.warmup + args.repeats):
        for name, (pipe, steps, guidance) in settings.items():
            pipe.set_progress_bar_config(disable=True)
            run = timed_call(pipe, timers[name], prompts, steps, guidance, i, args.device, calls[name])
            if i >= args.warmup:
                runs[name].append(run)
    return {name: summarize(runs[name], len(prompts), steps, guidance) for name, (_, steps, guidance) in settings.items()}


def tiny_teacher(out: Path) -> Path:
    """Writes the tiny SD pipeline (as `diffdistill tiny-sd` does) and returns its folder."""
    from diffdistill.backbones.tiny import write_tiny_pipeline

    write_tiny_pipeline(out / "teacher", "unet", 0)
    return out / "teacher"


def tiny_flow_pair(arch: str, out: Path) -> tuple[Path, Path, dict]:
    """The tiny ``arch`` pipeline as a teacher folder, its one-step DMD2 student trained two steps and
    exported; returns (teacher folder, student folder, the student's call from its export)."""
    from diffdistill.backbones.tiny import write_tiny_pipeline
    from diffdistill.config import load_recipe
    from diffdistill.export import export_run
    from diffdistill.run import train

    teacher = write_tiny_pipeline(out / "teacher", arch, 0)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "dmd2.yaml"
    overrides = [f"teacher={teacher}", f"out={out / 'run'}", "data.source=prompts", f"data.prompts={PROMPTS}", "method.gan_weight=0", "method.timesteps=[1.0]",
                 "method.ratio=1", "max_steps=2", "batch_size=2"]
    info = export_run(train(load_recipe(recipe, overrides)), out / "student", steps=1)
    return teacher, out / "student", info["call"]


def student_like(teacher_dir: Path, device: str, dtype):
    """A one-step student pipeline of the teacher's architecture, as the diffusers export builds it."""
    from diffusers import DiffusionPipeline, LCMScheduler

    from diffdistill.export.diffusers_folder import TIMESTEP_SCALING, _rebuild, zero_guidance_embedding

    pipe = DiffusionPipeline.from_pretrained(teacher_dir)
    components = dict(pipe.components)
    if getattr(pipe, "unet", None) is not None:
        components["unet"] = zero_guidance_embedding(pipe.unet)
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    components["scheduler"] = LCMScheduler(**{k: pipe.scheduler.config[k] for k in keys if pipe.scheduler.config.get(k) is not None},
                                           original_inference_steps=1, timestep_scaling=TIMESTEP_SCALING, steps_offset=1,
                                           prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"))
    return _rebuild(pipe, components).to(device, dtype)


def load(path, device: str, dtype):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path, dtype=dtype).to(device)


def table(teacher: dict, student: dict, device: str) -> str:
    ms = lambda s: f"{1000 * s:.2f}"  # noqa: E731
    rows = ["| pipeline | steps | backbone evals | latency / image (ms) | text (ms) | backbone (ms) | VAE decode (ms) | other (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("teacher", teacher), ("student", student)):
        p = r["per_image_s"]
        rows.append(f"| {name} | {r['steps']} | {r['evaluations']} | {ms(p['total'])} ± {ms(r['stdev_s'])} | {ms(p['text'])} | {ms(p['backbone'])} "
                    f"| {ms(p['decode'])} | {ms(p['other'])} |")
    t, s = teacher["per_image_s"], student["per_image_s"]
    floor = s["text"] + s["backbone_per_call"] + s["decode"]
    rows += ["", f"device: {device}; end-to-end speedup {t['total'] / s['total']:.1f}x; backbone-only speedup {t['backbone'] / s['backbone']:.1f}x",
             f"student floor (text + one backbone pass + decode) {ms(floor)} ms; student latency is {s['total'] / floor:.2f}x its floor "
             f"({100 * (s['total'] / floor - 1):.0f}% over)"]
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", help="teacher pipeline folder")
    parser.add_argument("--student", help="exported student folder (diffdistill export)")
    parser.add_argument("--tiny", nargs="?", const="unet", choices=("unet", "sd3", "flux"),
                        help="use a tiny pipeline written here as teacher: unet (default), or sd3 / flux with an exported student")
    parser.add_argument("--teacher-steps", type=int, default=50)
    parser.add_argument("--teacher-guidance", type=float, default=7.5, help="> 1 runs CFG: two backbone evaluations a step")
    parser.add_argument("--student-steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1, help="prompts per call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.teacher or args.tiny):
        parser.error("give --teacher DIR (and --student DIR), or --tiny")
    dtype = getattr(torch, args.dtype)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        student_call = None
        if args.tiny in ("sd3", "flux") and not args.teacher:
            teacher_dir, student_dir, student_call = tiny_flow_pair(args.tiny, Path(tmp))
            args.student = args.student or str(student_dir)
        else:
            teacher_dir = Path(args.teacher) if args.teacher else tiny_teacher(Path(tmp))
        student = load(args.student, args.device, dtype) if args.student else student_like(teacher_dir, args.device, dtype)
        teacher = load(teacher_dir, args.device, dtype)
        result = {
            **measure_pair(teacher, student, prompts, args, student_call),
            "device": args.device, "dtype": args.dtype, "batch": args.batch, "threads": torch.get_num_threads(),
            "student_source": args.student or "teacher architecture with the export's one-step scheduler",
        }
    print(table(result["teacher"], result["student"], args.device))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
