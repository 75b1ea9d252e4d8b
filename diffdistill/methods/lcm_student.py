"""LCM's student: a consistency function with the boundary condition and the guidance input built in.

    f_theta(x, t, w) = c_skip(t) x + c_out(t) D_theta(x, t, w)
    c_skip(t) = sigma_d^2 / ((lam t)^2 + sigma_d^2),   c_out(t) = lam t / sqrt((lam t)^2 + sigma_d^2)

with t the model timestep, sigma_d = 0.5 and lam = 10 (LCM's "timestep scaling"), so f(x, 0) = x.

The student sees omega = w - 1 through LCM's sinusoidal embedding (``time_cond_proj_dim`` = 256),
exactly what ``LatentConsistencyModelPipeline`` embeds for ``guidance_scale = w``. A UNet student is
built from the teacher's config with that key set, so diffusers creates ``time_embedding.cond_proj``
(Linear(256 -> C, no bias)), which keeps PyTorch's default Linear initialization as diffusers'
``train_lcm_distill_sd_wds.py`` leaves it (``from_config`` then ``load_state_dict(strict=False)``), or
starts at zero (``init="zero"``: at step 0 the student is then the teacher). Backbones without such an
input take one fixed w.
"""

from __future__ import annotations

import torch
from torch import nn

from diffdistill.generator import student_denoiser
from diffdistill.param import append_dims


def boundary_coefficients(schedule, t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM's (c_skip, c_out) at t (float64): c_skip(0) = 1 and c_out(0) = 0, so f(x, 0) = x."""
    scaled = schedule.model_timestep(t.to(torch.float64)) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def consistency_output(denoiser, x, t, cond, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """f = c_skip(t) x + c_out(t) D(x, t): the consistency function of a denoiser."""
    schedule = getattr(denoiser, "module", denoiser).schedule  # a DDP wrapper holds the Denoiser as .module
    c_skip, c_out = (append_dims(c, x.ndim).to(x.device, torch.float32) for c in boundary_coefficients(schedule, t, sigma_data, timestep_scaling))
    return c_skip * x + c_out * denoiser(x, t, cond)


def guidance_embedding(omega: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's sinusoidal embedding of omega = w - 1 (scaled by 1000; sin half, then cos half)."""
    half = dim // 2
    rate = torch.log(torch.tensor(10000.0)) / (half - 1)  # float32 in this order, so the bits match the pipeline's
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -rate).to(omega.device)
    angles = (omega.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], 1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def with_guidance(cond: dict, w, embedding_dim: int, n: int, device) -> dict:
    """``cond`` plus the student's guidance input ``timestep_cond`` (UNet ``time_cond_proj_dim``)."""
    if embedding_dim <= 0:
        return cond
    w = w if torch.is_tensor(w) else torch.full((n,), float(w))
    return {**cond, "timestep_cond": guidance_embedding(w.to(device) - 1, embedding_dim)}


class ConsistencyFunction(nn.Module):
    """f(x, t) = c_skip(t) x + c_out(t) D(x, t, cond + w embedding): what the sampler calls."""

    def __init__(self, denoiser, embedding_dim: int, guidance, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
        super().__init__()
        self.denoiser, self.embedding_dim, self.guidance = denoiser, embedding_dim, guidance
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling

    def forward(self, x, t, cond):
        return consistency_output(self.denoiser, x, t, with_guidance(cond, self.guidance, self.embedding_dim, x.shape[0], x.device),
                                  self.sigma_data, self.timestep_scaling)


GUIDANCE_EMBEDDING_INITS = ("default", "zero")


def guidance_student(teacher, embedding_dim: int, init: str = "default"):
    """The student: a copy of the teacher, with LCM's guidance input ``time_cond_proj_dim`` where asked.

    diffusers' UNet creates ``time_embedding.cond_proj`` (Linear(dim -> C, no bias)) when its config
    sets ``time_cond_proj_dim``; we build the student from the teacher's config with that key and load
    the teacher's weights (only cond_proj missing). ``init``: "default" leaves cond_proj as PyTorch
    initializes a Linear (U(+-1/sqrt(dim)), drawn from the run's seeded generator), as diffusers' LCM
    script does; "zero" zeroes it, so the student starts exactly as the teacher.
    """
    if init not in GUIDANCE_EMBEDDING_INITS:
        raise ValueError(f"method.guidance_embedding_init={init!r}: choose one of {', '.join(GUIDANCE_EMBEDDING_INITS)}")
    if embedding_dim <= 0:
        return student_denoiser(teacher)
    backbone = teacher.backbone
    if getattr(getattr(backbone, "config", None), "time_cond_proj_dim", None) == embedding_dim:
        return student_denoiser(teacher)  # already an LCM-style backbone
    if teacher.kind != "unet":
        raise ValueError(f"a {type(backbone).__name__} backbone has no guidance-embedding input (time_cond_proj_dim, UNet only); "
                         "set method.guidance_embedding_dim=0 and one method.guidance value")
    # a keyword, not an edited dict: from_config re-applies defaults listed in the config's _use_default_values
    student = type(backbone).from_config(backbone.config, time_cond_proj_dim=embedding_dim)
    missing, unexpected = student.load_state_dict(backbone.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise ValueError(f"could not copy the teacher into an LCM student: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if init == "zero":
        nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return teacher.denoiser(student.float().requires_grad_(True).train())
