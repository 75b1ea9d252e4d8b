"""What stopping the critic at its bottleneck saves: a GAN head's pass, whole forward vs stopped after the feature module.

DMD2's head reads the critic UNet's mid block. Run whole, every GAN pass also runs the up path, whose
output nobody uses; ``ScoreEngine.gan_logits`` stops the forward once the features are read (for
unwrapped nets: DDP and FSDP run whole, see ``scores.can_stop_early``). On a teacher of SD1.5's
architecture at reduced width (``benchmarks/train_step.py``'s ``sd15_shaped_teacher``), fp32, this times
the two passes DMD2 makes with its head:

* **generator** -- logits of generated samples, backward into the samples only (the critic frozen, as
  the trainer's ``_reading_only`` leaves it in a generator step);
* **critic** -- logits, backward into the critic's weights and the head (the discriminator loss).

It prints median wall times over ``--repeats`` (whole and stopped timed alternately, so a drifting load
affects both alike), the forward+backward FLOPs of each (``torch.utils.flop_counter``, independent of
load) and the 1-minute load average.

    python benchmarks/gan_features.py --batch 2 --latent 32 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import diffdistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from train_step import PROMPTS, sd15_shaped_teacher

from diffdistill.conditioning import encode_prompts
from diffdistill.methods import build_method
from diffdistill.scores import FeatureTap


def whole_logits(engine, x_t, t, cond):
    """The head on features read from a forward that runs to the end (the behaviour before the stop)."""
    net = engine.nets[engine.critic_name]
    tap = FeatureTap(net.backbone)
    with tap.reading():
        net(x_t, t, cond)
    return engine.nets[engine.gan_name](tap.value)


def gan_pass(method, logits_of, x, t, cond, train_critic: bool):
    critic = method.nets["critic"]
    for p in critic.parameters():
        p.requires_grad_(train_critic)
    x = x.detach().requires_grad_(not train_critic)
    logits_of(method.engine, x, t, cond).sum().backward()
    method.nets["critic"].zero_grad(set_to_none=True)
    method.nets["gan_head"].zero_grad(set_to_none=True)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width-scale", type=float, default=0.1)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    from diffdistill.config import TrainConfig

    teacher = sd15_shaped_teacher(args.width_scale, args.latent)
    method = build_method({"name": "dmd2", "gan_weight": 1e-3}, teacher, TrainConfig())
    x = torch.randn((args.batch, *teacher.latent_shape), generator=torch.Generator().manual_seed(0))
    t = torch.full((args.batch,), 500.0)
    cond = encode_prompts(teacher.pipe, (PROMPTS * args.batch)[: args.batch], "cpu")
    ways = {"whole": whole_logits, "stopped": lambda engine, *a: engine.gan_logits(*a)}
    rows = {}
    for phase, train_critic in (("generator", False), ("critic", True)):
        runs = {way: (lambda f=f, train=train_critic: gan_pass(method, f, x, t, cond, train)) for way, f in ways.items()}
        for run in runs.values():  # warm-up
            run()
        seconds = {way: [] for way in runs}
        for _ in range(args.repeats):
            for way, run in runs.items():
                seconds[way].append(timed(run))
        rows[phase] = {way: (statistics.median(seconds[way]), flops(run)) for way, run in runs.items()}
    load = os.getloadavg()[0]
    print(f"SD1.5-shaped UNet at width {args.width_scale}, latents {args.latent}x{args.latent}, batch {args.batch}, fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}, load {load:.2f}")
    print("| GAN pass | whole (s) | stopped (s) | time saved | whole GFLOP | stopped GFLOP | FLOPs saved |")
    print("|---|---|---|---|---|---|---|")
    for phase, row in rows.items():
        (tw, fw), (ts, fs) = row["whole"], row["stopped"]
        print(f"| {phase} | {tw:.3f} | {ts:.3f} | {1 - ts / tw:.0%} | {fw / 1e9:.2f} | {fs / 1e9:.2f} | {1 - fs / fw:.0%} |")
    return rows


if __name__ == "__main__":
    main()
