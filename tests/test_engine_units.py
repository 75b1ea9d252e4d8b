"""The trainer's arithmetic against hand-computed values: EMA, learning-rate warm-up, gradient accumulation."""

from pathlib import Path

import torch

from diffdistill.config import load_recipe
from diffdistill.ema import EMA
from diffdistill.engine.trainer import lr_at
from diffdistill.run import build_trainer

ROOT = Path(__file__).resolve().parent.parent


def test_ema_follows_its_formula():
    net = torch.nn.Linear(2, 1)
    net.register_buffer("count", torch.tensor(3))
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(net, decay=0.9)
    for target in ([[3.0, 0.0]], [[5.0, -2.0]]):
        with torch.no_grad():
            net.weight.copy_(torch.tensor(target))
        net.count += 1
        ema.update(net)
    # 0.9 * (0.9 * w0 + 0.1 * w1) + 0.1 * w2, element by element
    expected = torch.tensor([[0.81 * 1 + 0.09 * 3 + 0.1 * 5, 0.81 * 2 + 0.09 * 0 + 0.1 * -2]])
    torch.testing.assert_close(ema.state_dict()["weight"], expected, rtol=0, atol=1e-6)
    assert ema.state_dict()["count"].item() == 5  # integer buffers are copied, not averaged


def test_learning_rate_warms_up_linearly_then_stays():
    assert [lr_at(s, 1e-3, 4) for s in (0, 1, 3, 4, 100)] == [2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3]
    assert lr_at(0, 1e-3, 0) == 1e-3


def test_gradient_accumulation_is_one_step_at_the_same_global_batch(tmp_path):
    """Two micro-batches of 2 accumulate the gradient of one batch of 4: the same update."""
    recipe = ROOT / "recipes" / "tiny" / "sft.yaml"
    common = ["batch_size=4", "sample_every=0", "checkpoint_every=100", "resume=false", "optim.lr=1e-3", "optim.warmup_steps=0"]
    weights = []
    for accumulation in (1, 2):
        trainer = build_trainer(load_recipe(recipe, [f"out={tmp_path / str(accumulation)}", f"grad_accum={accumulation}", *common]))
        start = {k: v.clone() for k, v in trainer.method.nets["generator"].state_dict().items()}
        trainer.train_step(0)
        weights.append(trainer.method.nets["generator"].state_dict())
    moved = torch.cat([(weights[0][k] - start[k]).abs().flatten() for k in start])
    differ = torch.cat([(weights[0][k] - weights[1][k]).abs().flatten() for k in start])
    # Adam's first step is lr * g / (|g| + eps): a near-zero gradient's summation order can move its weight
    # by up to lr, so bound the mean tightly and the max loosely (other noise per micro-batch: max 2 lr, mean ~lr)
    assert moved.mean() > 1e-4 and differ.mean() < 1e-3 * moved.mean() and differ.max() < 0.1 * 1e-3, (moved.mean(), differ.mean(), differ.max())


def test_a_manifest_takes_entries_hashed_by_the_process_that_wrote_the_shards(tmp_path):
    """Sharded checkpoints: each process hashes its share of the shard files; the main process writes
    those entries as given (here one is wrong on purpose: verify then names that file) and hashes the rest."""
    from diffdistill.engine.manifest import file_entries, verify, write_manifest
    from diffdistill.engine.sharded_checkpoint import hash_shards_together

    (tmp_path / "net-generator").mkdir()
    for i in range(3):
        (tmp_path / "net-generator" / f"shard-{i}.safetensors").write_bytes(bytes([i]) * (100 + i))
    (tmp_path / "state.json").write_text("{}")
    shards = hash_shards_together(tmp_path)
    assert sorted(shards) == [f"net-generator/shard-{i}.safetensors" for i in range(3)]  # not state.json: the main process's own
    assert shards == file_entries(tmp_path, sorted((tmp_path / "net-generator").iterdir()))
    write_manifest(tmp_path, shards)
    assert verify(tmp_path) is None
    wrong = {**shards, "net-generator/shard-1.safetensors": {**shards["net-generator/shard-1.safetensors"], "sha256": "0" * 64}}
    write_manifest(tmp_path, wrong)
    assert verify(tmp_path) == "net-generator/shard-1.safetensors does not match its sha256"
