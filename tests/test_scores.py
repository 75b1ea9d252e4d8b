import pytest
import torch
from torch import nn

from diffdistill.conditioning import encode_prompts
from diffdistill.config import ConfigError
from diffdistill.denoiser import Denoiser
from diffdistill.methods import build_method
from diffdistill.sampling import cfg_combine
from diffdistill.schedules import VPSchedule
from diffdistill.scores import FeatureTap, ScoreEngine, block_output, can_stop_early, guided, make_critic
from diffdistill.teachers import resolve_teacher
from diffdistill.toy import SD15_SCHEDULE, ring8, toy_teacher


class Affine(nn.Module):
    """D(x | c) = x + c: the conditional output is known, so guidance can be checked exactly."""

    backbone_kind = "plain"

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, timestep, cond):
        return self.w * x + cond["shift"]


def test_guidance_convention_is_uncond_plus_w_times_difference():
    denoiser = Denoiser(Affine(), VPSchedule.from_scheduler_config(SD15_SCHEDULE), "sample")
    x, t = torch.zeros(2, 3), torch.tensor([10.0, 500.0])
    cond, uncond = {"shift": torch.full((2, 3), 2.0)}, {"shift": torch.full((2, 3), 0.5)}
    # uncond + w (cond - uncond) = 0.5 + 3 * 1.5 = 5.0 (Imagen's c + w (c - u) would give 6.5)
    torch.testing.assert_close(guided(denoiser, x, t, cond, uncond, 3.0), torch.full((2, 3), 5.0))
    torch.testing.assert_close(guided(denoiser, x, t, cond, uncond, 1.0), torch.full((2, 3), 2.0))
    per_sample = guided(denoiser, x, t, cond, uncond, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(per_sample[:, 0], torch.tensor([2.0, 5.0]))
    assert cfg_combine(torch.tensor(1.0), torch.tensor(2.0), 0.0) == 1.0


def test_lora_critic_trains_only_adapters_and_starts_at_the_teacher():
    teacher = resolve_teacher("tiny:unet")
    critic = make_critic(teacher, lora_rank=4)
    trainable = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    cond = {"encoder_hidden_states": torch.randn(1, 32, 32)}
    engine = ScoreEngine(teacher, {"critic": critic})
    torch.testing.assert_close(engine.fake(x, t, cond, grad=False), engine.real(x, t, cond), atol=1e-5, rtol=0)


def test_bad_method_settings_are_clear_errors():
    teacher = toy_teacher(ring8())
    with pytest.raises(ConfigError, match="ratio=0"):
        build_method({"name": "dmd2", "ratio": 0}, teacher, _cfg())
    with pytest.raises(ConfigError, match="outside the schedule"):
        build_method({"name": "dmd2", "timesteps": [1500]}, teacher, _cfg())
    with pytest.raises(ConfigError, match="must decrease"):
        build_method({"name": "dmd2", "timesteps": [249, 999]}, teacher, _cfg())


def test_gan_head_on_a_backbone_without_features_is_refused():
    teacher = toy_teacher(ring8())
    teacher.make_critic = lambda: _NoFeatures()
    with pytest.raises(ConfigError, match="GAN head needs features.*gan_weight=0"):
        build_method({"name": "dmd2", "gan_weight": 1e-3}, teacher, _cfg())


class _NoFeatures(nn.Module):
    backbone_kind = "plain"

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, timestep, cond):
        return self.lin(x)


def _cfg():
    from diffdistill.config import TrainConfig

    return TrainConfig()


def test_gan_head_reads_the_image_tokens_of_a_joint_transformer():
    """SD3's last joint block returns (None, image tokens); earlier ones (text tokens, image tokens)."""
    teacher = resolve_teacher("tiny:sd3")
    method = build_method({"name": "dmd2", "gan_weight": 1e-3}, teacher, _cfg())
    channels, height, width = teacher.latent_shape
    patch = teacher.backbone.config.patch_size
    x, t = torch.randn(2, channels, height, width), torch.full((2,), 0.5 * teacher.schedule.t_max)
    cond = encode_prompts(teacher.pipe, ["a cat", "a dog"], "cpu")
    tap = FeatureTap(method.nets["critic"].backbone)
    with torch.no_grad(), tap.reading():
        method.nets["critic"](x, t, cond)
    assert tap.value.shape[:2] == (2, (height // patch) * (width // patch))
    logits = method.engine.gan_logits(x, t, cond)
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_block_output_is_the_image_features_of_every_block_kind():
    """A joint block's (text, image) and SD3's last (None, image) give the image tokens; a UNet down block's
    (hidden states, skip tuple) its hidden states; a plain tensor itself. LADD taps the joint blocks."""
    text, image, skips = torch.zeros(2, 3, 8), torch.ones(2, 5, 8), (torch.full((2, 4), 2.0),)
    assert block_output((text, image)) is image
    assert block_output((None, image)) is image
    assert block_output((image, skips)) is image
    assert block_output(image) is image


def _unet_dmd2_with_gan_head():
    teacher = resolve_teacher("tiny:unet")
    method = build_method({"name": "dmd2", "gan_weight": 1e-3}, teacher, _cfg())
    x = torch.randn(2, *teacher.latent_shape, requires_grad=True)
    return method, x, torch.full((2,), 500.0), encode_prompts(teacher.pipe, ["a cat", "a dog"], "cpu")


def _logits_and_grads(method, x, t, cond, stop: bool):
    critic, head = method.nets["critic"], method.nets["gan_head"]
    x.grad = None
    critic.zero_grad()
    if stop:
        logits = method.engine.gan_logits(x, t, cond)
    else:
        tap = FeatureTap(critic.backbone)
        with tap.reading():
            critic(x, t, cond)
        logits = head(tap.value)
    logits.sum().backward()
    return logits.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None}


def test_gan_logits_stop_the_critic_after_its_bottleneck_with_the_whole_forwards_logits_and_gradients():
    method, x, t, cond = _unet_dmd2_with_gan_head()
    backbone = method.nets["critic"].backbone
    ran = []
    handle = backbone.up_blocks[0].register_forward_pre_hook(lambda *_: ran.append("up"))
    try:
        whole = _logits_and_grads(method, x, t, cond, stop=False)
        assert ran == ["up"]
        early = _logits_and_grads(method, x, t, cond, stop=True)
        assert ran == ["up"], "the up path ran for the GAN head's features"
    finally:
        handle.remove()
    torch.testing.assert_close(early[0], whole[0])
    torch.testing.assert_close(early[1], whole[1])
    assert early[2].keys() == whole[2].keys() and all(torch.equal(early[2][n], whole[2][n]) for n in whole[2])
    assert not any(n.startswith("up_blocks") for n in early[2])  # the GAN loss trains only the encoder


def test_gan_logits_run_a_wrapped_critic_whole_and_checkpointed_blocks_still_recompute():
    """A transformer's feature module is its last block, which gradient checkpointing may run again
    in the backward, and the critic's fake-score loss runs it whole: by then the stopping hook is gone."""
    teacher = resolve_teacher("tiny:sd3")
    method = build_method({"name": "dmd2", "gan_weight": 1e-3}, teacher, _cfg())
    critic = method.nets["critic"]
    wrapper = nn.Module()
    wrapper.module = critic
    assert not can_stop_early(wrapper) and can_stop_early(critic)
    critic.backbone.enable_gradient_checkpointing()
    critic.train()
    x = torch.randn(2, *teacher.latent_shape, requires_grad=True)
    cond = encode_prompts(teacher.pipe, ["a cat", "a dog"], "cpu")
    method.engine.gan_logits(x, torch.full((2,), 0.5 * teacher.schedule.t_max), cond).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert critic(x, torch.full((2,), 1.0), cond).shape == x.shape  # and later whole forwards are whole
