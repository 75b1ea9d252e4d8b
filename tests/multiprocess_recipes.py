"""Run under `accelerate launch --num_processes 2`: every tiny recipe, long enough for each of its
phases to run at least once, under ``parallel=ddp`` or ``parallel=fsdp``. The main process writes
``OUT/results.json``: per recipe, the phases that ran and whether every logged loss was finite.
With ``--folder``, DMD2 runs once more on that pipeline folder as teacher (``dmd2_folder``), and
each process records which weights it read and a checksum of the teacher it ended with.

    accelerate launch --multi_gpu --num_processes 2 tests/multiprocess_recipes.py fsdp OUT [--folder TINY_SD] [recipe ...]
"""

import argparse
import contextlib
import hashlib
import json
import math
from pathlib import Path

import diffusers
import safetensors.torch
import torch
import transformers
from accelerate import Accelerator

from diffdistill.config import load_recipe
from diffdistill.engine.sharding import full_tensor
from diffdistill.run import build_trainer, teacher_networks

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


@contextlib.contextmanager
def recording_weight_reads(reads: list):
    """Appends to ``reads`` each model class loaded from files (diffusers' and transformers'
    ``from_pretrained``, through which a pipeline loads its networks) and each safetensors file read."""
    originals = {owner: owner.__dict__["from_pretrained"] for owner in (diffusers.ModelMixin, transformers.PreTrainedModel)}
    load_file = safetensors.torch.load_file

    def recorded(original):
        def from_pretrained(cls, *args, **kwargs):
            reads.append(cls.__name__)
            return original.__func__(cls, *args, **kwargs)
        return classmethod(from_pretrained)

    def recorded_load_file(path, *args, **kwargs):
        reads.append(str(path))
        return load_file(path, *args, **kwargs)

    for owner, original in originals.items():
        owner.from_pretrained = recorded(original)
    safetensors.torch.load_file = recorded_load_file
    try:
        yield
    finally:
        for owner, original in originals.items():
            owner.from_pretrained = original
        safetensors.torch.load_file = load_file


def teacher_checksum(teacher) -> str:
    """One digest of every parameter and buffer of the teacher's networks, bit for bit."""
    digest = hashlib.sha256()
    for name, module in sorted(teacher_networks(teacher).items()):
        for key, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{name}.{key}".encode())
            whole = full_tensor(tensor.detach())  # a LoRA critic under FSDP shards the teacher it shares
            digest.update(whole.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def per_process(value) -> list:
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def run(recipe: Path, parallel: str, out: Path, name: str, tiers: tuple = ()) -> dict:
    spec = load_recipe(recipe).method
    extra = [o for key, overrides in SMALL_PAIRS.items() if key in spec for o in overrides]
    cfg = load_recipe(recipe, [*TINY, *extra, *tiers, f"parallel={parallel}", f"out={out / name}", "max_steps=64"])
    reads = []
    with recording_weight_reads(reads):
        trainer = build_trainer(cfg)
    # per process: the weight files it read, the teacher it holds, the random state left for the nets' own init
    loading = {"reads": per_process(reads), "teacher": per_process(teacher_checksum(trainer.teacher)),
               "rng": per_process(hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest())}
    cfg.max_steps = steps_for_every_phase(trainer.method)
    trainer.fit()
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()] if trainer.accelerator.is_main_process else []
    losses = [v for row in rows for k, v in row.items() if k.startswith("loss")]
    return {"phases": sorted({row["phase"] for row in rows}), "expected": sorted(trainer.method.phases), "steps": cfg.max_steps,
            "finite": all(math.isfinite(v) for v in losses), "checkpoint": (out / name / "checkpoints" / "latest").is_file(),
            "loading": loading}


def main() -> None:
    torch.set_num_threads(1)
    # Many runs share this process: accelerate's end_training would destroy the process group after the first.
    Accelerator.end_training = lambda self: None
    parser = argparse.ArgumentParser()
    parser.add_argument("parallel", choices=["ddp", "fsdp"])
    parser.add_argument("out", type=Path)
    parser.add_argument("names", nargs="*", help="recipes to run (default: all)")
    parser.add_argument("--folder", help="a tiny pipeline folder: DMD2 runs on it as teacher too (dmd2_folder)")
    args = parser.parse_intermixed_args()  # recipe names may follow --folder
    parallel, out, names = args.parallel, args.out, args.names
    tiers = {**TIERS, "dmd2_folder": ("dmd2", [f"teacher={args.folder}", "teacher_dtype=bfloat16"])} if args.folder else TIERS
    recipes = [p for p in sorted((ROOT / "recipes" / "tiny").glob("*.yaml")) if not names or p.stem in names]
    results = {recipe.stem: run(recipe, parallel, Path(out), recipe.stem) for recipe in recipes}
    for name, (base, overrides) in tiers.items():
        if not names or name in names:
            results[name] = run(ROOT / "recipes" / "tiny" / f"{base}.yaml", parallel, Path(out), name, tuple(overrides))
    if torch.distributed.get_rank() == 0:
        (Path(out) / "results.json").write_text(json.dumps(results, indent=1))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
