"""Peak memory of one DMD2 training update per memory tier, measured, next to ``diffdistill plan``'s prediction.

Method. Each tier runs in a fresh subprocess (``--child``): it imports everything, reads its resident set size (the
baseline), builds a teacher pipeline with an SD1.5-shaped UNet (``sd15_shaped_unet_config(--width-scale)``, the tiny VAE
and a 77 x 768 tiny CLIP text encoder, as ``benchmarks/train_step.py`` builds it) and the trainer from
``recipes/sd15/dmd2.yaml`` (fp32: ``mixed_precision=no``; ``method.ratio=--ratio``, so an update is ``ratio`` critic steps
and one generator step), then runs ``--updates`` updates through ``Trainer.train_step``. Before each step the peak RSS
(/proc/self/status VmHWM) is reset (``/proc/self/clear_refs``), so what the build itself briefly held (the teacher in
fp32 before its bf16 cast, the copies' deep-copy transients) is not mistaken for the training step; what it keeps stays
in RSS and counts. Measured = max over steps of VmHWM - baseline. Later updates are the steady state: the lazily
allocated AdamW moments of both phases exist. On CUDA: ``torch.cuda.max_memory_allocated`` (baseline 0) instead.

Predicted: ``diffdistill.plan`` on the same configs (written to a temporary pipeline folder), batch, latent size and
precision, in its CPU mode (``PlanSpec.device="cpu"``): one process, no fixed CUDA workspace.

Savings reported: LoRA critic vs full critic (the floor: at least one full fp32 copy of the UNet, params x 4 bytes),
and gradient checkpointing's cut of the peak step's activations (the floor: >= 2x): per tier, the peak step's transient
(its VmHWM minus the RSS before it) less the phase's gradients (trained params x 4 bytes, allocated during backward).

    OMP_NUM_THREADS=1 python benchmarks/memory.py --json memory.json
    OMP_NUM_THREADS=1 python benchmarks/memory.py --tiers baseline "grad ckpt" --batch 4 --latent 16   # quick check

8-bit AdamW (bitsandbytes, CUDA) and FSDP (several processes) are not run here; the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
MIB = 2**20
PROMPTS = ["a photo of a cat", "a red sports car on a road", "a bowl of fruit on a table", "a mountain lake at sunrise"]
# tier -> recipe overrides; the plan's Tiers follow from the same keys (see plan_tiers)
TIERS = {
    "baseline": [],
    "grad ckpt": ["gradient_checkpointing=true"],
    "LoRA critic": ["method.critic_lora_rank={rank}"],
    "bf16 teacher": ["teacher_dtype=bfloat16"],
    "grad ckpt + LoRA critic": ["gradient_checkpointing=true", "method.critic_lora_rank={rank}"],
    "LoRA critic + bf16 teacher": ["method.critic_lora_rank={rank}", "teacher_dtype=bfloat16"],
    "grad ckpt + LoRA critic + bf16 teacher": ["gradient_checkpointing=true", "method.critic_lora_rank={rank}", "teacher_dtype=bfloat16"],
}
NOT_RUN = {"8-bit Adam": "optimizer=adamw8bit needs bitsandbytes (CUDA), not installed here",
           "FSDP": "parallel=fsdp needs several processes (accelerate launch); one process here"}


def overrides(tier: str, args) -> list[str]:
    return [o.format(rank=args.rank) for o in TIERS[tier]]


# ---- the child: one tier in a fresh process ---------------------------------------------------------------------


def status_mib(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def child(tier: str, args) -> dict:
    import accelerate  # noqa: F401  everything the build imports, before the baseline
    import diffusers
    import peft  # noqa: F401
    import torch
    import transformers

    from diffdistill.config import load_recipe
    from diffdistill.data.sources import DataSource
    from diffdistill.methods.base import _load_all
    from diffdistill.run import build_trainer
    from train_step import sd15_shaped_teacher

    _load_all()
    _ = diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, diffusers.StableDiffusionPipeline, transformers.CLIPTextModel
    cuda = torch.cuda.is_available()

    def resident() -> float:
        return torch.cuda.memory_allocated() / MIB if cuda else status_mib("VmRSS")

    def reset_peak() -> None:
        torch.cuda.reset_peak_memory_stats() if cuda else Path("/proc/self/clear_refs").write_text("5")

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / MIB if cuda else status_mib("VmHWM")

    baseline = resident()
    cfg = load_recipe(ROOT / "recipes" / "sd15" / "dmd2.yaml", [
        f"batch_size={args.batch}", "grad_accum=1", "mixed_precision=no", f"out={tempfile.mkdtemp()}", "data.source=prompts",
        f"method.ratio={args.ratio}", *overrides(tier, args)])
    teacher = sd15_shaped_teacher(args.width_scale, args.latent)
    teacher.pipe.to(getattr(torch, cfg.teacher_dtype))  # as resolve_teacher holds a teacher given teacher_dtype
    data = DataSource(PROMPTS * 2, None, cfg.seed, 0.0)
    trainer = build_trainer(cfg, teacher=teacher, data=data)
    built = resident()
    steps = []
    for step in range((args.ratio + 1) * args.updates):
        before = resident()
        reset_peak()
        phase = trainer.train_step(step)["phase"]
        steps.append({"step": step, "phase": phase, "before_mib": before - baseline, "peak_mib": peak() - baseline,
                      "after_mib": resident() - baseline})
    trained = {phase: sum(p.numel() for name in trainer.method.phase_nets(phase) for p in trainer.method.nets[name].parameters()
                          if p.requires_grad) for phase in trainer.method.phases}
    grad_bytes = {phase: sum(p.numel() * p.element_size() for name in trainer.method.phase_nets(phase)
                             for p in trainer.method.nets[name].parameters() if p.requires_grad) for phase in trainer.method.phases}
    top = max(steps, key=lambda s: s["peak_mib"])
    return {"tier": tier, "device": "cuda" if cuda else "cpu", "baseline_mib": baseline, "built_mib": built - baseline,
            "peak_mib": top["peak_mib"], "peak_phase": top["phase"], "transient_mib": top["peak_mib"] - top["before_mib"],
            "activations_mib": top["peak_mib"] - top["before_mib"] - grad_bytes[top["phase"]] / MIB,
            "trained_params": trained, "steps": steps}


def run_child(tier: str, args) -> dict:
    command = [sys.executable, __file__, "--child", tier, *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                                                            if k in ("batch", "latent", "width_scale", "rank", "ratio", "updates"))]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"tier {tier!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the prediction --------------------------------------------------------------------------------------------


def write_configs(folder: Path, args) -> int:
    """The benchmark teacher's configs as a pipeline folder plan reads (unet/, vae/, text_encoder/); returns its UNet's size."""
    from train_step import sd15_shaped_teacher

    pipe = sd15_shaped_teacher(args.width_scale, args.latent).pipe
    for sub, cfg in (("unet", json.loads(pipe.unet.to_json_string())), ("vae", json.loads(pipe.vae.to_json_string())),
                     ("text_encoder", {**pipe.text_encoder.config.to_dict(), "architectures": [type(pipe.text_encoder).__name__]})):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps(cfg))
    return sum(p.numel() for p in pipe.unet.parameters())


def predict(args, tiers: list[str]) -> tuple[dict, dict]:
    from diffdistill.config import load_recipe
    from diffdistill.plan import PlanSpec, Tiers, component_bytes, measure_plan, read_pipeline_configs

    folder = Path(tempfile.mkdtemp()) / "sd15-shaped"
    unet_params = write_configs(folder, args)
    method = dict(load_recipe(ROOT / "recipes" / "sd15" / "dmd2.yaml", []).method)
    latent_factor = read_pipeline_configs(folder).vae_factor
    spec = PlanSpec(str(folder), method, gpus=1, batch=args.batch, resolution=args.latent * latent_factor, mixed_precision="no",
                    lora_rank=args.rank, device="cpu")
    m = measure_plan(spec)
    out = {}
    for tier in tiers:
        keys = dict(o.split("=", 1) for o in overrides(tier, args))
        tiers_ = Tiers(gradient_checkpointing="gradient_checkpointing" in keys, critic="lora" if "method.critic_lora_rank" in keys else "full",
                       teacher_dtype=keys.get("teacher_dtype", "float32"))
        parts, phase = component_bytes(spec, m, tiers_)
        out[tier] = {"predicted_mib": sum(parts.values()) / MIB, "phase": phase, "parts_mib": {k: v / MIB for k, v in parts.items()}}
    return out, {"unet_params": unet_params, "lora_params": m.lora, "frozen_params": m.frozen, "latent": m.latent}


# ---- report ----------------------------------------------------------------------------------------------------


def report(rows: dict, info: dict, args) -> str:
    lines = ["| tier | predicted MiB | measured MiB | error % | peak phase (measured / predicted) |", "|---|---:|---:|---:|---|"]
    for tier, r in rows.items():
        error = 100 * (r["predicted_mib"] - r["peak_mib"]) / r["peak_mib"]
        flag = "" if abs(error) <= 20 else " **(> 20%)**"
        lines.append(f"| {tier} | {r['predicted_mib']:.0f} | {r['peak_mib']:.0f} | {error:+.1f}{flag} | {r['peak_phase']} / {r['phase']} |")
    lines += [f"| {tier} | - | - | - | not run: {why} |" for tier, why in NOT_RUN.items()]
    copy_mib = info["unet_params"] * 4 / MIB
    notes = [f"\nSD1.5-shaped UNet at width x{args.width_scale} ({info['unet_params']:,} params; one fp32 copy {copy_mib:.1f} MiB), "
             f"LoRA rank {args.rank} ({info['lora_params']:,} params), VAE + text encoder {info['frozen_params']:,} params; "
             f"batch {args.batch}, latents 4x{args.latent}x{args.latent}, fp32, DMD2 ratio {args.ratio}, {args.updates} update(s), "
             f"{os.environ.get('OMP_NUM_THREADS', '?')} thread(s)."]
    pairs = [(a, b) for a, b in (("baseline", "LoRA critic"), ("grad ckpt", "grad ckpt + LoRA critic")) if a in rows and b in rows]
    for full, lora in pairs:
        saved = rows[full]["peak_mib"] - rows[lora]["peak_mib"]
        notes.append(f"- LoRA critic vs full critic ({full}): saves {saved:.1f} MiB measured = {saved / copy_mib:.2f} fp32 UNet copies "
                     f"({'meets' if saved >= copy_mib else 'MISSES'} the floor of one copy, {copy_mib:.1f} MiB).")
    if "baseline" in rows and "grad ckpt" in rows:
        a, b = rows["baseline"]["activations_mib"], rows["grad ckpt"]["activations_mib"]
        notes.append(f"- Gradient checkpointing: activations of the peak step {a:.1f} -> {b:.1f} MiB = {a / b:.2f}x cut "
                     f"({'meets' if a >= 2 * b else 'MISSES'} the 2x floor); peak {rows['baseline']['peak_mib']:.0f} -> "
                     f"{rows['grad ckpt']['peak_mib']:.0f} MiB.")
    return "\n".join(lines + notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiers", nargs="+", choices=list(TIERS), default=list(TIERS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32, help="latent side L: 4 x L x L latents")
    parser.add_argument("--width-scale", type=float, default=0.1, help="SD1.5 UNet widths x this (0.1: 32, 64, 128, 128)")
    parser.add_argument("--rank", type=int, default=64, help="LoRA critic rank (method.critic_lora_rank)")
    parser.add_argument("--ratio", type=int, default=1, help="critic steps per generator step (memory per step does not depend on it)")
    parser.add_argument("--updates", type=int, default=2, help="updates run; the first allocates AdamW's moments")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--child", metavar="TIER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    predicted, info = predict(args, args.tiers)
    rows = {}
    for tier in args.tiers:
        rows[tier] = {**run_child(tier, args), **predicted[tier]}
        print(f"{tier}: measured {rows[tier]['peak_mib']:.0f} MiB, predicted {rows[tier]['predicted_mib']:.0f} MiB", file=sys.stderr)
    print(report(rows, info, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {**vars(args), **info}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
