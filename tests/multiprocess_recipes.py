"""Run under `accelerate launch --num_processes 2`: every tiny recipe, long enough for each of its
phases to run at least once, under ``parallel=ddp`` or ``parallel=fsdp``. The main process writes
``OUT/results.json``: per recipe, the phases that ran and whether every logged loss was finite.

    accelerate launch --multi_gpu --num_processes 2 tests/multiprocess_recipes.py fsdp OUT [recipe ...]
"""

import json
import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from diffdistill.config import load_recipe
from diffdistill.run import build_trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = ["batch_size=2", "checkpoint_every=1000", "sample_every=0", "log_every=1", "resume=false", "mixed_precision=no"]
# Memory tiers on top of a recipe: a LoRA student and a LoRA critic on one shared teacher, gradient
# checkpointing, a bf16 teacher.
TIERS = {"dmd2_tiers": ("dmd2", ["method.student_lora_rank=4", "method.critic_lora_rank=4", "gradient_checkpointing=true",
                                 "teacher_dtype=bfloat16"])}
SMALL_PAIRS = {"regression_pairs": ["method.regression_pairs=4", "method.regression_steps=2"], "pairs": ["method.pairs=4", "method.ode_steps=2"]}


def steps_for_every_phase(method, limit: int = 64) -> int:
    """The fewest steps in which every phase runs and one phase runs again after another one ran:
    the step that broke DDP with DMD2's GAN head was the first critic step after a generator step."""
    ran = []
    for step in range(limit):
        ran.append(method.phase(step))
        back = len(ran) > 1 and ran[-1] in ran[:-1] and (len(method.phases) == 1 or ran[-1] != ran[-2])
        if set(ran) >= set(method.phases) and back:
            return step + 1
    raise AssertionError(f"phases {method.phases} not all reached in {limit} steps")


def run(recipe: Path, parallel: str, out: Path, name: str, tiers: tuple = ()) -> dict:
    spec = load_recipe(recipe).method
    extra = [o for key, overrides in SMALL_PAIRS.items() if key in spec for o in overrides]
    cfg = load_recipe(recipe, [*TINY, *extra, *tiers, f"parallel={parallel}", f"out={out / name}", "max_steps=64"])
    trainer = build_trainer(cfg)
    cfg.max_steps = steps_for_every_phase(trainer.method)
    trainer.fit()
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()] if trainer.accelerator.is_main_process else []
    losses = [v for row in rows for k, v in row.items() if k.startswith("loss")]
    return {"phases": sorted({row["phase"] for row in rows}), "expected": sorted(trainer.method.phases), "steps": cfg.max_steps,
            "finite": all(math.isfinite(v) for v in losses), "checkpoint": (out / name / "checkpoints" / "latest").is_file()}


def main() -> None:
    torch.set_num_threads(1)
    # Many runs share this process: accelerate's end_training would destroy the process group after the first.
    Accelerator.end_training = lambda self: None
    parallel, out, *names = sys.argv[1:]
    recipes = [p for p in sorted((ROOT / "recipes" / "tiny").glob("*.yaml")) if not names or p.stem in names]
    results = {recipe.stem: run(recipe, parallel, Path(out), recipe.stem) for recipe in recipes}
    for name, (base, tiers) in TIERS.items():
        if not names or name in names:
            results[name] = run(ROOT / "recipes" / "tiny" / f"{base}.yaml", parallel, Path(out), name, tuple(tiers))
    if torch.distributed.get_rank() == 0:
        (Path(out) / "results.json").write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
