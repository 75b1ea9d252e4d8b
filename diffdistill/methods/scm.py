"""sCM and rCM: continuous-time consistency distillation in TrigFlow (Lu & Song 2024; Zheng et al. 2025).

**TrigFlow** (sCM, Lu & Song 2024): x^ = cos(s) x0 + sin(s) z, z ~ N(0, sigma_d^2 I), s in [0, pi/2]; the
probability-flow ODE is dx^/ds = sigma_d F(x^, s) and the consistency function
f(x^, s) = cos(s) x^ - sigma_d sin(s) F(x^, s). Any VP or flow network is a TrigFlow network: the
schedule time t with sigma_t / alpha_t = sigma_d tan s sees x_t = x^ sqrt(alpha_t^2 + (sigma_t/sigma_d)^2),
its x0 estimate D gives F = (cos(s) x^ - D) / (sigma_d sin s), and then f = D: the student samples
with the same few-step sampler as DMD2, in its own schedule. Conversions run in float64.

**sCD** (sCM's continuous-time objective with its tangent warmup, tangent normalization and adaptive weighting):

    dx^/ds  = (cos s x^ - D_teacher^w) / sin s                        teacher ODE, guided
    g       = -cos^2 s (sigma_d F- - dx^/ds) - r cos s sin s (x^ + sigma_d dF-/ds)
    g      <- g / (||g|| + c)                                           c = 0.1
    L       = e^{-u(s)} mean(F_theta - F- - g)^2 + u(s)                 u: the adaptive-weight head

F- = sg(F_theta); dF-/ds is the total derivative along the teacher's ODE, one ``torch.func.jvp`` of
the student with tangents cos s sin s (dx^/ds, 1) (sCM Sec. 5.1); r rises from 0 to 1 over
``tangent_warmup`` steps. The gradient of L at F = F- is -(2/D) e^{-u} g^T dF/dtheta, the
continuous-time consistency gradient with the prior weighting 1/(sigma_d tan s).

**rCM** adds DMD's reverse-KL gradient on the student's own (backward-simulated) samples as a
"long-skip" regularizer after an sCM-only warmup, and a fake score trained on those samples:
``ratio`` critic updates per generator update (rCM: student every 5th iteration), the DMD term
weighted by ``dmd_weight``. rCM's own loss is 100 sum(F - F- - g)^2 + 1.0 sum(G - sg(G - g_DMD))^2;
in our reductions (mean over elements, 0.5 mean for the DMD surrogate) that ratio is dmd_weight 0.02.
Where we differ from rCM's code (``rcm/models/t2v_model_distill_rcm.py``): its warmup scales the first
term of g by sqrt(1 - r^2 sin^2 s) instead of the second by r (equal at r = 1); its DMD samples come
from random p_D times rather than the student's fixed ``timesteps``; its guidance is c + w (c - u), so
its w = 5 is our 6.

The jvp needs forward-mode AD through every op. PyTorch's fused SDPA kernels have none, so the
student's attention runs diffusers' math ``AttnProcessor`` on CPU and the project's fused-attention
processors (:func:`diffdistill.kernels.processors.use_fused_attention`) on GPU. Measured here: the jvp
fails under CPU bf16 autocast, and through gradient checkpointing when gradients are on; both are
refused with a clear error (our jvp runs under ``no_grad``, where diffusers skips checkpointing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from diffdistill import param
from diffdistill.generator import backward_simulation, check_timesteps, student_denoiser
from diffdistill.methods.base import register_method
from diffdistill.methods.dmd import default_range, distribution_matching_grad, sample_student, surrogate_loss
from diffdistill.param import append_dims
from diffdistill.scores import ScoreEngine, fake_score_loss, make_critic

TANGENT_NORMS = ("l2", "rms", "none")


# ---- TrigFlow ----------------------------------------------------------------------------------


def trigflow_time(schedule, s: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """The schedule's t with sigma_t / alpha_t = sigma_d tan s (float64, differentiable for the jvp)."""
    return schedule.t_from_snr_ratio(sigma_data * torch.tan(s.to(torch.float64)))


def trigflow_x0(net, schedule, prediction_type: str, x_hat, s, cond, sigma_data: float) -> torch.Tensor:
    """D(x^, s) of a network of the schedule: x_t = x^ sqrt(alpha_t^2 + (sigma_t / sigma_d)^2) (= alpha_t x^ / cos s)."""
    t = trigflow_time(schedule, s, sigma_data)
    alpha, sigma = (append_dims(c, x_hat.ndim) for c in (schedule.alpha(t, torch.float64), schedule.sigma(t, torch.float64)))
    x_t = x_hat * (alpha**2 + (sigma / sigma_data) ** 2).sqrt()
    native = net(x_t, t, cond, output="native")
    return param.to_x0(prediction_type, x_t, native.to(torch.float64), alpha, sigma)


def trigflow_velocity(x0, x_hat, s, sigma_data: float) -> torch.Tensor:
    """F = (cos s x^ - D) / (sigma_d sin s), so that f = cos s x^ - sigma_d sin s F = D."""
    cos, sin = (append_dims(v, x_hat.ndim) for v in (torch.cos(s), torch.sin(s)))
    return (cos * x_hat - x0) / (sigma_data * sin)


def teacher_tangent(engine: ScoreEngine, x_hat, s, cond, uncond, guidance, sigma_data: float) -> torch.Tensor:
    """dx^/ds = sigma_d F_teacher^w = (cos s x^ - D_teacher^w) / sin s: the teacher's ODE in TrigFlow (sCD)."""
    schedule = engine.teacher_denoiser.schedule
    t = trigflow_time(schedule, s, sigma_data)
    alpha, sigma = (append_dims(c, x_hat.ndim) for c in (schedule.alpha(t, torch.float64), schedule.sigma(t, torch.float64)))
    x0 = engine.real(x_hat * (alpha**2 + (sigma / sigma_data) ** 2).sqrt(), t, cond, uncond, guidance).to(torch.float64)
    return sigma_data * trigflow_velocity(x0, x_hat, s, sigma_data)


# ---- the jvp -----------------------------------------------------------------------------------


def check_jvp_supported(net: nn.Module, device: torch.device) -> None:
    """Refuses the two setups where forward-mode AD through a diffusers network fails deep inside torch."""
    if device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        raise RuntimeError(
            "sCM's tangent (torch.func.jvp) fails under CPU autocast: convolutions get float32 tangents and "
            f"{torch.get_autocast_dtype('cpu')} weights. Train with mixed_precision=no on CPU")
    checkpointed = [m for m in net.modules() if getattr(m, "gradient_checkpointing", False)]
    if torch.is_grad_enabled() and net.training and checkpointed:
        raise RuntimeError(
            f"sCM's tangent (torch.func.jvp) cannot run with gradients through gradient checkpointing "
            f"({type(checkpointed[0]).__name__}): the recomputation saves a different number of tensors. "
            "Run the jvp under torch.no_grad() (diffusers then skips checkpointing) or disable gradient checkpointing")


def velocity_and_tangent(net, schedule, prediction_type, x_hat, s, cond, sigma_data, dx_ds):
    """(F-, cos s sin s dF-/ds) along the teacher's ODE: one forward-mode pass, no gradient (sCM Sec. 5.1)."""
    net = getattr(net, "module", net)
    cos_sin = torch.cos(s) * torch.sin(s)

    def velocity(x_hat, s):
        return trigflow_velocity(trigflow_x0(net, schedule, prediction_type, x_hat, s, cond, sigma_data), x_hat, s, sigma_data)

    with torch.no_grad():
        check_jvp_supported(net, x_hat.device)
        return torch.func.jvp(velocity, (x_hat, s), (append_dims(cos_sin, x_hat.ndim) * dx_ds, cos_sin))


def use_jvp_attention(backbone: nn.Module) -> int:
    """Attention with forward-mode AD on every diffusers ``Attention``: the fused processors where a GPU
    is present, the math ``AttnProcessor`` on CPU. Returns how many modules were set."""
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor
    except ImportError:
        return 0
    modules = [m for m in backbone.modules() if isinstance(m, Attention)]
    if modules and torch.cuda.is_available():
        from diffdistill.kernels.processors import use_fused_attention

        return use_fused_attention(backbone)
    for module in modules:
        module.set_processor(AttnProcessor())
    return len(modules)


# ---- the loss ----------------------------------------------------------------------------------


def scm_tangent(F_minus, dF_scaled, x_hat, s, dx_ds, sigma_data: float, r: float) -> torch.Tensor:
    """g = -cos^2 s (sigma_d F- - dx^/ds) - r (cos s sin s x^ + sigma_d cos s sin s dF-/ds).

    ``dF_scaled`` is cos s sin s dF-/ds, as :func:`velocity_and_tangent` returns it; r is the tangent
    warmup, 0 -> 1 (sCM).
    """
    cos, sin = (append_dims(v, x_hat.ndim) for v in (torch.cos(s), torch.sin(s)))
    return -cos**2 * (sigma_data * F_minus - dx_ds) - r * (cos * sin * x_hat + sigma_data * dF_scaled)


def normalize_tangent(g: torch.Tensor, kind: str = "l2", c: float = 0.1) -> torch.Tensor:
    """sCM's tangent normalization g / (||g|| + c) (``l2``, the paper and rCM's code); ``rms`` divides by
    ||g|| / sqrt(D) + c instead (FastGen); ``none`` leaves g."""
    if kind not in TANGENT_NORMS:
        raise ValueError(f"tangent_norm={kind!r}: choose one of {', '.join(TANGENT_NORMS)}")
    if kind == "none":
        return g
    norm = g.flatten(1).norm(dim=1)
    if kind == "rms":
        norm = norm / math.sqrt(g[0].numel())
    return g / append_dims(norm + c, g.ndim)


def scm_loss(F, F_minus, g, logvar: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample e^{-u} mean(F - F- - g)^2 + u (sCM's adaptive weighting, w = -u), or the plain mean."""
    squared = (F - F_minus - g).square().flatten(1).mean(1)
    return squared if logvar is None else torch.exp(-logvar) * squared + logvar


class LogVarHead(nn.Module):
    """u(s), the adaptive weight's log-variance (sCM, after EDM2): random Fourier features of
    c_noise = log(sigma_d tan s) / 4, then one linear layer, zero at initialization (weight 1)."""

    def __init__(self, sigma_data: float, channels: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.sigma_data = sigma_data
        self.register_buffer("freqs", torch.randn(channels, generator=g))
        self.register_buffer("phases", torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        c_noise = torch.log(self.sigma_data * torch.tan(s.to(torch.float64))).float() / 4
        features = torch.cos(2 * math.pi * (c_noise[:, None] * self.freqs + self.phases)) * math.sqrt(2)
        return self.linear(features).squeeze(-1).to(torch.float64)


@dataclass
class TrigFlowTimes:
    """s = arctan(sigma / sigma_d), sigma ~ lognormal(p_mean, p_std) truncated to [sigma_min, sigma_max]
    and to the schedule's own range of sigma_t / alpha_t (by inverse CDF, so no mass piles at the ends)."""

    p_mean: float
    p_std: float
    sigma_min: float
    sigma_max: float
    sigma_data: float

    def __call__(self, schedule, n: int, rng) -> torch.Tensor:
        ends = torch.tensor([schedule.t_min, schedule.t_max], dtype=torch.float64)
        ratio = schedule.sigma(ends, torch.float64) / schedule.alpha(ends, torch.float64)
        lo, hi = max(self.sigma_min, float(ratio[0])), min(self.sigma_max, float(ratio[1]))
        if not lo < hi:
            raise ValueError(f"sigma range [{self.sigma_min}, {self.sigma_max}] misses the schedule's [{float(ratio[0]):.4g}, {float(ratio[1]):.4g}]")
        normal = torch.distributions.Normal(torch.tensor(self.p_mean, dtype=torch.float64), torch.tensor(self.p_std, dtype=torch.float64))
        u_lo, u_hi = normal.cdf(torch.tensor(math.log(lo), dtype=torch.float64)), normal.cdf(torch.tensor(math.log(hi), dtype=torch.float64))
        u = u_lo + (u_hi - u_lo) * rng.rand((n,)).to(torch.float64).cpu()
        sigma = normal.icdf(u.clamp(1e-12, 1 - 1e-12)).exp().clamp(lo, hi)
        return torch.atan(sigma / self.sigma_data).to(rng.device)


# ---- the methods -------------------------------------------------------------------------------


@dataclass
class SCMOptions:
    guidance: float = 1.0                  # teacher CFG w in u + w (c - u) for dx^/ds (rCM: c + 5 (c - u), our w = 6)
    sigma_data: float = 0.5                # TrigFlow's sigma_d (sCM: 0.5; rCM, RF video latents: 1.0)
    p_mean: float = -1.0                   # training sigma = sigma_d tan s ~ lognormal(p_mean, p_std) (sCM, Appendix G)
    p_std: float = 1.4
    sigma_min: float = 0.002               # the lognormal's truncation, intersected with the schedule's range
    sigma_max: float = 80.0
    tangent_warmup: int = 10000            # steps over which r rises from 0 to 1 (sCM: 10k; rCM: 1000)
    tangent_norm: str = "l2"               # l2: g / (||g|| + c) (sCM, rCM) | rms: ||g|| / sqrt(D) (FastGen) | none
    tangent_norm_c: float = 0.1
    adaptive_weighting: bool = True        # learned e^{-u(s)} weight and + u (sCM); false: weight 1
    timesteps: list[float] | None = None   # sampling timesteps in the schedule's units; None: one step from its end


class SCM:
    phases = ("generator",)

    def __init__(self, options: SCMOptions, teacher, train_cfg):
        _check_precision(train_cfg)
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.timesteps = check_timesteps(self.schedule, options.timesteps or [self.schedule.t_max])
        self.default_sample_steps = len(self.timesteps)
        self.nets = {"generator": student_denoiser(teacher)}
        use_jvp_attention(self.nets["generator"].backbone)
        if options.adaptive_weighting:
            self.nets["logvar"] = LogVarHead(options.sigma_data)
        self.engine = ScoreEngine(teacher, self.nets)
        self.times = TrigFlowTimes(options.p_mean, options.p_std, options.sigma_min, options.sigma_max, options.sigma_data)
        normalize_tangent(torch.zeros(1, 1), options.tangent_norm)  # validates the option now

    def phase(self, step: int) -> str:
        return "generator"

    def phase_nets(self, phase: str) -> list[str]:
        return [k for k in ("generator", "logvar") if k in self.nets]

    def generator_loss(self, batch):
        return scd_terms(self, batch)

    def critic_loss(self, batch):
        raise RuntimeError("sCM has no critic phase")

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return sample_student(self.nets["generator"], self.schedule, self.timesteps, noise, cond, generator)


def scd_terms(method, batch) -> tuple[torch.Tensor, dict]:
    """The sCD loss of one batch: data noised in TrigFlow, teacher tangent, student jvp, g, L."""
    if "x0" not in batch:
        raise ValueError("sCM distills on noised data: set data.source to imagefolder or digits")
    o, schedule, rng = method.options, method.schedule, batch["rng"]
    x0 = batch["x0"].to(torch.float64)
    s = method.times(schedule, x0.shape[0], rng)
    cos, sin = (append_dims(v, x0.ndim) for v in (torch.cos(s), torch.sin(s)))
    x_hat = cos * x0 + sin * o.sigma_data * rng.randn_like(batch["x0"]).to(torch.float64)
    with torch.no_grad():
        dx_ds = teacher_tangent(method.engine, x_hat, s, batch["cond"], batch["uncond"], o.guidance, o.sigma_data)
    student = method.nets["generator"]
    F_minus, dF = velocity_and_tangent(student, schedule, method.teacher.prediction_type, x_hat, s, batch["cond"], o.sigma_data, dx_ds)
    r = min(1.0, batch["step"] / o.tangent_warmup) if o.tangent_warmup > 0 else 1.0
    g = normalize_tangent(scm_tangent(F_minus, dF, x_hat, s, dx_ds, o.sigma_data, r), o.tangent_norm, o.tangent_norm_c)
    F = trigflow_velocity(trigflow_x0(student, schedule, method.teacher.prediction_type, x_hat, s, batch["cond"], o.sigma_data), x_hat, s, o.sigma_data)
    logvar = method.nets["logvar"](s) if "logvar" in method.nets else None
    loss = scm_loss(F, F_minus, g, logvar)
    logs = {"loss_scm": loss.mean().item(), "tangent_norm": g.flatten(1).norm(dim=1).mean().item(), "tangent_warmup_r": r}
    return loss.float(), logs


@dataclass
class RCMOptions(SCMOptions):
    dmd_weight: float = 0.02               # the DMD term's weight (rCM's 1 against 100 on the sCM term, in our reductions)
    dmd_warmup: int = 1000                 # sCM-only steps before the DMD term and the fake score start (rCM: 1000)
    dmd_guidance: float | None = None      # teacher w of the DMD term; None: ``guidance``
    ratio: int = 4                         # critic updates per generator update after the warmup (rCM: student every 5th)
    dm_t_range: list[float] = field(default_factory=lambda: [0.02, 0.98])      # DMD term t, 1000ths of the schedule
    critic_t_range: list[float] = field(default_factory=lambda: [0.0, 0.999])  # fake score t
    critic_loss: str = "native"            # native | x0
    critic_lora_rank: int = 0              # 0: full copy of the teacher as fake score
    normalize: str = "sample"              # DMD gradient normalization: sample (rCM: mean|G - D_real|) | batch | none
    adaptive_weighting: bool = False       # rCM weights the sCM term by a constant
    tangent_warmup: int = 1000


class RCM:
    """sCM plus DMD2's distribution-matching term and fake score (rCM, Zheng et al. 2025)."""

    phases = ("generator", "critic")

    def __init__(self, options: RCMOptions, teacher, train_cfg):
        if options.ratio < 1:
            raise ValueError(f"method.ratio={options.ratio}: need at least one critic update per generator update")
        self.scm = SCM(options, teacher, train_cfg)
        self.options, self.teacher, self.schedule = options, teacher, teacher.schedule
        self.timesteps, self.default_sample_steps = self.scm.timesteps, self.scm.default_sample_steps
        self.nets = self.scm.nets
        self.nets["critic"] = make_critic(teacher, options.critic_lora_rank)
        self.engine = self.scm.engine
        self.dm_times = default_range(self.schedule, *options.dm_t_range)
        self.critic_times = default_range(self.schedule, *options.critic_t_range)

    def phase(self, step: int) -> str:
        """sCM alone for ``dmd_warmup`` steps, then ``ratio`` critic updates and one generator update."""
        if step < self.options.dmd_warmup:
            return "generator"
        return "generator" if (step - self.options.dmd_warmup) % (self.options.ratio + 1) == self.options.ratio else "critic"

    def phase_nets(self, phase: str) -> list[str]:
        return self.scm.phase_nets(phase) if phase == "generator" else ["critic"]

    def _student(self, batch, n):
        return backward_simulation(self.nets["generator"], self.schedule, self.timesteps, batch["cond"], batch["rng"], (n, *self.teacher.latent_shape))

    def generator_loss(self, batch):
        loss, logs = scd_terms(self.scm, batch)
        if batch["step"] >= self.options.dmd_warmup and self.options.dmd_weight > 0:
            rng, n = batch["rng"], loss.shape[0]
            x = self._student(batch, n)
            t = self.dm_times(self.schedule, n, rng).to(x.device)
            w = self.options.guidance if self.options.dmd_guidance is None else self.options.dmd_guidance
            grad, dm_logs = distribution_matching_grad(self.engine, x, t, rng.randn_like(x), batch["cond"], batch["uncond"], w, self.options.normalize)
            dmd = surrogate_loss(x, grad)
            loss = loss + self.options.dmd_weight * dmd
            logs.update(dm_logs, loss_dm=dmd.mean().item())
        return loss, logs

    def critic_loss(self, batch):
        rng, n = batch["rng"], len(batch["prompts"])
        with torch.no_grad():
            x = self._student(batch, n)
        t = self.critic_times(self.schedule, n, rng).to(x.device)
        loss = fake_score_loss(self.nets["critic"], self.schedule, self.teacher.prediction_type, x, t, rng.randn_like(x), batch["cond"], self.options.critic_loss)
        return loss, {"loss_fake": loss.mean().item()}

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        return self.scm.sample(noise, cond, uncond, steps, guidance, generator)


def _check_precision(train_cfg) -> None:
    precision = getattr(train_cfg, "mixed_precision", "no")
    if precision != "no" and not torch.cuda.is_available():
        raise ValueError(f"mixed_precision={precision} on CPU: sCM's jvp (torch.func.jvp) fails under CPU autocast; set mixed_precision=no")


@register_method("scm", SCMOptions)
def build_scm(options: SCMOptions, teacher, train_cfg, prompts) -> SCM:
    return SCM(options, teacher, train_cfg)


@register_method("rcm", RCMOptions)
def build_rcm(options: RCMOptions, teacher, train_cfg, prompts) -> RCM:
    return RCM(options, teacher, train_cfg)
