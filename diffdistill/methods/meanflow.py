"""MeanFlow, distilled: one- and few-step students that learn the teacher's average velocity.

Geng, Deng, Bai, Kolter & He (2025), "Mean Flows for One-step Generative Modeling" (arXiv 2505.13447);
settings from the official code (Gsunshine/meanflow, JAX, ImageNet; Gsunshine/py-meanflow, CIFAR-10).
On the flow path z_t = (1 - t) x + t eps, dz/dt = v(z_t, t):

    u(z_t, r, t) = 1/(t - r) int_r^t v(z_s, s) ds                       average velocity, u(z, t, t) = v
    u(z_t, r, t) = v(z_t, t) - (t - r) du/dt,  du/dt = v d_z u + d_t u   the MeanFlow identity (Eq. 6)
    L = ||u_theta - sg(u_tgt)||^2 / sg(||u_theta - u_tgt||^2 + c)^p,  u_tgt = v - (t - r) du_theta/dt

du_theta/dt: one ``torch.func.jvp`` of the student, tangents (v, 0, 1) for (z, r, t), no gradient (as
sCM's; :mod:`diffdistill.methods.trigflow`'s attention and precision checks); a second forward carries
the gradient. **Distillation form** (ours): v is the teacher's guided velocity v_u + w (v_c - v_u) at
(z_t, t), z_t from data, not the paper's eps - x; the loss is zero at the teacher's exact average
velocity (tests/test_meanflow.py). (r, t) as the paper's ImageNet setting: two logit-normal(-0.4, 1)
draws, t the larger, r = t for 75% of pairs; adaptive weight p = 1, c = 0.01 (the JAX code's norm_eps).
Sampling: z_r = z_t - (t - r) u(z_t, r, t); one step x = z_1 - u(z_1, 0, 1); K steps on t = 1, ..., 1/K, 0.

**Any schedule**: a VP network is a flow network in the frame z = x_t / (alpha + sigma), flow time
t = sigma / (alpha + sigma) (identity for flow teachers); t stays in the schedule's range (SD1.5: [0.028,
0.936]; sampling starts there from x_T = noise, as every sampler here does), r may reach 0. **Student**
u_theta = (z - D_theta)/t (a flow net's native output), D_theta its x0 at (z, t) with h = t - r as a
second time input: sinusoids of ``interval_scale`` h through LCM's ``cond_proj`` (``time_cond_proj_dim``),
zero at first so the student starts as the teacher (u = v for every r); as py-meanflow's U-Net joins t's
and h's embeddings before its time MLP. Transformers (SD3, Flux, SANA; PixArt's is alike, untested) get that
``cond_proj`` on their timestep embedder (:mod:`diffdistill.backbones.interval_embed`); on Flux it sits beside the guidance
embedding, which keeps its meaning (``student_guidance_embed``), rather than reusing it for h.

Not verified: the paper's own c; the distillation form and its guidance (the paper mixes CFG into v with its
own net, omega and kappa; we take the guided teacher); class dropout (not used). Export: h folded (export/).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from diffdistill import param
from diffdistill.backbones.interval_embed import add_interval_input
from diffdistill.generator import student_denoiser
from diffdistill.methods.base import register_method
from diffdistill.methods.lcm_student import guidance_embedding, guidance_student
from diffdistill.methods.trigflow import check_jvp_precision, check_jvp_supported, use_jvp_attention
from diffdistill.param import append_dims
from diffdistill.scores import ScoreEngine

T_FLOOR = 1e-4  # u = (z - D)/t: keeps t off 0 (logit-normal mass below it: ~1e-13)

# ---- the flow frame ----------------------------------------------------------------------------


def flow_frame(schedule, t: torch.Tensor):
    """(schedule time, alpha + sigma) at flow time t: sigma/alpha = t/(1 - t), and x_sched = (alpha + sigma) z."""
    t = t.to(torch.float64)
    t_sched = t if schedule.kind == "flow" else schedule.t_from_snr_ratio(t / (1 - t))
    return t_sched, schedule.alpha(t_sched, torch.float64) + schedule.sigma(t_sched, torch.float64)


def flow_range(schedule) -> tuple[float, float]:
    """The flow times the schedule reaches: sigma / (alpha + sigma) at t_min and t_max."""
    ends = torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)
    sigma = schedule.sigma(ends, torch.float64)
    lo, hi = (sigma / (schedule.alpha(ends, torch.float64) + sigma)).tolist()
    return max(lo, T_FLOOR), hi


def teacher_velocity(engine: ScoreEngine, z, t, cond, uncond, guidance: float) -> torch.Tensor:
    """v = (z - D_teacher^w) / t: the teacher's guided flow velocity at (z_t, t)."""
    t_sched, scale = flow_frame(engine.teacher_denoiser.schedule, t)
    x0 = engine.real(append_dims(scale, z.ndim) * z, t_sched, cond, uncond, guidance).to(torch.float64)
    return (z - x0) / append_dims(t, z.ndim)


def average_velocity(net, z, r, t, cond, embedding_dim: int, interval_scale: float) -> torch.Tensor:
    """u_theta(z, r, t) = (z - D_theta(x_t, t; h = t - r)) / t, in float64 (differentiable in z, r, t for the jvp).
    ``net`` may be a DDP wrapper: its forward is what synchronizes gradients."""
    denoiser = getattr(net, "module", net)
    t_sched, scale = flow_frame(denoiser.schedule, t)
    x_t = append_dims(scale, z.ndim) * z
    h = guidance_embedding((t - r) * (interval_scale / 1000), embedding_dim)  # LCM's sinusoids of 1000 x their input
    native = net(x_t, t_sched, {**cond, "timestep_cond": h}, output="native").to(torch.float64)
    x0 = param.to_x0(denoiser.prediction_type, x_t, native, *denoiser.coefficients(t_sched, z.ndim))
    return (z - x0) / append_dims(t, z.ndim)


# ---- the loss ----------------------------------------------------------------------------------


def total_derivative(u_fn, z, r, t, v):
    """(u, du/dt) along dz/dt = v: one forward-mode pass with tangents (v, 0, 1) for (z, r, t), no gradient."""
    with torch.no_grad():
        return torch.func.jvp(u_fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))


def meanflow_target(v, du_dt, r, t) -> torch.Tensor:
    """u_tgt = sg(v - (t - r) du/dt): the right side of the MeanFlow identity."""
    return (v - append_dims(t - r, v.ndim) * du_dt).detach()


def meanflow_loss(u, u_tgt, p: float = 1.0, c: float = 0.01) -> torch.Tensor:
    """Per sample ||u - u_tgt||^2 / sg(||u - u_tgt||^2 + c)^p (squares summed over elements, as the official code)."""
    squared = (u - u_tgt).square().flatten(1).sum(1)
    return squared / (squared.detach() + c) ** p


def meanflow_times(schedule, n: int, rng, p_mean: float, p_std: float, flow_matching_share: float):
    """(r, t): two logit-normal draws, t the larger, r = t for a ``flow_matching_share`` of pairs; t kept in
    the schedule's flow range (clamped: under 0.3% of SD1.5's mass lies outside), r <= t."""
    a, b = (torch.sigmoid(p_mean + p_std * rng.randn((n,)).double()) for _ in range(2))
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    r = torch.where(rng.rand((n,)) < flow_matching_share, t, r)
    lo, hi = flow_range(schedule)
    t = t.clamp(lo, hi - 1e-5)  # off the end of a VP table, whose last knot has no slope for the jvp
    return torch.minimum(r, t), t


# ---- the method --------------------------------------------------------------------------------


@dataclass
class MeanFlowOptions:
    guidance: float = 1.0                  # teacher CFG w in v = v_u + w (v_c - v_u)
    p_mean: float = -0.4                   # t, r ~ logit-normal(p_mean, p_std) (ImageNet; CIFAR: t (-0.6, 1.6), r (-4, 1.6))
    p_std: float = 1.0
    flow_matching_share: float = 0.75      # share of pairs with r = t (ImageNet: 75%, i.e. 25% r != t)
    adaptive_p: float = 1.0                # weight 1 / sg(||delta||^2 + c)^p (ImageNet: 1; CIFAR: 0.75; 0: plain L2)
    adaptive_c: float = 0.01               # c (the JAX code's norm_eps)
    interval_embedding_dim: int = 256      # width of h = t - r's sinusoidal embedding (UNet time_cond_proj_dim)
    interval_scale: float = 1.0            # h embedded as sinusoids of scale * h (1: the official DiT's raw h; on ring8, 10 and 1000 learned slower)
    sample_steps: int = 1                  # default sampling steps, t = 1, (K-1)/K, ..., 0


def interval_student(teacher, embedding_dim: int):
    """The student: a copy of the teacher with a second time input for h = t - r, zero at first."""
    if teacher.make_student is not None:  # the toy MLP takes it as a keyword
        return teacher.denoiser(teacher.make_student(time_cond_proj_dim=embedding_dim).requires_grad_(True).train())
    if teacher.kind == "unet":
        return guidance_student(teacher, embedding_dim, init="zero")
    return teacher.denoiser(add_interval_input(student_denoiser(teacher).backbone, embedding_dim))


class MeanFlow:
    phases = ("generator",)

    def __init__(self, options: MeanFlowOptions, teacher, train_cfg):
        if options.interval_embedding_dim < 2 or options.sample_steps < 1 or not 0 <= options.flow_matching_share <= 1:
            raise ValueError("interval_embedding_dim >= 2, sample_steps >= 1 and flow_matching_share in [0, 1] are required")
        check_jvp_precision(train_cfg)
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.default_sample_steps = options.sample_steps
        self.nets = {"generator": interval_student(teacher, options.interval_embedding_dim)}
        use_jvp_attention(self.nets["generator"].backbone)
        self.engine = ScoreEngine(teacher, self.nets)

    def phase(self, step: int) -> str:
        return "generator"

    def phase_nets(self, phase: str) -> list[str]:
        return ["generator"]

    def u(self, net, z, r, t, cond):
        return average_velocity(net, z, r, t, cond, self.options.interval_embedding_dim, self.options.interval_scale)

    def generator_loss(self, batch):
        if "x0" not in batch:
            raise ValueError("meanflow noises data: set data.source to imagefolder or digits")
        o, rng, student, cond = self.options, batch["rng"], self.nets["generator"], batch["cond"]
        inner = getattr(student, "module", student)  # the jvp runs on the module itself (as sCM's), the gradient pass through DDP
        x = batch["x0"].to(torch.float64)
        r, t = (s.to(x.device) for s in meanflow_times(self.schedule, x.shape[0], rng, o.p_mean, o.p_std, o.flow_matching_share))
        z = append_dims(1 - t, x.ndim) * x + append_dims(t, x.ndim) * rng.randn_like(batch["x0"]).to(torch.float64)
        with torch.no_grad():
            v = teacher_velocity(self.engine, z, t, cond, batch["uncond"], o.guidance)
            check_jvp_supported(inner, z.device)
        _, du_dt = total_derivative(lambda z, r, t: self.u(inner, z, r, t, cond), z, r, t, v)
        u = self.u(student, z, r, t, cond)
        loss = meanflow_loss(u, meanflow_target(v, du_dt, r, t), o.adaptive_p, o.adaptive_c)
        at_t = r == t  # there u_theta should be the teacher's velocity itself
        return loss.float(), {"loss_meanflow": loss.mean().item(), "velocity_mse": (u - v)[at_t].square().mean().item() if at_t.any() else 0.0}

    def critic_loss(self, batch):
        raise RuntimeError("meanflow has no critic phase")

    @torch.no_grad()
    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        """z_r = z_t - (t - r) u(z_t, r, t) from the schedule's noise end to 0; x_T = noise (so z = noise / (alpha + sigma))."""
        n, hi = noise.shape[0], flow_range(self.schedule)[1]
        times = torch.linspace(hi, 0.0, (steps or self.default_sample_steps) + 1, dtype=torch.float64, device=noise.device)
        z = noise.to(torch.float64) / flow_frame(self.schedule, times[:1])[1].item()
        for t, r in itertools.pairwise(times):
            z = z - (t - r) * self.u(self.nets["generator"], z, r.expand(n), t.expand(n), cond)
        return z.float()


@register_method("meanflow", MeanFlowOptions)
def build_meanflow(options: MeanFlowOptions, teacher, train_cfg, prompts) -> MeanFlow:
    return MeanFlow(options, teacher, train_cfg)
