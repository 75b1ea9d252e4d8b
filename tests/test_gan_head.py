"""DMD2's patch GAN head (its SD1.5 ``cls_pred_branch``) beside the pooled default."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.config import TrainConfig, load_recipe
from diffdistill.methods import build_method
from diffdistill.methods.adversarial import discriminator_loss, generator_gan_loss, per_sample
from diffdistill.randomness import BatchRandom
from diffdistill.run import build_trainer
from diffdistill.scores import GANHead
from diffdistill.toy import ring8, toy_teacher

ROOT = Path(__file__).resolve().parent.parent


def test_on_an_sd15_sized_bottleneck_the_patch_head_is_dmd2s_layers_giving_one_logit():
    head = GANHead(64, 4, kind="patch", size=8)
    convs = [m for m in head.net if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((4, 4), (2, 2), (1, 1)), ((4, 4), (4, 4), (0, 0)), ((1, 1), (1, 1), (0, 0))]
    assert [type(m) for m in head.net][:6] == [nn.Conv2d, nn.GroupNorm, nn.SiLU] * 2
    assert head(torch.randn(3, 64, 8, 8)).shape == (3,)


@pytest.mark.parametrize("size, patches", [(16, 4), (4, 1), (2, 1)])
def test_larger_maps_give_a_logit_per_patch_and_smaller_ones_shrink_the_second_kernel(size, patches):
    out = GANHead(32, 4, kind="patch", size=size)(torch.randn(2, 32, size, size))
    assert out.shape == ((2, patches) if patches > 1 else (2,))


def test_patch_losses_average_over_patches_per_sample():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    expected = torch.stack([F.softplus(-row).mean() for row in logits])
    torch.testing.assert_close(per_sample(F.softplus(-logits)), expected)
    torch.testing.assert_close(per_sample(torch.tensor([0.3, 0.7])), torch.tensor([0.3, 0.7]))  # a pooled head's pass through


def test_dmd2_trains_with_the_patch_head_in_both_phases(tmp_path):
    cfg = load_recipe(ROOT / "recipes" / "tiny" / "dmd2.yaml", [f"out={tmp_path}", "method.gan_head=patch", "method.ratio=1", "max_steps=2",
                                                             "sample_every=0", "log_every=1"])
    trainer = build_trainer(cfg)
    assert isinstance(trainer.method.nets["gan_head"].net[0], nn.Conv2d) and trainer.method.nets["gan_head"].net[0].kernel_size == (4, 4)
    logs = [trainer.train_step(step) for step in range(2)]
    assert {log["phase"] for log in logs} == {"critic", "generator"}
    assert all(torch.isfinite(torch.tensor(log[key])) for log in logs for key in log if key.startswith("loss_"))


def test_a_patch_head_on_token_features_is_refused():
    with pytest.raises(ValueError, match="patch needs image features"):
        GANHead(32, 3, kind="patch")


def test_both_gan_losses_reduce_a_patch_heads_logits_per_sample():
    fake_logits, real_logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]]), torch.tensor([[1.0, 3.0], [-2.0, 0.5]])
    engine = type("Engine", (), {"gan_logits": lambda self, x_t, t, cond: x_t})()
    loss, _ = discriminator_loss(engine, (fake_logits, None), (real_logits, None), {})
    torch.testing.assert_close(loss, (F.softplus(fake_logits) + F.softplus(-real_logits)).mean(1))
    torch.testing.assert_close(generator_gan_loss(engine, fake_logits, None, {})[0], F.softplus(-fake_logits).mean(1))


# ---- the shared GAN term (methods/adversarial.GANTerm) in each method that carries one --------------


def _toy_method(name: str, **options):
    teacher = toy_teacher(ring8(), generator_width=32, generator_depth=2, critic_width=32, critic_depth=2)
    return build_method({"name": name, "gan_weight": 0.3, "gan_critic_weight": 0.7, **options}, teacher, TrainConfig(teacher="exact:ring8", out="unused"))


def _toy_batch(seed: int, real: bool = True) -> dict:
    out = {"prompts": [""] * 16, "cond": {}, "uncond": {}, "rng": BatchRandom(seed), "step": 0}
    return {**out, "x0": ring8().sample(16, torch.Generator().manual_seed(seed))} if real else out


@pytest.mark.parametrize("name", ["dmd", "dmd2", "sid", "sim", "fdistill", "diff_instruct"])
def test_each_gan_method_adds_its_weights_times_the_gan_losses_and_trains_the_head(name):
    """The GAN draws come after the method's own, so at a second weight only the GAN part moves:
    L(w2) - L(w1) = (w2 - w1) softplus(-l), whose gradient reaches the generator (x keeps its graph);
    the critic phase trains the head, on real images, and says so when they are missing."""
    method = _toy_method(name)
    generator, head = method.nets["generator"], method.nets["gan_head"]
    at_03, logs = method.generator_loss(_toy_batch(3))
    method.gan.weight = 0.8
    at_08, _ = method.generator_loss(_toy_batch(3))
    torch.testing.assert_close((at_08 - at_03).mean(), torch.tensor(0.5 * logs["loss_gan_g"]), rtol=1e-4, atol=1e-6)
    assert logs["loss_gan_g"] > 0
    grads = torch.autograd.grad((at_08 - at_03).mean(), list(generator.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)

    assert method.phase_nets("critic")[-1] == "gan_head"
    at_07, logs = method.critic_loss(_toy_batch(5))
    method.gan.critic_weight = 1.2
    at_12, _ = method.critic_loss(_toy_batch(5))
    torch.testing.assert_close((at_12 - at_07).mean(), torch.tensor(0.5 * logs["loss_gan_d"]), rtol=1e-4, atol=1e-6)
    at_12.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    with pytest.raises(ValueError, match="needs real images"):
        method.critic_loss(_toy_batch(5, real=False))


@pytest.mark.parametrize("name", ["dmd", "dmd2", "sid", "sim", "diff_instruct"])
def test_without_a_gan_weight_there_is_no_head_and_no_real_images_are_needed(name):
    method = _toy_method(name, gan_weight=0.0)
    assert "gan_head" not in method.nets and method.phase_nets("critic") == ["critic"]
    loss, logs = method.critic_loss(_toy_batch(5, real=False))
    assert torch.isfinite(loss).all() and "loss_gan_d" not in logs
