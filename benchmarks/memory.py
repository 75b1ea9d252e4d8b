"""Peak memory of DMD2 training steps per memory tier, measured, next to ``diffdistill plan``'s prediction.

Measured. Each tier runs in a fresh subprocess (``--child``). It imports everything, runs one step of a tiny UNet and text
encoder (fp32 and bf16) and frees it, so that the kernels' code pages (file-backed libtorch pages, ~35 MiB) count with
the imports, then reads its resident set size: the baseline. It builds a teacher pipeline with an SD1.5-shaped UNet
(``sd15_shaped_unet_config(--width-scale)``, the tiny VAE and a 77 x 768 tiny CLIP text encoder, as
``benchmarks/train_step.py`` builds it) and the trainer from ``recipes/sd15/dmd2.yaml`` (fp32: ``mixed_precision=no``;
``method.ratio=--ratio``: an update is that many critic steps, then one generator step), then runs ``--updates`` updates
through ``Trainer.train_step``. The peak RSS (/proc/self/status VmHWM) is reset (``/proc/self/clear_refs``) before each
step, so the build's short-lived copies (a bf16 teacher is built in fp32 first) are not taken for the step's peak; what
the build keeps stays in RSS and counts. Measured = max over steps of VmHWM - baseline. The second update is the steady
state: AdamW allocates its moments at each optimizer's first step. On CUDA: ``torch.cuda.max_memory_allocated``.

Two allocator settings, each in its own process: "measured" runs glibc with ``MALLOC_MMAP_THRESHOLD_=65536`` (each block
of 64 KiB or more is its own mapping, returned to the OS when freed), so RSS follows what the process holds, as
``max_memory_allocated`` does on CUDA. "glibc default" raises that threshold as blocks are freed (up to 32 MiB) and keeps
freed heap memory resident: the same steps then show a higher RSS.

Predicted: ``diffdistill.plan`` on the same configs (written to a temporary pipeline folder), batch, latent size and
precision, in its CPU mode (``PlanSpec(device="cpu")``): one process, no CUDA context or fixed workspace.

Savings (from "measured"): LoRA critic vs full critic, against a floor of one fp32 copy of the UNet (params x 4 bytes).
Gradient checkpointing's activation cut: the peak step's growth over the RSS before it (its activations, plus at most
its grads), full vs checkpointed, against a floor of 2x.

    OMP_NUM_THREADS=1 python benchmarks/memory.py --json memory.json                        # ~15 min on one core
    OMP_NUM_THREADS=1 python benchmarks/memory.py --tiers baseline "grad ckpt" --malloc returned --batch 4 --latent 16

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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
MIB = 2**20
PROMPTS = ["a photo of a cat", "a red sports car on a road", "a bowl of fruit on a table", "a mountain lake at sunrise"]
TIERS = {  # tier -> recipe overrides; plan's Tiers follow from the same keys (see predict)
    "baseline": [],
    "grad ckpt": ["gradient_checkpointing=true"],
    "LoRA critic": ["method.critic_lora_rank={rank}"],
    "bf16 teacher": ["teacher_dtype=bfloat16"],
    "grad ckpt + LoRA critic": ["gradient_checkpointing=true", "method.critic_lora_rank={rank}"],
    "LoRA critic + bf16 teacher": ["method.critic_lora_rank={rank}", "teacher_dtype=bfloat16"],
    "grad ckpt + LoRA critic + bf16 teacher": ["gradient_checkpointing=true", "method.critic_lora_rank={rank}", "teacher_dtype=bfloat16"],
    "LoRA student + LoRA critic": ["method.student_lora_rank={rank}", "method.critic_lora_rank={rank}"],
}
MALLOC = {"returned": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}
NOT_RUN = {"8-bit Adam": "optimizer=adamw8bit needs bitsandbytes (CUDA), not installed here",
           "FSDP": "parallel=fsdp needs several processes (accelerate launch); one process here"}


def overrides(tier: str, args) -> list[str]:
    return [o.format(rank=args.rank) for o in TIERS[tier]]


# ---- the child: one tier in a fresh process ---------------------------------------------------------------------


def status_mib(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1)) / 1024


def warm_up_kernels() -> None:
    """One training step of a tiny UNet and a 768-wide text encoder, in fp32 and bf16, then freed."""
    import torch

    from diffdistill.backbones.tiny import tiny_text_encoder, tiny_tokenizer, tiny_unet

    tokenizer = tiny_tokenizer(max_length=77)
    encoder, unet = tiny_text_encoder(tokenizer, 0, hidden=768), tiny_unet(0, sample_size=8, cross_attention_dim=768)
    with torch.no_grad():
        text = encoder(tokenizer(["a cat"], padding="max_length", return_tensors="pt").input_ids)[0]
    for dtype in (torch.float32, torch.bfloat16):
        torch.nn.Module.to(unet, dtype)  # nn.Module.to: diffusers' own .to warns about the cast
        optimizer = torch.optim.AdamW(unet.parameters())
        unet(torch.randn(2, 4, 8, 8, dtype=dtype), torch.full((2,), 500.0), text.to(dtype).expand(2, -1, -1)).sample.float().mean().backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()


def child(tier: str, args) -> dict:
    import accelerate  # noqa: F401  everything the build imports, before the baseline
    import diffusers
    import peft  # noqa: F401
    import torch
    import transformers
    from train_step import sd15_shaped_teacher

    from diffdistill.config import load_recipe
    from diffdistill.data.sources import DataSource
    from diffdistill.methods.base import _load_all
    from diffdistill.run import build_trainer

    _load_all()
    _ = diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, diffusers.StableDiffusionPipeline, transformers.CLIPTextModel
    cuda = torch.cuda.is_available()
    if args.warmup:
        warm_up_kernels()

    def resident() -> float:
        return torch.cuda.memory_allocated() / MIB if cuda else status_mib("VmRSS")

    def reset_peak() -> None:
        torch.cuda.reset_peak_memory_stats() if cuda else Path("/proc/self/clear_refs").write_text("5")

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / MIB if cuda else status_mib("VmHWM")

    baseline, file_pages = resident(), status_mib("RssFile")
    cfg = load_recipe(ROOT / "recipes" / "sd15" / "dmd2.yaml", [
        f"batch_size={args.batch}", "grad_accum=1", "mixed_precision=no", f"out={tempfile.mkdtemp()}", "data.source=prompts",
        f"method.ratio={args.ratio}", *overrides(tier, args)])
    teacher = sd15_shaped_teacher(args.width_scale, args.latent)
    if cfg.teacher_dtype != "float32":  # as resolve_teacher holds a teacher in teacher_dtype
        diffusers.utils.logging.set_verbosity_error()  # its note on casting a built model with .to()
        teacher.pipe.to(getattr(torch, cfg.teacher_dtype))
    trainer = build_trainer(cfg, teacher=teacher, data=DataSource(PROMPTS * 2, None, cfg.seed, 0.0))
    built, steps = resident(), []
    for step in range((args.ratio + 1) * args.updates):
        before, start = resident(), time.perf_counter()
        reset_peak()
        phase = trainer.train_step(step)["phase"]
        steps.append({"step": step, "phase": phase, "before_mib": before - baseline, "peak_mib": peak() - baseline,
                      "after_mib": resident() - baseline, "seconds": time.perf_counter() - start})
    top, last = max(steps, key=lambda s: s["peak_mib"]), max(steps[-(args.ratio + 1):], key=lambda s: s["peak_mib"])
    return {"device": "cuda" if cuda else "cpu", "baseline_mib": baseline, "built_mib": built - baseline,
            "file_pages_mib": status_mib("RssFile") - file_pages, "peak_mib": top["peak_mib"], "peak_phase": top["phase"],
            "peak_step_growth_mib": last["peak_mib"] - last["before_mib"], "steps": steps}  # growth: in the last update


def run_child(tier: str, args, malloc: str) -> dict:
    options = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in ("batch", "latent", "width_scale", "rank", "ratio", "updates")]
    command = [sys.executable, __file__, "--child", tier, *options, *([] if args.warmup else ["--no-warmup"])]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **MALLOC[malloc]}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"tier {tier!r} ({malloc} malloc) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the prediction --------------------------------------------------------------------------------------------


def write_configs(folder: Path, args) -> int:
    """The benchmark teacher's configs as a pipeline folder plan reads (unet/, vae/, text_encoder/); returns the UNet's size."""
    from train_step import sd15_shaped_teacher

    pipe = sd15_shaped_teacher(args.width_scale, args.latent).pipe
    for sub, cfg in (("unet", json.loads(pipe.unet.to_json_string())), ("vae", json.loads(pipe.vae.to_json_string())),
                     ("text_encoder", {**pipe.text_encoder.config.to_dict(), "architectures": [type(pipe.text_encoder).__name__]})):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps(cfg))
    return sum(p.numel() for p in pipe.unet.parameters())


def predict(args, tiers: list[str]) -> tuple[dict, dict]:
    import torch

    from diffdistill.config import load_recipe
    from diffdistill.plan import PlanSpec, Tiers, component_bytes, measure_plan, read_pipeline_configs

    folder = Path(tempfile.mkdtemp()) / "sd15-shaped"
    unet_params = write_configs(folder, args)
    method = dict(load_recipe(ROOT / "recipes" / "sd15" / "dmd2.yaml", []).method)
    resolution = args.latent * read_pipeline_configs(folder).vae_factor
    cuda = torch.cuda.is_available()  # max_memory_allocated does not see the CUDA context: no fixed workspace there either
    spec = PlanSpec(str(folder), method, gpus=1, batch=args.batch, resolution=resolution, mixed_precision="no", lora_rank=args.rank,
                    device="cuda" if cuda else "cpu", workspace_fixed_gib=0.0)
    m, out = measure_plan(spec), {}
    for tier in tiers:
        keys = dict(o.split("=", 1) for o in overrides(tier, args))
        parts, phase = component_bytes(spec, m, Tiers(gradient_checkpointing="gradient_checkpointing" in keys,
                                                      critic="lora" if "method.critic_lora_rank" in keys else "full",
                                                      student_lora="method.student_lora_rank" in keys,
                                                      teacher_dtype=keys.get("teacher_dtype", "float32")))
        out[tier] = {"predicted_mib": sum(parts.values()) / MIB, "predicted_phase": phase, "parts_mib": {k: v / MIB for k, v in parts.items()}}
    widths = json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"]
    return out, {"unet_params": unet_params, "lora_params": m.lora, "frozen_params": m.frozen, "widths": widths}


# ---- report ----------------------------------------------------------------------------------------------------


def error(predicted: float, measured: float) -> str:
    e = 100 * (predicted - measured) / measured
    return f"{e:+.1f}" + ("" if abs(e) <= 20 else " **(> 20%)**")


def report(rows: dict, info: dict, args) -> str:
    head, first = ["tier", "predicted MiB"], next(iter(rows.values()))
    head += [c for m, c in (("returned", "measured MiB"), ("returned", "error %"), ("default", "measured MiB, glibc default"),
                            ("default", "error %")) if m in first]
    lines = ["| " + " | ".join(head + ["peak phase: measured / predicted"]) + " |", "|---|" + "---:|" * (len(head) - 1) + "---|"]
    for tier, r in rows.items():
        cells = [f"{r[m]['peak_mib']:.0f} | {error(r['predicted_mib'], r[m]['peak_mib'])}" for m in ("returned", "default") if m in r]
        phase = next(r[m]["peak_phase"] for m in ("returned", "default") if m in r)
        lines.append(f"| {tier} | {r['predicted_mib']:.0f} | {' | '.join(cells)} | {phase} / {r['predicted_phase']} |")
    lines += [f"| {tier} | - | " + "- | " * (len(head) - 2) + f"not run: {why} |" for tier, why in NOT_RUN.items()]
    copy_mib = info["unet_params"] * 4 / MIB
    notes = ["", (f"SD1.5-shaped UNet at width x{args.width_scale} (block widths {info['widths']}, {info['unet_params']:,} params; one "
                  f"fp32 copy {copy_mib:.1f} MiB), LoRA rank {args.rank} ({info['lora_params']:,} params), VAE + text encoder "
                  f"{info['frozen_params']:,} params; batch {args.batch}, latents 4x{args.latent}x{args.latent}, fp32, DMD2 ratio "
                  f"{args.ratio}, {args.updates} update(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. "
                  "Peak RSS minus the baseline.")]
    m = "returned" if "returned" in first else "default"
    for full, lora in (("baseline", "LoRA critic"), ("grad ckpt", "grad ckpt + LoRA critic")):
        if full in rows and lora in rows:
            saved = rows[full][m]["peak_mib"] - rows[lora][m]["peak_mib"]
            notes.append(f"- LoRA critic vs full critic ({full}): saves {saved:.1f} MiB = {saved / copy_mib:.2f} fp32 UNet copies "
                         f"({'meets' if saved >= copy_mib else 'MISSES'} the floor of one copy, {copy_mib:.1f} MiB).")
    if "baseline" in rows and "grad ckpt" in rows:
        a, b = (rows[t][m]["peak_step_growth_mib"] for t in ("baseline", "grad ckpt"))
        notes.append(f"- Gradient checkpointing: the last update's peak step grows RSS by {a:.1f} -> {b:.1f} MiB (activations + at most grads) = "
                     f"{a / b:.2f}x cut ({'meets' if a >= 2 * b else 'MISSES'} the 2x floor); peak {rows['baseline'][m]['peak_mib']:.0f} -> "
                     f"{rows['grad ckpt'][m]['peak_mib']:.0f} MiB.")
    return "\n".join(lines + notes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiers", nargs="+", choices=list(TIERS), default=list(TIERS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32, help="latent side L: 4 x L x L latents")
    parser.add_argument("--width-scale", type=float, default=0.1, help="SD1.5 UNet widths x this (0.1: 32, 64, 128, 128)")
    parser.add_argument("--rank", type=int, help="LoRA rank (method.critic_lora_rank, student_lora_rank); default: 64 (DMD2's SDXL "
                        "LoRA) x --width-scale, so adapters keep their real size relative to the layers they adapt")
    parser.add_argument("--ratio", type=int, default=1, help="critic steps per generator step (a step's memory does not depend on it)")
    parser.add_argument("--updates", type=int, default=2, help="updates run; the first allocates AdamW's moments")
    parser.add_argument("--malloc", choices=["both", *MALLOC], default="both", help="glibc setting(s) to measure under")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="baseline right after imports, before kernels ran")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--child", metavar="TIER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.rank = args.rank or max(1, round(64 * args.width_scale))
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    predicted, info = predict(args, args.tiers)
    rows = {}
    for tier in args.tiers:
        rows[tier] = {**predicted[tier], **{m: run_child(tier, args, m) for m in MALLOC if args.malloc in ("both", m)}}
        print(f"{tier}: predicted {rows[tier]['predicted_mib']:.0f} MiB, measured "
              + ", ".join(f"{rows[tier][m]['peak_mib']:.0f} MiB ({m})" for m in MALLOC if m in rows[tier]), file=sys.stderr)
    print(report(rows, info, args))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {**vars(args), **info}, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
