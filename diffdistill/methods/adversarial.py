"""The diffusion-GAN pieces that DMD2-style methods share (SiDA, f-distill): not a method itself.

A classifier head reads the critic's (DMD2) or the teacher's (FastGen) features at a diffusion-noised
input and gives one logit per sample. The generator takes the non-saturating term softplus(-l(x~_fake))
(Goodfellow et al. 2014); the head (and, with critic features, the critic's encoder) minimizes the
logistic loss softplus(l(x~_fake)) + softplus(-l(x~_real)), whose optimum is l = log p_t(x)/q_t(x),
the log density ratio of real to generated data at that noise level (f-distill reads it back).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffdistill.conditioning import encode_prompts
from diffdistill.schedules import add_noise
from diffdistill.scores import build_gan_head


def make_gan_head(teacher, critic, features: str, kind: str = "pooled"):
    """A head (``kind``: pooled | patch) sized on the features of ``critic`` or of the teacher (``features``: critic | teacher)."""
    x = torch.zeros((1, *teacher.latent_shape))
    cond = encode_prompts(teacher.pipe, [""]) if teacher.pipe is not None else {}
    source = critic if features == "critic" else teacher.denoiser()
    return build_gan_head(source, x, torch.full((1,), teacher.schedule.t_max / 2), cond, kind)


def noised(schedule, times, x: torch.Tensor, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """x~ = alpha_t x + sigma_t eps' with its own t ~ ``times`` and fresh noise (graph kept to x)."""
    t = times(schedule, x.shape[0], rng).to(x.device)
    return add_noise(schedule, x, rng.randn_like(x), t), t


def per_sample(loss: torch.Tensor) -> torch.Tensor:
    """A patch head's per-patch losses averaged to one per sample (a pooled head's pass through)."""
    return loss.reshape(len(loss), -1).mean(1)


def generator_gan_loss(engine, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample softplus(-l(x~)) on generated x~, and the logits (with graph) for other uses."""
    logits = engine.gan_logits(x_t, t, cond)
    return per_sample(F.softplus(-logits)), logits


def discriminator_loss(engine, fake: tuple, real: tuple, cond: dict) -> tuple[torch.Tensor, dict]:
    """Per-sample softplus(l(x~_fake)) + softplus(-l(x~_real)); ``fake``/``real`` are (x~, t) pairs."""
    fake_logits = engine.gan_logits(*fake, cond)
    real_logits = engine.gan_logits(*real, cond)
    loss = per_sample(F.softplus(fake_logits) + F.softplus(-real_logits))
    return loss, {"loss_gan_d": loss.mean().item(), "real_logit": real_logits.mean().item(), "fake_logit": fake_logits.mean().item()}


def require_real_images(batch: dict, method: str, instead: str = "method.gan_weight=0") -> torch.Tensor:
    if "x0" not in batch:
        raise ValueError(f"{method}'s discriminator needs real images: set data.source to imagefolder or digits, or {instead}")
    return batch["x0"]


def drop_nonfinite(loss: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Zeroes per-sample losses that are NaN or Inf (SiD's NaN filtering); returns how many were dropped."""
    finite = torch.isfinite(loss)
    return torch.where(finite, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)), int((~finite).sum())
