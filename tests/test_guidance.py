"""Each guidance style against its written formula, on networks whose conditional outputs are known.

Convention: D^w = D(uncond) + w (D(cond) - D(uncond)). The networks output w_net * x + shift(cond),
so every guided output can be written down by hand.
"""

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from diffdistill.backbones.loading import Teacher
from diffdistill.conditioning import encode_prompts
from diffdistill.config import ConfigError, TrainConfig, load_recipe
from diffdistill.denoiser import Denoiser
from diffdistill.guidance import Guidance, anti_cfg, fake_cfg, guidance_from_options, lsg, proper_guidance, standard_cfg, zero_cfg
from diffdistill.methods import build_method
from diffdistill.randomness import BatchRandom
from diffdistill.run import build_trainer
from diffdistill.schedules import VPSchedule
from diffdistill.scores import ScoreEngine, fake_score_loss
from diffdistill.teachers import resolve_teacher
from diffdistill.toy import SD15_SCHEDULE, ring8, toy_teacher

ROOT = Path(__file__).resolve().parent.parent

SCHEDULE = VPSchedule.from_scheduler_config(SD15_SCHEDULE)


class Shift(nn.Module):
    """out = w * x + cond["shift"]; counts its calls."""

    backbone_kind = "plain"

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))
        self.calls = 0

    def forward(self, x, timestep, cond):
        self.calls += 1
        return self.w * x + cond["shift"]


def engine(prediction_type="sample"):
    teacher = Teacher(None, Shift(1.0), "shift", "plain", SCHEDULE, prediction_type, "shift", data_shape=(3,))
    critic = Denoiser(Shift(0.5), SCHEDULE, prediction_type)
    return ScoreEngine(teacher, {"critic": critic}), teacher.backbone, critic.backbone


N = 4
X_T, T = torch.randn(N, 3), torch.full((N,), 400.0)
COND, UNCOND = {"shift": torch.full((N, 3), 2.0)}, {"shift": torch.full((N, 3), -1.0)}


def by_hand(net_w, w, x=X_T):
    """(u + w (c - u)) for out = net_w x + shift: (net_w x - 1) + w * 3, per sample if w is a tensor."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1, 1) if torch.is_tensor(w) else w
    return net_w * x - 1.0 + w * 3.0


def outputs(guidance: Guidance, seed=0):
    eng, _, _ = engine()
    w_real, w_fake = guidance.draw(N, BatchRandom(seed))
    return eng.real(X_T, T, COND, UNCOND, w_real), eng.fake(X_T, T, COND, UNCOND, w_fake, grad=False), (w_real, w_fake)


def test_standard_cfg_guides_the_teacher_only():
    real, fake, _ = outputs(standard_cfg(3.0))
    torch.testing.assert_close(real, by_hand(1.0, 3.0))         # -1 + x + 9
    torch.testing.assert_close(fake, by_hand(0.5, 1.0))         # the conditional fake score, 0.5 x + 2


def test_fake_cfg_guides_the_fake_score_too():
    real, fake, _ = outputs(fake_cfg(4.5, 2.0))
    torch.testing.assert_close(real, by_hand(1.0, 4.5))
    torch.testing.assert_close(fake, by_hand(0.5, 2.0))
    assert fake_cfg(4.5).fake == 4.5  # SwiftBrush's default: the same scale on both


def test_random_scale_cfg_draws_one_scale_per_sample_in_its_range():
    real, fake, (w_real, w_fake) = outputs(proper_guidance(2.0, 8.0, 1.0, 2.0))
    assert w_real.shape == (N,) and (w_real >= 2).all() and (w_real <= 8).all() and w_real.unique().numel() == N
    assert (w_fake >= 1).all() and (w_fake <= 2).all()
    torch.testing.assert_close(real, by_hand(1.0, w_real))
    torch.testing.assert_close(fake, by_hand(0.5, w_fake))
    again = proper_guidance(2.0, 8.0, 1.0, 2.0).draw(N, BatchRandom(0))
    torch.testing.assert_close(again[0], w_real)                 # the batch rng decides: every rank draws the same
    assert not torch.equal(proper_guidance(2.0, 8.0).draw(N, BatchRandom(1))[0], w_real)
    assert proper_guidance(2.0, 8.0).draw(N, BatchRandom(0))[1] == 1.0  # no fake range: conditional fake score
    with pytest.raises(ValueError, match="empty"):
        proper_guidance(3.0, 2.0)


def test_lsg_kappas_reach_the_fake_score_loss_and_the_generator_scores():
    g = lsg(kappa1=1.5, kappa2=2.5, kappa4=4.0)
    real, fake, _ = outputs(g)
    torch.testing.assert_close(real, by_hand(1.0, 4.0))
    torch.testing.assert_close(fake, by_hand(0.5, 2.5))
    # kappa_1 while training the fake score, in eps space: ||eps_u + k1 (eps_c - eps_u) - eps||^2
    _, _, critic = engine("epsilon")
    denoiser = Denoiser(critic, SCHEDULE, "epsilon")
    x, eps = torch.randn(N, 3), torch.randn(N, 3)
    loss = fake_score_loss(denoiser, SCHEDULE, "epsilon", x, T, eps, COND, "native", UNCOND, g.fake_train)
    alpha, sigma = SCHEDULE.alpha(T)[:, None], SCHEDULE.sigma(T)[:, None]
    x_t = alpha * x + sigma * eps
    eps_hat = (0.5 * x_t - 1.0) + 1.5 * 3.0
    torch.testing.assert_close(loss, (eps_hat - eps).square().mean(1), rtol=1e-4, atol=1e-5)
    unguided = fake_score_loss(denoiser, SCHEDULE, "epsilon", x, T, eps, COND, "native")
    torch.testing.assert_close(unguided, (0.5 * x_t + 2.0 - eps).square().mean(1))


def test_zero_cfg_drops_guidance_on_the_teacher_and_text_on_the_fake_score():
    eng, teacher, critic = engine()
    g = zero_cfg()
    real = eng.real(X_T, T, COND, UNCOND, g.real)
    fake = eng.fake(X_T, T, COND, UNCOND, g.fake, grad=False)
    torch.testing.assert_close(real, X_T + 2.0)                  # D_r(c), one pass
    torch.testing.assert_close(fake, 0.5 * X_T - 1.0)            # D_f(uncond), one pass
    assert teacher.calls == 1 and critic.calls == 1
    x, eps = torch.randn(N, 3), torch.randn(N, 3)
    loss = fake_score_loss(Denoiser(critic, SCHEDULE, "sample"), SCHEDULE, "sample", x, T, eps, COND, "x0", UNCOND, g.fake_train)
    x_t = SCHEDULE.alpha(T)[:, None] * x + SCHEDULE.sigma(T)[:, None] * eps
    torch.testing.assert_close(loss, (0.5 * x_t - 1.0 - x).square().mean(1))  # trained on the empty prompt


def test_anti_cfg_applies_a_negative_scale_to_the_fake_score():
    real, fake, _ = outputs(anti_cfg(-1.5))
    torch.testing.assert_close(real, by_hand(1.0, 1.0))
    torch.testing.assert_close(fake, by_hand(0.5, -1.5))         # 0.5 x - 1 - 4.5: pushed away from the text
    with pytest.raises(ValueError, match="negative"):
        anti_cfg(0.5)


@dataclass
class _Options:
    guidance_style: str = "cfg"
    guidance: float = 1.75
    fake_guidance: float = 1.0
    fake_train_guidance: float = 1.0
    guidance_range: list | None = None
    fake_guidance_range: list | None = None
    other: list = field(default_factory=list)


def test_styles_from_options_and_clear_errors():
    assert guidance_from_options(_Options()) == Guidance(real=1.75)
    assert guidance_from_options(_Options("lsg", 2.0, 3.0, 4.0)) == Guidance(real=2.0, fake=3.0, fake_train=4.0)
    assert guidance_from_options(_Options("zero_cfg")) == Guidance(real=1.0, fake=0.0, fake_train=0.0)
    assert guidance_from_options(_Options("random", guidance_range=[2, 6])).real_range == (2.0, 6.0)
    with pytest.raises(ValueError, match="choose one of cfg, fake_cfg, random, lsg, zero_cfg, anti_cfg"):
        guidance_from_options(_Options("cfg++"))
    with pytest.raises(ValueError, match="fake_train_guidance=2.0 is not used by guidance_style=fake_cfg"):
        guidance_from_options(_Options("fake_cfg", fake_train_guidance=2.0))
    with pytest.raises(ValueError, match="guidance=3.0 is not used by guidance_style=zero_cfg"):
        guidance_from_options(_Options("zero_cfg", guidance=3.0))
    with pytest.raises(ValueError, match="needs method.guidance_range"):
        guidance_from_options(_Options("random"))
    with pytest.raises(ValueError, match="negative"):
        guidance_from_options(_Options("anti_cfg", fake_guidance=1.0))


@pytest.mark.parametrize("name", ["sid", "sim", "fdistill", "diff_instruct"])
def test_every_new_method_passes_its_scales_to_the_engine(name, monkeypatch):
    teacher = toy_teacher(ring8(), generator_width=16, generator_depth=1, critic_width=16, critic_depth=1)
    spec = {"name": name, "guidance_style": "lsg", "guidance": 3.0, "fake_guidance": 2.0, "fake_train_guidance": 1.5}
    if name == "fdistill":
        spec["divergence"] = "rkl"
        spec["gan_weight"] = 0.0
    method = build_method(spec, teacher, TrainConfig(teacher="exact:ring8", out="unused"))
    seen = {}
    real, fake = method.engine.real, method.engine.fake
    monkeypatch.setattr(method.engine, "real", lambda *a, **k: seen.setdefault("real", a[4]) and real(*a, **k))
    monkeypatch.setattr(method.engine, "fake", lambda *a, **k: seen.setdefault("fake", a[4]) and fake(*a, **k))
    method.generator_loss({"prompts": [""] * 4, "cond": {}, "uncond": {}, "rng": BatchRandom(0), "step": 0})
    assert seen == {"real": 3.0, "fake": 2.0}
    assert method.guidance.fake_train == 1.5
    with pytest.raises(ConfigError, match="not used by guidance_style=cfg"):
        build_method({"name": name, "fake_train_guidance": 2.0}, teacher, TrainConfig(teacher="exact:ring8", out="unused"))


def test_sdxl_guides_against_zeros_as_its_pipeline_does():
    """SDXL's unconditional input is zeros (force_zeros_for_empty_prompt), in every batch the trainer builds;
    SD1.5 keeps the encoded empty prompt."""
    sd15 = resolve_teacher("tiny:unet")
    assert encode_prompts(sd15.pipe, [""])["encoder_hidden_states"].abs().max() > 0
    trainer = build_trainer(load_recipe(ROOT / "recipes" / "tiny" / "dmd2.yaml", ["teacher=tiny:sdxl", "batch_size=2", "resume=false",
                                                                                   "sample_every=0", "out=/nonexistent/never-written"]))
    teacher, batch = trainer.teacher, trainer.make_batch(0, 0)
    uncond, cond = batch["uncond"], batch["cond"]
    assert uncond["encoder_hidden_states"].abs().max() == 0 and uncond["text_embeds"].abs().max() == 0
    assert cond["encoder_hidden_states"].abs().max() > 0 and torch.equal(uncond["time_ids"], cond["time_ids"])
    x, t, w = torch.randn(2, *teacher.latent_shape), torch.tensor([300.0, 800.0]), 8.0
    zeros = {**cond, "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]), "text_embeds": torch.zeros_like(cond["text_embeds"])}
    d = teacher.denoiser()
    with torch.no_grad():
        by_hand = d(x, t, zeros) + w * (d(x, t, cond) - d(x, t, zeros))
        guided_by_engine = trainer.method.engine.real(x, t, cond, uncond, w)
        teacher.pipe.register_to_config(force_zeros_for_empty_prompt=False)  # the encoded "" instead: another target
        against_encoded_empty = trainer.method.engine.real(x, t, cond, encode_prompts(teacher.pipe, ["", ""]), w)
    torch.testing.assert_close(guided_by_engine, by_hand, rtol=0, atol=2e-4)  # one batched 2B pass vs three: rounding x w
    assert (against_encoded_empty - by_hand).abs().max() > 100 * 2e-4
