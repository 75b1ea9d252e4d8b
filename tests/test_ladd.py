"""LADD (diffdistill/methods/ladd.py): discriminator heads on several blocks of the frozen teacher,
the hinge and non-saturating losses, and the one-step student on ring8."""

import math
from pathlib import Path

import pytest
import torch
from toy_repair import assert_repairs_shrunk_ring8

from diffdistill.config import ConfigError, TrainConfig, load_recipe
from diffdistill.methods.adversarial import discriminator_adversarial_loss, generator_adversarial_loss
from diffdistill.methods.base import build_method
from diffdistill.run import build_trainer
from diffdistill.scores import block_output
from diffdistill.toy import METHOD_DEFAULTS, ring8, toy_teacher

ROOT = Path(__file__).resolve().parent.parent


def ladd_trainer(tmp_path, *overrides):
    """The tiny recipe on a tiny UNet teacher (two down blocks and a mid block: three heads), one head update per generator update."""
    cfg = load_recipe(ROOT / "recipes" / "tiny" / "ladd.yaml", ["teacher=tiny:unet", f"out={tmp_path}", "method.ratio=1", "sample_every=0",
                                                             "log_every=1", "method.teacher_samples=8", "method.teacher_steps=2", *overrides])
    return build_trainer(cfg)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_losses_match_a_hand_computation():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])   # two samples, two heads
    fake = torch.tensor([[0.5, -2.0], [1.5, -0.5]])
    # hinge: max(0, 1 - real) + max(0, 1 + fake), summed over heads; generator -fake
    torch.testing.assert_close(discriminator_adversarial_loss(real, fake, "hinge"), torch.tensor([0 + 0.5 + 1.5 + 0, 2 + 1 + 2.5 + 0.5]))
    torch.testing.assert_close(generator_adversarial_loss(fake, "hinge"), torch.tensor([1.5, -1.0]))
    # non-saturating: softplus(-real) + softplus(fake); generator softplus(-fake)
    expected = [softplus(-2) + softplus(-0.5) + softplus(0.5) + softplus(-2), softplus(1) + softplus(0) + softplus(1.5) + softplus(-0.5)]
    torch.testing.assert_close(discriminator_adversarial_loss(real, fake, "nonsaturating"), torch.tensor(expected))
    torch.testing.assert_close(generator_adversarial_loss(fake, "nonsaturating"), torch.tensor([softplus(-0.5) + softplus(2), softplus(-1.5) + softplus(0.5)]))


def test_the_teacher_never_changes_nor_gets_a_gradient_across_both_phases(tmp_path):
    trainer = ladd_trainer(tmp_path)
    method, teacher = trainer.method, trainer.method.teacher.backbone
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    heads_before = [p.clone() for p in method.nets["heads"].parameters()]
    student_before = [p.clone() for p in method.nets["generator"].parameters()]
    logs = [trainer.train_step(step) for step in range(2)]
    assert [log["phase"] for log in logs] == ["critic", "generator"]
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # bitwise
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    # the steps did train what they own: the heads in the critic phase, the student in the generator phase
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, method.nets["heads"].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(student_before, method.nets["generator"].parameters()))


def test_the_heads_read_the_teacher_not_the_student(tmp_path):
    trainer = ladd_trainer(tmp_path)
    method = trainer.method
    x = torch.randn((trainer.cfg.batch_size, *method.teacher.latent_shape), generator=torch.Generator().manual_seed(0))

    def logits():
        batch = trainer.make_batch(0, 0)  # the same t and noise each call
        return method.logits(x, batch["cond"], batch["rng"], grad=False)

    base = logits()
    with torch.no_grad():
        for p in method.nets["generator"].parameters():
            p.mul_(0.0)
    assert torch.equal(logits(), base)  # the student's weights play no part
    with torch.no_grad():
        for p in method.teacher.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(logits(), base)


def test_a_head_on_each_teacher_block_and_every_head_learns(tmp_path):
    trainer = ladd_trainer(tmp_path)
    method, unet = trainer.method, trainer.method.teacher.backbone
    heads = method.nets["heads"].heads
    widths = [*unet.config.block_out_channels, unet.config.block_out_channels[-1]]  # down blocks, then the mid block
    assert [head.inp.in_features for head in heads] == widths
    loss, _ = method.critic_loss(trainer.make_batch(0, 0))
    loss.mean().backward()
    assert all(head.inp.weight.grad.abs().sum() > 0 for head in heads)
    picked = ladd_trainer(tmp_path / "mid", "method.feature_layers=[-1]").method.nets["heads"].heads
    assert [head.inp.in_features for head in picked] == widths[-1:]


def test_the_generator_gradient_flows_through_the_teacher_features_into_the_student(tmp_path):
    trainer = ladd_trainer(tmp_path)
    method, unet = trainer.method, trainer.method.teacher.backbone
    features = []

    def keep(module, args, output):
        out = block_output(output)
        out.retain_grad()
        features.append(out)

    handles = [m.register_forward_hook(keep) for m in [*unet.down_blocks, unet.mid_block]]
    try:
        loss, _ = method.generator_loss(trainer.make_batch(1, 0))
    finally:
        for h in handles:
            h.remove()
    loss.mean().backward()
    assert len(features) == 3 and all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    assert sum(p.grad.abs().sum() for p in method.nets["generator"].parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in unet.parameters())


def test_the_exact_toy_teacher_gives_three_feature_layers():
    teacher = toy_teacher(ring8())
    method = build_method(METHOD_DEFAULTS["ladd"] | {"teacher_samples": 4, "teacher_steps": 2}, teacher, TrainConfig())
    assert [head.inp.in_features for head in method.nets["heads"].heads] == [2, 8, 2]  # x_t, the posterior over 8 modes, x0


@pytest.mark.parametrize("option, message", [("method.loss=wasserstein", "hinge, nonsaturating"), ("method.real=web", "teacher, data"),
                                             ("method.feature_layers=[5]", "has 3")])
def test_bad_options_are_one_line_errors(tmp_path, option, message):
    with pytest.raises(ConfigError, match=message):
        ladd_trainer(tmp_path, option)


def test_repairs_a_shrunk_ring_to_the_floors(tmp_path, one_thread):
    """Shipped toy settings (hinge, 4:1, t ~ sigmoid(N(-1, 1)), generator lr 3e-5), 100 generator steps from the
    shrunk-ring kd warm start: ED 0.0077 at the end (0.032 at the start), all 8 modes, mass ratios 0.94-1.07; 19 s at
    load 3.5 with the kd warm start (shared with the other toy repair tests in one process), 80 s at load 8."""
    assert_repairs_shrunk_ring8("ladd", 100, tmp_path)
