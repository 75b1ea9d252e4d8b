"""Many processes on CPU (gloo): every tiny recipe under DDP and FSDP2, and FSDP2 held against one process.

FSDP runs here exactly as on GPUs, through PyTorch's ``fully_shard`` with the gloo backend.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffdistill.config import ConfigError, load_recipe
from diffdistill.engine.checkpoint import optimizer_to_flat, read_state
from diffdistill.run import build_trainer, train

ROOT = Path(__file__).resolve().parent.parent
DMD2 = ROOT / "recipes" / "tiny" / "dmd2.yaml"
FAST = ["batch_size=4", "log_every=1", "sample_every=0", "mixed_precision=no"]
TINY_RECIPES = sorted(p.stem for p in (ROOT / "recipes" / "tiny").glob("*.yaml"))


def launch(args: list[str], port: int, timeout: int = 900) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-4000:]


def train_two(out: Path, port: int, *overrides: str) -> Path:
    launch(["-m", "diffdistill.cli", "train", str(DMD2), f"out={out}", *FAST, *overrides], port)
    return out


def checkpoint(run: Path, step: int) -> dict:
    """Every saved state dict, whole: from its file (unsharded) or its folder of shards (FSDP)."""
    folder = run / "checkpoints" / f"step-{step:08d}"
    saved = [p for p in folder.iterdir() if p.is_dir() or p.suffix == ".safetensors" and p.stem != "rng"]
    return {p.name.removesuffix(".safetensors"): read_state(p) for p in saved}


def shard_sizes(folder: Path) -> list[int]:
    """The number of elements each process's shard file holds."""
    sizes = []
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()  # a safetensors handle, not a dict: it does not iterate
            sizes.append(sum(math.prod(f.get_slice(name).get_shape()) for name in names))
    return sizes


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_every_tiny_recipe_runs_each_phase_on_two_processes(parallel, tmp_path, tiny_unet_dir):
    """Each recipe runs until every phase has run and one has run again (DMD2 with its GAN head: a critic step after
    a generator step); dmd2_tiers adds the shared-teacher LoRA critic, gradient checkpointing and a bf16 teacher.
    Under DDP, dmd2_folder reads its teacher from a pipeline folder: only the main process reads the weights."""
    folder = ["--folder", str(tiny_unet_dir)] if parallel == "ddp" else []  # the broadcast precedes sharding: once is enough
    launch([str(ROOT / "tests" / "multiprocess_recipes.py"), parallel, str(tmp_path), *folder], 29541 if parallel == "ddp" else 29542)
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted(results) == sorted([*TINY_RECIPES, "dmd2_tiers", *(["dmd2_folder"] if folder else [])])
    for name, result in results.items():
        assert result["phases"] == result["expected"], f"{name}: ran {result['phases']} of {result['expected']}"
        assert result["finite"] and result["checkpoint"], f"{name}: {result}"
        assert len(set(result["loading"]["rng"])) == 1, f"{name}: the processes' nets would start from different random states"
    if folder:
        main_reads, other_reads = results["dmd2_folder"]["loading"]["reads"]
        assert "UNet2DConditionModel" in main_reads and "CLIPTextModel" in main_reads  # the recorder sees the loads...
        assert other_reads == [], other_reads  # ...and the other process made none: it built the teacher on meta
        first, second = results["dmd2_folder"]["loading"]["teacher"]
        assert first == second, "the processes hold different teacher weights"


def test_fsdp_matches_one_process_resumes_exactly_and_exports(tmp_path):
    ema = "ema_decay=0.9"  # so an EMA is sharded, resumed and exported too
    one = train(load_recipe(DMD2, [f"out={tmp_path / 'one'}", "max_steps=4", "checkpoint_every=100", ema, *FAST]))
    whole = train_two(tmp_path / "fsdp", 29543, "parallel=fsdp", "max_steps=4", "checkpoint_every=2", ema)
    a, b = checkpoint(one, 4), checkpoint(whole, 4)
    assert sorted(a) == sorted(b) and all(sorted(a[f]) == sorted(b[f]) for f in a)  # the same state dicts and keys
    # written sharded: each process wrote its own file per state dict, holding part of it, and together all of it once
    for name, state in b.items():
        sizes, whole_size = shard_sizes(whole / "checkpoints" / "step-00000004" / name), sum(v.numel() for v in state.values())
        assert len(sizes) == 2 and max(sizes) < whole_size and sum(sizes) == whole_size, (name, sizes, whole_size)
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == ["latest", "step-00000002", "step-00000004"]
    # Gradients agree to float rounding (the reduce-scatter sums in another order). Adam divides by
    # sqrt(v), so a near-zero gradient's rounding can move a weight by up to lr per step: over 4 steps
    # at lr 1e-5 no weight may differ by more than 4e-5, and the typical weight far less.
    for name in ("net-generator", "net-critic", "net-gan_head"):
        diffs = torch.cat([(a[name][k] - b[name][k]).abs().flatten() for k in a[name]])
        assert diffs.max() <= 4e-5 and diffs.mean() <= 2e-6, f"{name}: max {diffs.max():.2e}, mean {diffs.mean():.2e}"

    # killed after its step-2 checkpoint and relaunched: ends bit for bit where the uninterrupted run did
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(whole / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    (resumed / "checkpoints" / "latest").write_text("step-00000002")
    train_two(resumed, 29544, "parallel=fsdp", "max_steps=4", "checkpoint_every=2", ema)
    c = checkpoint(resumed, 4)
    for name in b:
        assert all(torch.equal(b[name][k], c[name][k]) for k in b[name]), name

    # the sharded run's checkpoint resumes on one process, whole, and exports as an unsharded run does
    single = build_trainer(load_recipe(DMD2, [f"out={resumed}", "max_steps=6", "checkpoint_every=100", ema, *FAST]))
    assert single.resume() == 4
    assert all(torch.equal(v, c["net-generator"][k]) for k, v in single.method.nets["generator"].state_dict().items())
    assert all(torch.equal(v, c["ema-generator"][k]) for k, v in single.emas["generator"].state_dict().items())
    moments = optimizer_to_flat(single.optimizers["critic"].optimizer)[0]
    assert sorted(moments) == sorted(c["optim-critic"]) and all(torch.equal(moments[k], c["optim-critic"][k]) for k in moments)
    single.fit()
    assert (resumed / "checkpoints" / "step-00000006" / "net-generator.safetensors").is_file()
    from diffdistill.export import export_run

    for run in (one, whole):
        export_run(run, tmp_path / f"export-{run.name}")
    from diffusers import DiffusionPipeline

    images = []
    for run in (one, whole):
        pipe = DiffusionPipeline.from_pretrained(tmp_path / f"export-{run.name}")
        images.append(pipe("a digit 1", num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt").images)
    assert (images[0] - images[1]).abs().max() < 1e-3


def test_fsdp_needs_several_processes(tmp_path):
    with pytest.raises(ConfigError, match="accelerate launch"):
        train(load_recipe(DMD2, [f"out={tmp_path}", "parallel=fsdp", "max_steps=1"]))
    with pytest.raises(ConfigError, match="parallel=fsdp"):
        train(load_recipe(DMD2, [f"out={tmp_path}", "shard_teacher=true", "max_steps=1"]))
    with pytest.raises(ConfigError, match="choose one of"):
        train(load_recipe(DMD2, [f"out={tmp_path}", "parallel=deepspeed", "max_steps=1"]))
