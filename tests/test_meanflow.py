"""MeanFlow against closed forms on Gaussian data, and its jvp against finite differences.

For data N(MU, S^2) on the flow path z_t = (1 - t) x + t eps the probability-flow ODE keeps
xi = (z_t - (1 - t) MU) / sigma(t) constant, sigma(t)^2 = (1 - t)^2 S^2 + t^2, so the exact average
velocity is u*(z_t, r, t) = (z_t - z_r) / (t - r) = -MU + xi (sigma(t) - sigma(r)) / (t - r), where
(sigma(t) - sigma(r)) / (t - r) = ((t + r)(1 + S^2) - 2 S^2) / (sigma(t) + sigma(r)) (no 0/0 at r = t).
A VP teacher is the same in the flow frame z = x_t / (alpha + sigma), so both schedules are checked.
"""

import pytest
import torch
from torch import nn

from diffdistill.backbones.loading import Teacher
from diffdistill.config import ConfigError, TrainConfig
from diffdistill.methods import build_method
from diffdistill.methods.meanflow import flow_frame, flow_range, meanflow_loss, meanflow_times, teacher_velocity, total_derivative
from diffdistill.randomness import BatchRandom
from diffdistill.schedules import FlowSchedule, VPSchedule
from diffdistill.toy import SD15_SCHEDULE

MU, S = 1.5, 0.7
SCHEDULES = {"vp": VPSchedule.from_scheduler_config(SD15_SCHEDULE), "flow": FlowSchedule()}


def sigma_of(t):
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def exact_u(z, r, t):
    xi = (z - (1 - t) * MU) / sigma_of(t)
    return -MU + xi * ((t + r) * (1 + S**2) - 2 * S**2) / (sigma_of(t) + sigma_of(r))


def flow_coordinates(schedule, x, timestep):
    """(z, flow time) of a network input x at the model timestep."""
    t = timestep.double() / schedule.num_train_timesteps if schedule.kind == "flow" else timestep.double()
    alpha, sigma = schedule.alpha(t, torch.float64)[:, None], schedule.sigma(t, torch.float64)[:, None]
    return x / (alpha + sigma), sigma / (alpha + sigma)


class GaussianX0(nn.Module):
    """The exact teacher: Tweedie's E[x0 | x_t] in the flow frame (the same posterior as in any frame)."""

    backbone_kind = "plain"

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, timestep, cond):
        z, t = flow_coordinates(self.schedule, x, timestep)
        return z - t * exact_u(z, t, t)


class MeanFlowX0(nn.Module):
    """A student whose u is u* + a (t - r) z (a = 0: exact), as an x0 output D = z - t u. It reads h = t - r
    back from the interval embedding's first sine (with interval_scale 1 its angle is h), and keeps the
    (z, r, t) of its last call with gradient (the loss's forward)."""

    backbone_kind = "plain"

    def __init__(self, schedule, a=0.0):
        super().__init__()
        self.schedule, self.a, self.seen = schedule, nn.Parameter(torch.tensor(a, dtype=torch.float64)), None

    def forward(self, x, timestep, cond):
        z, t = flow_coordinates(self.schedule, x, timestep)
        r = t - torch.asin(cond["timestep_cond"][:, :1].double())
        if torch.is_grad_enabled():
            self.seen = (z.detach(), r.detach(), t.detach())
        return z - t * (exact_u(z, r, t) + self.a * (t - r) * z)


def gaussian_method(kind, a=0.0, **options):
    schedule = SCHEDULES[kind]
    teacher = Teacher(pipe=None, backbone=GaussianX0(schedule), component="exact", kind="plain", schedule=schedule, prediction_type="sample",
                      path="exact:gaussian", make_student=lambda **extra: MeanFlowX0(schedule, a), data_shape=(2,))
    return build_method({"name": "meanflow", "interval_scale": 1.0, "interval_embedding_dim": 8, **options}, teacher, TrainConfig())


def gaussian_batch(n=512, seed=0):
    x0 = MU + S * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {"prompts": [""] * n, "cond": {}, "uncond": {}, "x0": x0, "rng": BatchRandom(seed), "step": 0}


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_closed_form_is_the_teachers_average_velocity(kind):
    """u* against the exact teacher's ODE integrated from t down to r (RK4, 100 steps), in the flow frame."""
    method = gaussian_method(kind)
    lo, hi = flow_range(SCHEDULES[kind])
    n = 64
    g = torch.Generator().manual_seed(1)
    t = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    r = torch.where(torch.arange(n) % 2 == 0, lo + (t - lo) * torch.rand(n, generator=g, dtype=torch.float64), t)
    z_t = (1 - t[:, None]) * MU + sigma_of(t[:, None]) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    velocity = lambda z, s: teacher_velocity(method.engine, z, s, {}, {}, 1.0)
    torch.testing.assert_close(velocity(z_t, t), exact_u(z_t, t[:, None], t[:, None]), rtol=1e-5, atol=1e-5)
    z, s, dt = z_t.clone(), t.clone(), (r - t) / 100
    for _ in range(100):
        k1 = velocity(z, s)
        k2 = velocity(z + dt[:, None] / 2 * k1, s + dt / 2)
        k3 = velocity(z + dt[:, None] / 2 * k2, s + dt / 2)
        k4 = velocity(z + dt[:, None] * k3, s + dt)
        z, s = z + dt[:, None] / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + dt
    moved = r < t
    average = (z_t[moved] - z[moved]) / (t - r)[moved, None]
    torch.testing.assert_close(average, exact_u(z_t, r[:, None], t[:, None])[moved], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_meanflow_loss_vanishes_at_the_exact_average_velocity(kind):
    loss, logs = gaussian_method(kind).generator_loss(gaussian_batch())
    assert loss.shape == (512,) and float(loss.detach().max()) < 1e-6, float(loss.detach().max())
    assert logs["velocity_mse"] < 1e-8


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_meanflow_loss_and_gradient_of_a_perturbed_student(kind):
    """u = u* + a (t - r) z: d/dt along the ODE adds a (z + (t - r) v), so u - u_tgt = a (t - r)(2 z + (t - r) v),
    and with the target and the weight held (stopgrad) dL/da = 2 (u - u_tgt) . (t - r) z / (||u - u_tgt||^2 + c)."""
    a, c = 0.3, 0.01
    method = gaussian_method(kind, a=a)
    loss, _ = method.generator_loss(gaussian_batch())
    loss.mean().backward()
    z, r, t = method.nets["generator"].backbone.seen
    v = exact_u(z, t, t)
    delta = a * (t - r) * (2 * z + (t - r) * v)
    squared = delta.square().sum(1)
    torch.testing.assert_close(loss.double(), squared / (squared + c), rtol=1e-4, atol=1e-7)
    moved = (r < t).squeeze(1)
    assert float(loss[moved].detach().mean()) > 1e-2 and float(loss[~moved].detach().max()) < 1e-6
    grad = (2 * (delta * (t - r) * z).sum(1) / (squared + c)).mean()
    torch.testing.assert_close(method.nets["generator"].backbone.a.grad, grad, rtol=1e-4, atol=1e-8)


def test_adaptive_weight_is_held_out_of_the_gradient():
    u, target = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, 3, dtype=torch.float64)
    meanflow_loss(u, target, p=1.0, c=0.01).sum().backward()
    delta = (u - target).detach()
    torch.testing.assert_close(u.grad, 2 * delta / (delta.square().sum(1, keepdim=True) + 0.01))


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_one_and_few_step_samples_follow_the_teacher_ode(kind):
    """The exact student's samples are the ODE map of the start: x = MU + S xi(z_start), at any step count."""
    method = gaussian_method(kind)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(3))
    hi = flow_range(SCHEDULES[kind])[1]
    z = noise.double() / flow_frame(SCHEDULES[kind], torch.tensor([hi]))[1]  # x_T = noise, as every sampler here starts
    expected = MU + S * (z - (1 - hi) * MU) / sigma_of(torch.tensor(hi, dtype=torch.float64))
    for steps in (1, 3):
        torch.testing.assert_close(method.sample(noise, {}, {}, steps, 1.0).double(), expected, rtol=1e-5, atol=1e-5)


def test_time_pairs_follow_the_papers_sampler():
    """t = max and r = min of two logit-normal(-0.4, 1) draws, r = t for 75%; on a flow schedule
    P(logit t <= x) = Phi((x + 0.4))^2, and t stays in a VP schedule's flow range."""
    n = 40000
    r, t = meanflow_times(SCHEDULES["flow"], n, BatchRandom(0), -0.4, 1.0, 0.75)
    assert (r <= t).all() and abs(float((r == t).double().mean()) - 0.75) < 0.01
    normal = torch.distributions.Normal(-0.4, 1.0)
    for x in (-1.5, -0.4, 0.5, 1.5):
        expected = float(normal.cdf(torch.tensor(x))) ** 2
        assert abs(float((torch.logit(t) <= x).double().mean()) - expected) < 0.01, x
    moved = r < t  # r is the smaller draw there: P(logit r <= x) = 1 - (1 - Phi)^2
    assert abs(float((torch.logit(r[moved]) <= -0.4).double().mean()) - 0.75) < 0.015
    lo, hi = flow_range(SCHEDULES["vp"])
    r, t = meanflow_times(SCHEDULES["vp"], 4000, BatchRandom(1), -0.4, 1.0, 0.75)
    assert 0.02 < lo < 0.03 and 0.93 < hi < 0.94 and t.min() >= lo and t.max() <= hi and (r <= t).all()


def finite_difference(u_fn, z, r, t, v, h):
    with torch.no_grad():
        return (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)


def interval_students():
    """(method, student, z, cond, h, tolerance) for a tiny UNet, the toy MLP and tiny SD3, Flux and SANA transformers, their
    interval input (cond_proj) set at random; h: where the central difference has converged before the float32 timestep the
    Denoiser passes on quantizes it (a random UNet is strongly curved in t); the transformers embed t in float32 (diffusers'
    sinusoids), whose rounding over h = 1e-4 is ~1e-3 of du/dt: their tolerance."""
    from diffdistill.backbones.tiny import tiny_unet
    from diffdistill.conditioning import encode_prompts
    from diffdistill.teachers import resolve_teacher
    from diffdistill.toy import ring8, toy_teacher

    unet = Teacher(pipe=None, backbone=tiny_unet(0), component="unet", kind="unet", schedule=SCHEDULES["vp"], prediction_type="epsilon", path="tiny")
    toy = toy_teacher(ring8(), generator_width=32, generator_depth=2, generator_max_frequency=10.0)
    g = torch.Generator().manual_seed(0)
    cases = [(unet, torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64),
              {"encoder_hidden_states": torch.linspace(-1, 1, 2 * 4 * 32, dtype=torch.float64).view(2, 4, 32)}, 1e-5, 1e-3),
             (toy, torch.randn(2, 2, generator=g, dtype=torch.float64), {}, 1e-3, 1e-3)]
    for arch in ("sd3", "flux", "sana"):
        teacher = resolve_teacher(f"tiny:{arch}")
        cond = {k: v.double() for k, v in encode_prompts(teacher.pipe, ["a", "b"]).items()}
        cases.append((teacher, torch.randn(2, *teacher.latent_shape, generator=g, dtype=torch.float64), cond, 1e-4, 2e-3))
    for teacher, z, cond, h, tolerance in cases:
        method = build_method({"name": "meanflow", "interval_embedding_dim": 16, "interval_scale": 10.0}, teacher, TrainConfig())
        student = method.nets["generator"].double().eval()
        backbone = student.backbone
        proj = (backbone.get_submodule(backbone.interval_embedder) if hasattr(backbone, "interval_embedder") else getattr(backbone, "time_embedding", backbone)).cond_proj
        assert proj.weight.abs().max() == 0  # zero at first: the student starts with u = its velocity for every r
        t = torch.tensor([0.3, 0.8], dtype=torch.float64)
        torch.testing.assert_close(method.u(student, z, t - 0.2, t, cond), method.u(student, z, t, t, cond), rtol=0, atol=0)
        if teacher.kind != "plain":  # and u(z, t, t) is the teacher's velocity: the jvp's attention processors compute what the teacher's do
            w = teacher.student_guidance if teacher.guidance_distilled else 1.0  # Flux: the student's folded guidance scale
            velocity = teacher_velocity(method.engine, z, t, {k: v.float() for k, v in cond.items()}, None, w)
            torch.testing.assert_close(method.u(student, z, t, t, cond), velocity, rtol=1e-4, atol=1e-4 * velocity.abs().max().item())
        torch.manual_seed(0)
        nn.init.normal_(proj.weight, std=0.5)
        yield method, student, z, cond, h, tolerance


def test_jvp_total_derivative_equals_a_finite_difference():
    """du/dt = v d_z u + d_t u (r held) through UNet, toy-MLP, SD3, Flux and SANA students with a live interval input."""
    for method, student, z, cond, h, tolerance in interval_students():
        v = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        t, r = torch.tensor([0.3, 0.8], dtype=torch.float64), torch.tensor([0.1, 0.05], dtype=torch.float64)
        u_fn = lambda z, r, t: method.u(student, z, r, t, cond)  # noqa: B023 (used within the iteration)
        u, du_dt = total_derivative(u_fn, z, r, t, v)
        torch.testing.assert_close(u, u_fn(z, r, t))
        fd = finite_difference(u_fn, z, r, t, v, h)
        torch.testing.assert_close(du_dt, fd, rtol=1e-2, atol=tolerance * du_dt.abs().max().item())
        # r's tangent is 0: moving r alone changes u (the interval input is live), and the jvp ignores it
        assert (u_fn(z, r + 0.05, t) - u).abs().max() > 1e-3


def test_a_transformer_without_one_timestep_embedder_is_a_config_error():
    """DiT embeds the timestep in every block (one embedder each): no single place for h."""
    from diffdistill.teachers import resolve_teacher

    with pytest.raises(ConfigError, match="one timestep embedder.*DiTTransformer2DModel has 0 outside its blocks"):
        build_method({"name": "meanflow"}, resolve_teacher("tiny:dit"), TrainConfig())


def test_export_refuses_a_few_step_meanflow_student_of_a_vp_teacher():
    """K > 1 uniform flow times are no integer VP timesteps (K = 1 exports: tests/test_export_students.py)."""
    from diffdistill.export.method_students import ExportError, student_spec

    teacher = Teacher(pipe=None, backbone=None, component="unet", kind="unet", schedule=SCHEDULES["vp"], prediction_type="epsilon", path="tiny")
    with pytest.raises(ExportError, match="no integer timesteps.*method.sample_steps=1"):
        student_spec({"name": "meanflow", "sample_steps": 2}, teacher, TrainConfig())
