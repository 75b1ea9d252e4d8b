"""Memory tiers as recipe keys: the shared-teacher LoRA critic, gradient checkpointing, low-precision
teacher, 8-bit AdamW; each runs on a tiny model (with FSDP: tests/test_multiprocess.py)."""

import sys
from pathlib import Path

import pytest
import torch

from diffdistill.config import ConfigError, load_recipe
from diffdistill.run import build_trainer
from diffdistill.teachers import resolve_teacher

ROOT = Path(__file__).resolve().parent.parent
DMD2 = ROOT / "recipes" / "tiny" / "dmd2.yaml"
FAST = ["batch_size=2", "log_every=1", "sample_every=0", "checkpoint_every=100", "resume=false"]


def trainer_for(tmp_path, *overrides):
    return build_trainer(load_recipe(DMD2, [f"out={tmp_path}", *FAST, *overrides]))


def probe(denoiser):
    g, cfg = torch.Generator().manual_seed(3), denoiser.backbone.config
    x = torch.randn((2, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 7, cfg.cross_attention_dim, generator=g)}
    with torch.no_grad():
        return denoiser(x, torch.tensor([500.0, 900.0]), cond)


def test_lora_critic_shares_the_teachers_weights_and_leaves_the_teacher_unchanged(tmp_path):
    trainer = trainer_for(tmp_path, "method.critic_lora_rank=4", "max_steps=4")
    teacher, critic = trainer.teacher, trainer.method.nets["critic"]
    critic = getattr(critic, "module", critic)
    assert critic.backbone is teacher.backbone
    # one copy of the teacher in the process: every critic weight is a teacher weight or a LoRA adapter
    teacher_storages = {p.untyped_storage().data_ptr() for p in teacher.backbone.parameters() if not p.requires_grad}
    critic_frozen = {p.untyped_storage().data_ptr() for p in critic.parameters() if not p.requires_grad}
    assert critic_frozen == teacher_storages
    assert all("lora_" in n for n, p in critic.named_parameters() if p.requires_grad)

    reference = probe(resolve_teacher("tiny:unet").denoiser())  # the same seeded teacher, never touched
    trainer.fit()
    torch.testing.assert_close(probe(teacher.denoiser()), reference, rtol=0, atol=0)  # adapters off: the teacher, bit for bit
    assert (probe(critic) - reference).abs().max() > 1e-6  # adapters on: the trained fake score


def saved_activation_bytes(trainer) -> int:
    """Bytes autograd keeps for backward during one generator loss (with grad)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    batch = trainer.make_batch(2, 0)  # step 2 is a generator step of the tiny dmd2 recipe (ratio 2)
    assert trainer.method.phase(2) == "generator"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = trainer.method.generator_loss(batch)
    loss.mean().backward()
    return total


def test_gradient_checkpointing_keeps_the_losses_and_cuts_saved_activations(tmp_path):
    plain, ckpt = trainer_for(tmp_path / "a", "max_steps=3"), trainer_for(tmp_path / "b", "max_steps=3", "gradient_checkpointing=true")
    backbone = ckpt.method.nets["generator"].backbone
    assert backbone.is_gradient_checkpointing and ckpt.method.nets["critic"].backbone.is_gradient_checkpointing
    assert saved_activation_bytes(ckpt) < 0.5 * saved_activation_bytes(plain)
    plain, ckpt = trainer_for(tmp_path / "c", "max_steps=3"), trainer_for(tmp_path / "d", "max_steps=3", "gradient_checkpointing=true")
    logs = [[plain.train_step(s), ckpt.train_step(s)] for s in range(3)]
    for a, b in logs:  # recomputation repeats the same float operations: the same losses
        assert a[f"loss_{a['phase']}"] == b[f"loss_{b['phase']}"]


def test_low_precision_teacher_runs(tmp_path):
    trainer = trainer_for(tmp_path, "teacher_dtype=bfloat16", "method.critic_lora_rank=4", "max_steps=3")
    assert next(trainer.teacher.backbone.parameters()).dtype == torch.bfloat16
    trainer.fit()
    assert (tmp_path / "checkpoints" / "latest").is_file()


def test_bad_tier_settings_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without it
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        trainer_for(tmp_path, "optimizer=adamw8bit")
    with pytest.raises(ConfigError, match="choose one of"):
        trainer_for(tmp_path, "optimizer=sgd")
    with pytest.raises(ConfigError, match="drop cpu_offload"):
        trainer_for(tmp_path, "cpu_offload=true", "parallel=fsdp")
