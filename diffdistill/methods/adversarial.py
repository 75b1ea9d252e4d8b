"""The diffusion-GAN pieces that DMD2-style methods share (SiDA, f-distill): not a method itself.

A classifier head reads the critic's (DMD2) or the teacher's (FastGen) features at a diffusion-noised
input and gives one logit per sample. The generator takes the non-saturating term softplus(-l(x~_fake))
(Goodfellow et al. 2014); the head (and, with critic features, the critic's encoder) minimizes the
logistic loss softplus(l(x~_fake)) + softplus(-l(x~_real)), whose optimum is l = log p_t(x)/q_t(x),
the log density ratio of real to generated data at that noise level (f-distill reads it back).

LADD's discriminator (below) is several heads, one per block of the frozen teacher, each conditioned on
t and the pooled prompt, with the hinge loss (ADD's) or the same logistic loss, summed over heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffdistill.conditioning import encode_prompts
from diffdistill.schedules import add_noise
from diffdistill.scores import LayerTaps, build_gan_head


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


class GANTerm:
    """The diffusion-GAN term as a critic-based method holds it: a head (``nets["gan_head"]``) on the
    critic's or the teacher's features (``options.gan_features``), ``options.gan_weight`` times the
    generator's softplus(-l(x~)) and ``options.gan_critic_weight`` times the discriminator loss added to
    the critic phase's, each x~ noised at its own t ~ ``times``. Off (no head, no extra RNG draws) when
    ``gan_weight`` is 0, unless ``keep_head`` (f-distill reads its density ratio from the head)."""

    def __init__(self, options, teacher, nets: dict, who: str, keep_head: bool = False, instead: str = "method.gan_weight=0"):
        self.weight, self.critic_weight, self.who, self.instead = options.gan_weight, options.gan_critic_weight, who, instead
        self.schedule = teacher.schedule
        self.head = "gan_head" if self.weight > 0 or keep_head else None  # ScoreEngine's gan_name
        self.nets = [self.head] if self.head else []  # what the critic phase trains beside the critic
        if self.head:
            nets[self.head] = make_gan_head(teacher, nets["critic"], options.gan_features, getattr(options, "gan_head", "pooled"))

    def generator_term(self, loss: torch.Tensor, logs: dict, engine, times, x: torch.Tensor, batch: dict) -> torch.Tensor:
        """``loss`` plus lambda_G softplus(-l(x~)) per sample, x~ a fresh noising of the generated ``x``."""
        if self.weight <= 0:
            return loss
        gan, _ = generator_gan_loss(engine, *noised(self.schedule, times, x, batch["rng"]), batch["cond"])
        logs["loss_gan_g"] = gan.mean().item()
        return loss + self.weight * gan

    def discriminator_term(self, loss: torch.Tensor, logs: dict, engine, times, x: torch.Tensor, batch: dict) -> torch.Tensor:
        """``loss`` plus lambda_D times the discriminator loss on the generated ``x`` and the batch's real images."""
        if self.head is None:
            return loss
        real = require_real_images(batch, self.who, self.instead)
        rng = batch["rng"]
        disc, gan_logs = discriminator_loss(engine, noised(self.schedule, times, x, rng), noised(self.schedule, times, real, rng), batch["cond"])
        logs.update(gan_logs)
        return loss + self.critic_weight * disc


# ---- LADD's discriminator: heads on several blocks of the frozen teacher ----------------------------


def pooled_text(cond: dict, n: int, device) -> torch.Tensor:
    """The prompt as one vector per sample, for the heads' conditioning: SD3's pooled CLIP projection,
    SDXL's pooled text embeds, else the text tokens' mean; an empty (n, 0) without a prompt (a toy)."""
    for key in ("pooled_projections", "text_embeds"):
        if key in cond:
            return cond[key].float().flatten(1)
    if "encoder_hidden_states" in cond:
        return cond["encoder_hidden_states"].float().mean(1)
    return torch.zeros(n, 0, device=device)


def as_tokens(features: torch.Tensor) -> torch.Tensor:
    """(B, N, C) from an image map (B, C, H, W), tokens (B, N, C) or a vector (B, C)."""
    if features.ndim == 2:
        return features[:, None]
    return features if features.ndim == 3 else features.flatten(2).transpose(1, 2)


class LayerHead(nn.Module):
    """One head on one block's tokens: an MLP per token whose first layer adds a projection of the
    conditioning (t and prompt), the per-token logits averaged. ``scale`` is a constant: one over the
    block's feature RMS on a probe batch, so heads on blocks of very different magnitude start alike."""

    def __init__(self, channels: int, cond_dim: int, scale: float, width: int = 128):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.inp, self.cond = nn.Linear(channels, width), nn.Linear(cond_dim, width)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, features: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.inp(as_tokens(features.float()) * self.scale) + self.cond(c)[:, None]
        return self.out(h).mean((1, 2))


class DiscriminatorHeads(nn.Module):
    """One :class:`LayerHead` per teacher block, conditioned on Fourier features of t / t_max and the
    pooled prompt; ``forward`` gives logits (B, heads)."""

    def __init__(self, channels: list[int], scales: list[float], text_dim: int, t_max: float, width: int = 128, frequencies: int = 6):
        super().__init__()
        self.t_max = float(t_max)
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.arange(frequencies))
        self.heads = nn.ModuleList(LayerHead(c, 2 * frequencies + text_dim, s, width) for c, s in zip(channels, scales))

    def forward(self, features: list[torch.Tensor], t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        phase = (t.float() / self.t_max)[:, None] * self.freqs
        c = torch.cat([phase.sin(), phase.cos(), text.float()], 1)
        return torch.stack([head(f, c) for head, f in zip(self.heads, features)], 1)


@torch.no_grad()
def build_discriminator_heads(teacher, indices: list[int] | None, width: int) -> DiscriminatorHeads:
    """Sizes a head per teacher block (``backbones.feature_modules``) by one teacher pass on random latents at mid t."""
    denoiser = teacher.denoiser()
    device = next(teacher.backbone.parameters(), torch.zeros(())).device
    x = torch.randn((4, *teacher.latent_shape), generator=torch.Generator().manual_seed(0)).to(device)
    cond = encode_prompts(teacher.pipe, [""] * 4, device) if teacher.pipe is not None else {}
    taps = LayerTaps(denoiser.backbone, indices)
    with taps.reading():
        denoiser(x, torch.full((4,), teacher.schedule.t_max / 2, device=device), cond)
    tokens = [as_tokens(f.float()) for f in taps.values]
    scales = [1 / float(f.square().mean().sqrt().clamp_min(1e-6)) for f in tokens]
    return DiscriminatorHeads([f.shape[-1] for f in tokens], scales, pooled_text(cond, 4, device).shape[1], teacher.schedule.t_max, width)


GAN_LOSSES = ("hinge", "nonsaturating")


def generator_adversarial_loss(fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample, summed over heads: hinge -D(x~) (ADD's generator loss), non-saturating softplus(-D(x~))."""
    return (-fake_logits if kind == "hinge" else F.softplus(-fake_logits)).sum(1)


def discriminator_adversarial_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample, summed over heads: hinge max(0, 1 - D(y~)) + max(0, 1 + D(x~)); logistic softplus(-D(y~)) + softplus(D(x~))."""
    if kind == "hinge":
        return (F.relu(1 - real_logits) + F.relu(1 + fake_logits)).sum(1)
    return (F.softplus(-real_logits) + F.softplus(fake_logits)).sum(1)
