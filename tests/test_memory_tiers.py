"""Memory tiers as recipe keys: the shared-teacher LoRA critic, gradient checkpointing, low-precision
teacher, 8-bit AdamW; each runs on a tiny model (with FSDP: tests/test_multiprocess.py)."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffdistill.config import ConfigError, load_recipe
from diffdistill.export import export_run, load_student
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


def storages(module) -> set:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_lora_student_and_critic_share_one_teacher_train_apart_and_export_as_a_lora(tmp_path):
    trainer = trainer_for(tmp_path / "run", "method.student_lora_rank=4", "method.critic_lora_rank=4", "max_steps=6", "ema_decay=0.5")
    teacher, nets = trainer.teacher, trainer.method.nets
    student, critic = nets["generator"], nets["critic"]
    assert student.backbone is critic.backbone is teacher.backbone  # one network in the process, three roles
    assert storages(student) == storages(critic) == storages(teacher.backbone)
    own = {name: {id(p) for p in params} for name, params in trainer.trained.items()}
    assert own["generator"] and own["critic"] and not own["generator"] & own["critic"]  # each optimizer steps its own adapter
    reference = probe(resolve_teacher("tiny:unet").denoiser())
    trainer.fit()
    torch.testing.assert_close(probe(teacher.denoiser()), reference, rtol=0, atol=0)  # adapters off: the teacher, bit for bit
    assert (probe(student) - reference).abs().max() > 1e-6 and (probe(student) - probe(critic)).abs().max() > 1e-6

    saved = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000006" / "net-generator.safetensors"))
    assert saved and all(".lora_" in k and ".student." in k for k in saved)  # the adapter, not a copy of the teacher
    assert set(load_file(str(tmp_path / "run" / "checkpoints" / "step-00000006" / "ema-generator.safetensors"))) == set(saved)

    loaded = load_student(tmp_path / "run", ema=False)
    torch.testing.assert_close(probe(loaded.denoiser()), probe(student), rtol=1e-5, atol=1e-5)  # merged W + BA = the student
    info = export_run(tmp_path / "run", tmp_path / "lora", fmt="lora", ema=False)
    assert info["source"] == "adapters" and info["max_abs_output_diff"] < 1e-4  # the adapters as trained, applied by diffusers


def test_lora_student_on_a_full_critic_and_the_methods_that_need_a_full_student(tmp_path):
    trainer = trainer_for(tmp_path, "method.student_lora_rank=4", "max_steps=2")
    critic = trainer.method.nets["critic"]
    assert not storages(critic) & storages(trainer.teacher.backbone)  # the critic is a full copy ...
    assert not any("lora_" in n for n, _ in critic.named_parameters())  # ... of the teacher alone, not of its student's adapters
    trainer.fit()
    with pytest.raises(ConfigError, match="trains a full student.*dmd2"):
        build_trainer(load_recipe(ROOT / "recipes" / "tiny" / "cd.yaml", [f"out={tmp_path / 'cd'}", "method.student_lora_rank=4"]))


def input_gradient(denoiser) -> torch.Tensor:
    g, cfg = torch.Generator().manual_seed(4), denoiser.backbone.config
    x = torch.randn((2, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g).requires_grad_(True)
    cond = {"encoder_hidden_states": torch.randn(2, 7, cfg.cross_attention_dim, generator=g)}
    out = denoiser(x, torch.tensor([500.0, 900.0]), cond)
    return torch.autograd.grad(out.square().sum(), x)[0]


def test_checkpointed_blocks_recompute_with_their_own_adapters(tmp_path):
    """Teacher, LoRA student and LoRA critic share one checkpointed base: each backward (the teacher's
    input gradient for SiD/SIM, the student's, the critic's) recomputes blocks with the adapters set
    as in its own forward, so checkpointing changes no gradient."""
    trainer = trainer_for(tmp_path, "method.student_lora_rank=4", "method.critic_lora_rank=4", "gradient_checkpointing=true", "max_steps=3")
    trainer.fit()  # adapters no longer zero
    roles = [trainer.teacher.denoiser(), trainer.method.nets["generator"], trainer.method.nets["critic"]]
    checkpointed = [input_gradient(role) for role in roles]
    trainer.teacher.backbone.disable_gradient_checkpointing()
    plain = [input_gradient(role) for role in roles]
    assert (plain[0] - plain[1]).abs().max() > 1e-4 and (plain[1] - plain[2]).abs().max() > 1e-4  # three different functions
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def final_weights(run) -> dict:
    folder = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return {f.name: load_file(str(f)) for f in sorted(folder.glob("net-*.safetensors"))}


def test_optimizer_offload_steps_as_adamw_does_and_resumes_exactly(tmp_path):
    trainer_for(tmp_path / "plain", "max_steps=4").fit()
    offloaded = trainer_for(tmp_path / "offload", "max_steps=4", "optimizer_offload=true", "checkpoint_every=2")
    offloaded.fit()
    state = offloaded.optimizers["critic"].optimizer.state
    params = {p.untyped_storage().data_ptr() for p in offloaded.method.nets["critic"].parameters()}
    assert state and all(v.device.type == "cpu" and v.untyped_storage().data_ptr() not in params
                         for s in state.values() for v in s.values() if v.ndim)  # moments on the host, beside host copies
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "offload")
    assert a.keys() == b.keys() and all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])  # the same AdamW updates

    resumed = tmp_path / "resumed"  # from the step-2 checkpoint: the host copies must follow the loaded weights
    (resumed / "checkpoints").mkdir(parents=True)
    (tmp_path / "offload" / "checkpoints" / "step-00000002").rename(resumed / "checkpoints" / "step-00000002")
    (resumed / "checkpoints" / "latest").write_text("step-00000002")
    trainer_for(resumed, "max_steps=4", "optimizer_offload=true", "resume=true").fit()
    c = final_weights(resumed)
    assert all(torch.equal(b[f][k], c[f][k]) for f in b for k in b[f])
    with pytest.raises(ConfigError, match="cpu_offload"):
        trainer_for(tmp_path / "x", "optimizer_offload=true", "parallel=fsdp")
