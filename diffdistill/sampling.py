"""Samplers as pure functions over a Denoiser (k-diffusion style: x0 in, next x_t out).

Every process here is ``x_t = alpha_t x0 + sigma_t eps``, so one DDIM update serves VP and
flow teachers alike, and the few-step "re-noise with fresh eps" update of DMD2 / consistency
models is its stochastic twin. Timesteps come from the schedule (``sampling_timesteps``).
"""

from __future__ import annotations

import torch

from diffdistill.conditioning import cond_cat, embeds_guidance, with_embedded_guidance
from diffdistill.param import append_dims, eps_from_x0


def cfg_combine(x0_uncond: torch.Tensor, x0_cond: torch.Tensor, w) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) as ``uncond + w (cond - uncond)``."""
    return x0_uncond + w * (x0_cond - x0_uncond)


def guided_x0(denoiser, x_t, t, cond, uncond=None, guidance=1.0):
    """Classifier-free guidance in x0 space, ``D(uncond) + w (D(cond) - D(uncond))``, cond and uncond in one batch.

    ``w`` (``guidance``) may be a float or a per-sample tensor; ``w = 1`` is the conditional model alone and
    ``w = 0`` the unconditional one alone (one pass each). The form is affine, so it equals guidance on eps,
    v or flow. A guidance-distilled denoiser (Flux.1-dev) takes w as an input instead: one pass, ``uncond`` unused.
    """
    w = guidance
    if embeds_guidance(denoiser):
        return denoiser(x_t, t, with_embedded_guidance(cond, w, x_t.shape[0], x_t.device))
    if uncond is None or (not torch.is_tensor(w) and w == 1.0):
        return denoiser(x_t, t, cond)
    if not torch.is_tensor(w) and w == 0.0:
        return denoiser(x_t, t, uncond)
    both = denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), cond_cat(uncond, cond))
    x0_uncond, x0_cond = both.chunk(2)
    if torch.is_tensor(w):
        w = w.view(-1, *([1] * (x_t.ndim - 1)))
    return cfg_combine(x0_uncond, x0_cond, w)


def _coeffs(schedule, t, ndim):
    return append_dims(schedule.alpha(t), ndim), append_dims(schedule.sigma(t), ndim)


@torch.no_grad()
def ddim_sample(denoiser, noise, timesteps, cond, uncond=None, guidance: float = 1.0):
    """Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0); the last step returns x0.

    ``noise`` is standard normal; at the first timestep x_t = alpha_t * 0 + sigma_t * noise would
    leave a small alpha_t x0 term out, so, as diffusers does, we start from ``noise`` itself.
    """
    schedule, n = denoiser.schedule, noise.shape[0]
    x = noise.float()
    for i, t in enumerate(timesteps):
        t = torch.full((n,), float(t))
        x0 = guided_x0(denoiser, x, t, cond, uncond, guidance)
        if i == len(timesteps) - 1:
            return x0
        alpha, sigma = _coeffs(schedule, t, x.ndim)
        eps = eps_from_x0(x, x0, alpha, sigma)
        alpha_next, sigma_next = _coeffs(schedule, torch.full((n,), float(timesteps[i + 1])), x.ndim)
        x = alpha_next * x0 + sigma_next * eps
    return x


@torch.no_grad()
def renoise_sample(denoiser, noise, timesteps, cond, generator=None, uncond=None, guidance: float = 1.0):
    """Few-step sampling of distilled students (DMD2 Sec. 4.4, consistency models' multistep sampler):
    x0 = G(x_t, t), then x_{t'} = alpha_{t'} x0 + sigma_{t'} eps' with fresh eps'."""
    schedule, n = denoiser.schedule, noise.shape[0]
    x = noise.float()
    for i, t in enumerate(timesteps):
        x0 = guided_x0(denoiser, x, torch.full((n,), float(t)), cond, uncond, guidance)
        if i == len(timesteps) - 1:
            return x0
        alpha, sigma = _coeffs(schedule, torch.full((n,), float(timesteps[i + 1])), x.ndim)
        fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = alpha * x0 + sigma * fresh
    return x


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents to images in [0, 1], undoing the pipeline's scale and shift."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return ((images.float() + 1) / 2).clamp(0, 1)
