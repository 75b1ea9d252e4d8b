"""Real images for a GAN term: decoded and VAE-encoded when a run starts, or read from latent shards.

DMD2 with its GAN term on the real digits (``recipes/zoo/digits_dmd2_gan.yaml``), two ways:

* ``images``: ``data.source=digits``: every run decodes the 1,797 images and runs the teacher's VAE
  over them before its first step (what an imagefolder or WebDataset source does too);
* ``latents``: ``diffdistill encode-latents`` once (timed separately), then ``data.source=latents``:
  the run reads each batch's latents from the shards.

For each: the time to build the trainer (data included), and the median time of a training step
over ``--steps`` steps after one warm-up step (a step's work is the same either way; the shards add
a read per batch). One table with the ratios.

    OMP_NUM_THREADS=1 python benchmarks/data.py --steps 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

RECIPE = ROOT / "recipes" / "zoo" / "digits_dmd2_gan.yaml"


def timed_run(overrides: list[str], steps: int) -> tuple[float, float]:
    """(seconds to build the trainer, median seconds per step after a warm-up step)."""
    from diffdistill.config import load_recipe  # after sys.path: the checkout's package
    from diffdistill.run import build_trainer

    tic = time.perf_counter()
    trainer = build_trainer(load_recipe(RECIPE, overrides))
    build = time.perf_counter() - tic
    times = []
    for step in range(steps + 1):
        tic = time.perf_counter()
        trainer.train_step(step)
        times.append(time.perf_counter() - tic)
    return build, statistics.median(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    import torch

    from diffdistill.cli import main as cli

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        cli(["encode-latents", str(RECIPE), "--to", f"{tmp}/latents"])
        encode = time.perf_counter() - tic
        common = ["sample_every=0", "checkpoint_every=100000", "resume=false"]
        rows = {"images": timed_run([f"out={tmp}/a", *common], args.steps),
                "latents": timed_run([f"out={tmp}/b", "data.source=latents", f"data.path={tmp}/latents", *common], args.steps)}
    (build_i, step_i), (build_l, step_l) = rows["images"], rows["latents"]
    print("| data | build the trainer (s) | step (ms, median) |\n|---|---:|---:|")
    print(f"| images, encoded at start | {build_i:.2f} | {1000 * step_i:.1f} |")
    print(f"| latent shards | {build_l:.2f} | {1000 * step_l:.1f} |")
    print(f"\nencode-latents once: {encode:.2f} s (CLI, imports included). Build ratio images / shards {build_i / build_l:.2f}x; "
          f"step ratio {step_i / step_l:.3f}. {args.steps} steps after one warm-up; load average {os.getloadavg()[0]:.2f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
