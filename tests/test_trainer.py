import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffdistill.config import load_recipe
from diffdistill.ema import EMA
from diffdistill.engine import checkpoint as ckpt
from diffdistill.engine.trainer import TrainingDiverged
from diffdistill.run import build_trainer, train

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "sft.yaml"
FAST = ["sample_every=0", "log_every=1", "batch_size=4"]


def weights(run_dir, step, kind="net"):
    return load_file(str(Path(run_dir) / "checkpoints" / f"step-{step:08d}" / f"{kind}-generator.safetensors"))


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"largest difference {worst}"


def test_stop_and_resume_is_exact(tmp_path):
    straight = train(load_recipe(RECIPE, [f"out={tmp_path / 'a'}", "max_steps=20", "checkpoint_every=100", *FAST]))
    train(load_recipe(RECIPE, [f"out={tmp_path / 'b'}", "max_steps=10", "checkpoint_every=100", *FAST]))
    resumed = train(load_recipe(RECIPE, [f"out={tmp_path / 'b'}", "max_steps=20", "checkpoint_every=100", *FAST]))
    assert_same(weights(straight, 20), weights(resumed, 20))
    assert_same(weights(straight, 20, "ema"), weights(resumed, 20, "ema"))
    # and training moved the weights: the comparison is not between two untouched copies
    first = weights(resumed, 10)
    assert max((first[k] - weights(resumed, 20)[k]).abs().max().item() for k in first) > 1e-4


def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    args = ["max_steps=4", "checkpoint_every=100", *FAST]
    one = train(load_recipe(RECIPE, [f"out={tmp_path / 'one'}", *args]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "diffdistill.cli", "train", str(RECIPE), f"out={tmp_path / 'two'}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    # gradients agree to float rounding (all-reduce order); Adam's first steps divide by sqrt(v), so a
    # near-zero gradient's rounding can move one weight by a fraction of lr: bound the mean, and the max loosely
    a, b = weights(one, 4), weights(tmp_path / "two", 4)
    start = build_trainer(load_recipe(RECIPE, [f"out={tmp_path / 'fresh'}"])).method.nets["generator"].state_dict()
    moved = torch.cat([(a[k] - start[k]).abs().flatten() for k in a]).mean()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert moved > 1e-5 and diff.mean() < 1e-3 * moved and diff.max() < 0.5 * 1e-4, (moved, diff.mean(), diff.max())
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, tmp_path / "two")]
    assert len(rows[1]) == 4  # the main process alone logs ...
    for a, b in zip(*rows):  # ... the global batch's loss and parts, as one process does
        for key in set(a) - {"it_per_s", "step", "phase"}:
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = load_recipe(RECIPE, [f"out={tmp_path}", "max_steps=6", "checkpoint_every=2", *FAST])
    trainer = build_trainer(cfg)
    original = trainer.method.generator_loss

    def poisoned(batch):
        loss, logs = original(batch)
        return (loss * float("nan") if batch["step"] == 3 else loss), logs

    trainer.method.generator_loss = poisoned
    with pytest.raises(TrainingDiverged, match=r"step 3: the generator loss is nan.*step-00000002"):
        trainer.fit()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"


def test_crash_mid_checkpoint_keeps_previous_latest(tmp_path, monkeypatch):
    train(load_recipe(RECIPE, [f"out={tmp_path}", "max_steps=2", "checkpoint_every=2", *FAST]))
    before = weights(tmp_path, 2)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "_write_json", crash)
    with pytest.raises(OSError):
        train(load_recipe(RECIPE, [f"out={tmp_path}", "max_steps=4", "checkpoint_every=2", *FAST]))
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000002" and not (tmp_path / "checkpoints" / "step-00000004").exists()
    assert_same(before, load_file(str(latest / "net-generator.safetensors")))


def test_optimizer_state_round_trips_without_pickle():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_to_flat(opt)
    other = torch.optim.AdamW(model.parameters(), lr=5.0)
    ckpt.optimizer_from_flat(other, tensors, meta)
    assert other.param_groups[0]["lr"] == 1e-3
    for a, b in zip(opt.state.values(), other.state.values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"])


def _stepped_linear(seed):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_sharded_layout_round_trips_on_one_process(tmp_path):
    """The sharded layout (a folder of safetensors shards per state dict, no pickle) written and read
    back without a process group: whole by read_state, and into a fresh model and optimizer."""
    model, opt = _stepped_linear(0)
    ema = EMA(model, 0.9)
    path = ckpt.save_checkpoint(tmp_path, 3, {"g": model}, {"g": ema}, {"g": opt}, {"note": 1}, sharded=True)
    assert sorted(p.name for p in (path / "net-g").iterdir()) == ["shard-00001-model-00001-of-00001.safetensors"]
    assert not list(path.rglob("*.metadata")) and not list(path.rglob("*.pt"))  # nothing pickled
    assert_same(ckpt.read_state(ckpt.saved_state(path, "net-g")), model.state_dict())
    fresh, _ = _stepped_linear(1)
    fresh_ema = EMA(fresh, 0.9)
    state = ckpt.load_checkpoint(path, {"g": fresh}, {"g": fresh_ema}, {"g": torch.optim.AdamW(fresh.parameters(), lr=5.0)})
    assert state["step"] == 3 and state["note"] == 1
    assert_same(fresh.state_dict(), model.state_dict())
    assert_same(fresh_ema.state_dict(), ema.state_dict())
    restored = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    ckpt.load_checkpoint(path, {}, {}, {"g": restored})
    assert restored.param_groups[0]["lr"] == 1e-3
    assert_same(ckpt.optimizer_to_flat(restored)[0], ckpt.optimizer_to_flat(opt)[0])


def test_pruning_keeps_the_checkpoint_latest_names(tmp_path):
    model, opt = _stepped_linear(0)
    for step in (4, 6, 2):  # a run restarted from scratch in an old folder writes step 2 last
        ckpt.save_checkpoint(tmp_path, step, {"g": model}, {}, {"g": opt}, {}, keep=2)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000006"]


def test_run_folder_holds_resolved_config_and_grid(tmp_path):
    run = train(load_recipe(RECIPE, [f"out={tmp_path}", "max_steps=2", "sample_every=2", "sample_steps=2", "batch_size=4"]))
    text = (run / "config.yaml").read_text()
    assert "max_steps: 2" in text and "name: sft" in text
    from PIL import Image

    grid = Image.open(run / "samples" / "step-00000002.png")
    assert grid.size[0] >= 256


def test_time_limit_stops_with_a_checkpoint_and_resumes(tmp_path):
    args = [f"out={tmp_path / 'run'}", "max_steps=50", "checkpoint_every=100", *FAST]
    train(load_recipe(RECIPE, [*args, "time_limit_minutes=1e-9"]))  # passed as soon as the first step ends
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000001"
    train(load_recipe(RECIPE, [*args, "max_steps=3"]))  # no limit: resumes from step 1 and finishes
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000003"
