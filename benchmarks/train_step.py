"""Training-step efficiency: one generator update of dmd2, sid and scm against the network passes it must make.

For each method the trainer is built from its SD1.5 recipe (``recipes/sd15/METHOD.yaml``) as
``diffdistill.run.build_trainer`` builds it, on a teacher of SD1.5's architecture at reduced width
(``sd15_shaped_unet_config(--width-scale)``: 0.1 gives widths (32, 64, 128, 128), ~10.4M parameters),
77 x 768 text conditioning from a small random CLIP text encoder, latents 4 x L x L (``--latent``,
default 16), fp32 (``mixed_precision=no``: the CPU jvp refuses bf16), global batch ``--batch``, no accumulation.

* **update** -- one generator update through ``Trainer.train_step``: ``ratio`` critic steps and one
  generator step for dmd2 and sid (the recipe's ratio, 10 and 1, unless ``--ratio``), one step for scm.
* **passes** -- the network passes that update must make, each timed alone on the same modules,
  batch and conditioning, weighted by how often the update makes it:

  dmd2  critic step: student fwd (no grad), critic fwd+bwd;  generator step: student fwd+bwd,
        teacher guided fwd (cond + uncond batched, 2B, no grad), critic fwd (no grad)
  sid   critic step: student fwd (no grad), critic guided (kappa_1) fwd+bwd;  generator step: student
        fwd+bwd, teacher guided fwd + backward into its input, critic guided fwd + backward into its input
  scm   teacher guided fwd (2B, no grad), student jvp (``velocity_and_tangent``), student fwd+bwd

* **overhead** = update / sum(passes) - 1; the goal is <= 15% at batch 4 or more. The optimizer's own
  time (grad clip + optimizer (AdamW) step + zero_grad, timed alone with the phase's real optimizers) is shown beside
  it, with the overhead left once it is counted as a pass.

Each repeat times one update, then every pass once, so a drifting machine load affects both alike;
the table shows medians over ``--repeats`` after ``--warmup`` rounds. The 1-minute load average is
printed with the results: numbers from a busy machine are not valid.

    python benchmarks/train_step.py --batch 4 --repeats 5 --json out.json
    python benchmarks/train_step.py --methods dmd2 --ratio 2 --batch 2 --repeats 1   # quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import diffdistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

METHODS = ("dmd2", "sid", "scm")
PROMPTS = ["a photo of a cat", "a red sports car on a road", "a bowl of fruit on a table", "a mountain lake at sunrise"]
GOAL = 0.15


# ---- assembly ----------------------------------------------------------------------------------


def sd15_shaped_teacher(width_scale: float, latent: int, seed: int = 0):
    """The tiny SD pipeline (VAE, scheduler) with an SD1.5-shaped UNet and a 77-token, 768-wide text encoder."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffdistill.backbones.loading import _teacher_from_pipe
    from diffdistill.backbones.sd15_shaped import sd15_shaped_unet_config
    from diffdistill.backbones.tiny import tiny_pipeline, tiny_text_encoder, tiny_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**sd15_shaped_unet_config(width_scale), "sample_size": latent})
    tokenizer = tiny_tokenizer(max_length=77)
    text_encoder = tiny_text_encoder(tokenizer, seed + 2, hidden=unet.config.cross_attention_dim)
    base = tiny_pipeline("unet", seed).components
    pipe = StableDiffusionPipeline(**{**base, "unet": unet, "tokenizer": tokenizer, "text_encoder": text_encoder},
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return _teacher_from_pipe(pipe, {"unet": [None, None]}, f"sd15-shaped@{width_scale}")


def build(method: str, teacher, args, out: str):
    from diffdistill.config import load_recipe
    from diffdistill.data.sources import DataSource
    from diffdistill.run import build_trainer

    overrides = [f"batch_size={args.batch}", "grad_accum=1", "mixed_precision=no", f"out={out}", "data.source=prompts"]
    if args.ratio is not None and method != "scm":
        overrides.append(f"method.ratio={args.ratio}")
    cfg = load_recipe(ROOT / "recipes" / "sd15" / f"{method}.yaml", overrides)
    latents = torch.randn((2 * len(PROMPTS), *teacher.latent_shape), generator=torch.Generator().manual_seed(0))
    data = DataSource(PROMPTS * 2, latents, cfg.seed, 0.0)  # x0 for scm, which distills on noised data
    return build_trainer(cfg, teacher=teacher, data=data)


def steps_per_update(trainer) -> int:
    """ratio critic steps + 1 generator step, or 1 for a method with no critic."""
    n = trainer.method.options.ratio + 1 if "critic" in trainer.method.phases else 1
    assert trainer.method.phase(n - 1) == "generator", "an update must end in its generator step"
    return n


# ---- the isolated passes -----------------------------------------------------------------------


@contextlib.contextmanager
def frozen(module):
    """Weights without gradients (as the trainer's ``_reading_only`` leaves the critic in a generator step)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def guided_pass(net, w, mode: str, shape, cond, uncond):
    """One (guided: 2B when w != 1) pass of a Denoiser; mode fwd (no grad) | weights (fwd+bwd into the
    weights) | input (fwd + backward into x only, weights frozen)."""
    from diffdistill.scores import guided

    t = torch.full(shape[:1], 0.5 * net.schedule.t_max)

    def run():
        x = torch.randn(shape, requires_grad=mode == "input")
        if mode == "fwd":
            with torch.no_grad():
                guided(net, x, t, cond, uncond, w)
            return
        with frozen(net) if mode == "input" else contextlib.nullcontext():
            guided(net, x, t, cond, uncond, w).square().mean().backward()
        for p in net.parameters():
            p.grad = None

    return run


def jvp_pass(student, method, shape, cond):
    """sCM's tangent: one torch.func.jvp of the student, as ``scd_terms`` calls it."""
    from diffdistill.methods.trigflow import velocity_and_tangent

    o, s = method.options, torch.full(shape[:1], 0.8, dtype=torch.float64)
    return lambda: velocity_and_tangent(student, method.schedule, method.teacher.prediction_type, torch.randn(shape, dtype=torch.float64),
                                        s, cond, o.sigma_data, torch.randn(shape, dtype=torch.float64))


def passes(trainer) -> list[tuple[str, int, object]]:
    """(name, times per update, callable) for every network pass one generator update makes."""
    method, name = trainer.method, trainer.cfg.method["name"]
    nets = {k: getattr(v, "module", v) for k, v in method.nets.items()}
    student, critic, teacher = nets["generator"], nets.get("critic"), method.engine.teacher_denoiser
    batch = trainer.make_batch(0, 0)
    shape = (trainer.local_batch, *trainer.teacher.latent_shape)

    def p(label, count, net, w, mode):
        return (f"{label} ({'2B' if w != 1 else 'B'})", count, guided_pass(net, w, mode, shape, batch["cond"], batch["uncond"]))

    if name == "dmd2":
        r, w = method.options.ratio, method.options.guidance
        return [p("student fwd", r, student, 1, "fwd"), p("critic fwd+bwd", r, critic, 1, "weights"),
                p("student fwd+bwd", 1, student, 1, "weights"), p("teacher guided fwd", 1, teacher, w, "fwd"),
                p("critic fwd", 1, critic, 1, "fwd")]
    if name == "sid":
        r, g = method.options.ratio, method.guidance
        return [p("student fwd", r, student, 1, "fwd"), p("critic guided fwd+bwd", r, critic, g.fake_train, "weights"),
                p("student fwd+bwd", 1, student, 1, "weights"), p("teacher guided fwd+bwd(input)", 1, teacher, g.real, "input"),
                p("critic guided fwd+bwd(input)", 1, critic, g.fake, "input")]
    if name == "scm":
        return [p("teacher guided fwd", 1, teacher, method.options.guidance, "fwd"),
                ("student jvp (B)", 1, jvp_pass(student, method, shape, batch["cond"])), p("student fwd+bwd", 1, student, 1, "weights")]
    raise ValueError(f"no pass list for method {name!r}")


def optimizer_step(trainer, phase: str):
    """What train_step does after the backward: grad clip, optimizer step, zero_grad (on zero gradients)."""
    opt_cfg = trainer.cfg.optim if phase == "generator" else trainer.cfg.critic_optim
    params = [p for name in trainer.method.phase_nets(phase) for p in trainer.method.nets[name].parameters() if p.requires_grad]
    optimizer = trainer.optimizers[phase]

    def run():
        for p in params:
            p.grad = torch.zeros_like(p)
        if opt_cfg.grad_clip > 0:
            trainer.accelerator.clip_grad_norm_(params, opt_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


# ---- timing ------------------------------------------------------------------------------------


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(trainer, args) -> dict:
    n = steps_per_update(trainer)

    def update(k):  # the k-th generator update: its critic steps, then its generator step
        return lambda: [trainer.train_step(step) for step in range(k * n, (k + 1) * n)]

    plist = passes(trainer)
    opt_counts = {"critic": n - 1, "generator": 1} if n > 1 else {"generator": 1}
    opts = {phase: optimizer_step(trainer, phase) for phase in opt_counts}
    runs = {"update": [], **{name: [] for name, _, _ in plist}, **{f"opt {ph}": [] for ph in opts}}
    for k in range(args.warmup + args.repeats):
        times = {"update": timed(update(k))}
        times.update({name: timed(fn) for name, _, fn in plist})
        times.update({f"opt {ph}": timed(fn) for ph, fn in opts.items()})
        if k >= args.warmup:
            for key, value in times.items():
                runs[key].append(value)
    med = {key: statistics.median(values) for key, values in runs.items()}
    pass_rows = [{"pass": name, "count": count, "s_each": med[name], "s_total": count * med[name]} for name, count, _ in plist]
    passes_s = sum(r["s_total"] for r in pass_rows)
    optimizer_s = sum(count * med[f"opt {ph}"] for ph, count in opt_counts.items())
    return {"steps_per_update": n, "update_s": med["update"], "passes_s": passes_s, "optimizer_s": optimizer_s,
            "overhead": med["update"] / passes_s - 1, "overhead_with_optimizer_as_pass": med["update"] / (passes_s + optimizer_s) - 1,
            "passes": pass_rows, "update_runs_s": runs["update"]}


# ---- report ------------------------------------------------------------------------------------


def table(results: dict, args) -> str:
    ms = lambda s: f"{1000 * s:.1f}"
    rows = ["| method | steps / update | update (ms) | passes (ms) | overhead | optimizer (ms) | overhead beyond optimizer |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        over = f"{100 * r['overhead']:.1f}%"
        over = f"**{over}**" if args.batch >= 4 and r["overhead"] > GOAL else over  # bold: misses the goal
        rows.append(f"| {name} | {r['steps_per_update']} | {ms(r['update_s'])} | {ms(r['passes_s'])} | {over} "
                    f"| {ms(r['optimizer_s'])} | {100 * r['overhead_with_optimizer_as_pass']:.1f}% |")
    rows += ["", "| method | pass | count | ms each | ms total |", "|---|---|---:|---:|---:|"]
    for name, r in results.items():
        rows += [f"| {name} | {p['pass']} | {p['count']} | {ms(p['s_each'])} | {ms(p['s_total'])} |" for p in r["passes"]]
    return "\n".join(rows)


def busy(before, after, threads: int) -> bool:
    """Other work ran: load before the run, or beyond this run's own threads at its end (1-minute averages)."""
    return before[0] > 0.5 or after[0] > threads + 0.5


def footer(st: dict) -> str:
    side, loads = st["latent"][-1], lambda v: ", ".join(f"{x:.2f}" for x in v)
    lines = [f"\nbatch {st['batch']}, latents 4x{side}x{side}, width x{st['width_scale']} ({st['teacher_params'] / 1e6:.1f}M params)",
             f"fp32, {st['threads']} threads, median of {st['repeats']} after {st['warmup']} warm-up",
             f"goal: overhead <= {100 * GOAL:.0f}% at batch >= 4 (bold where missed)",
             f"load average (1, 5, 15 min): before {loads(st['loadavg_before'])}; after {loads(st['loadavg_after'])}"]
    if busy(st["loadavg_before"], st["loadavg_after"], st["threads"]):
        lines[-1] += "  -- the machine was busy: these timings are not valid"
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=16, help="latent side L: 4 x L x L latents (16 ~ 128 px images)")
    parser.add_argument("--width-scale", type=float, default=0.1, help="SD1.5 UNet widths x this (0.1: 32, 64, 128, 128)")
    parser.add_argument("--ratio", type=int, default=None, help="critic steps per generator update (default: the recipe's; dmd2 10, sid 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (AdamW state, prompt cache, allocator)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    teacher = sd15_shaped_teacher(args.width_scale, args.latent)
    results = {}
    for method in args.methods:
        with tempfile.TemporaryDirectory() as out:
            results[method] = measure(build(method, teacher, args, out), args)
    settings = {"batch": args.batch, "latent": [4, args.latent, args.latent], "width_scale": args.width_scale, "ratio": args.ratio,
                "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "teacher_params": sum(p.numel() for p in teacher.backbone.parameters()),
                "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    print(table(results, args))
    print(footer(settings))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
