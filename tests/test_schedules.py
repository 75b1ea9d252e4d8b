import pytest
import torch

from diffdistill.randomness import BatchRandom
from diffdistill.schedules import (
    FlowSchedule,
    LogitNormalTimesteps,
    LogNormalTimesteps,
    ShiftedUniformTimesteps,
    UniformTimesteps,
    VPSchedule,
    add_noise,
    make_timestep_sampler,
    schedule_from_scheduler_config,
    sigma_alpha_ratio,
)

SD15 = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "squaredcos_cap_v2"])
def test_vp_add_noise_matches_diffusers(beta_schedule):
    from diffusers import DDPMScheduler

    cfg = {**SD15, "beta_schedule": beta_schedule}
    ours = schedule_from_scheduler_config(cfg)
    theirs = DDPMScheduler.from_config(cfg)
    x0, eps, t = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8), torch.tensor([0, 20, 500, 980, 999])
    torch.testing.assert_close(add_noise(ours, x0, eps, t.float()), theirs.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)


def test_sd15_reference_values():
    s = VPSchedule.from_scheduler_config(SD15)
    t = torch.tensor([999.0])
    assert s.alpha(t).item() == pytest.approx(0.0683, abs=1e-4)
    assert s.sigma(t).item() == pytest.approx(0.9977, abs=1e-4)
    assert sigma_alpha_ratio(s, torch.tensor([625.0])).item() == pytest.approx(2.50, abs=0.01)
    lo, hi = sigma_alpha_ratio(s, torch.tensor([20.0, 980.0])).tolist()
    assert (lo, hi) == (pytest.approx(0.138, abs=2e-3), pytest.approx(13.0, abs=0.1))


def test_vp_trailing_timesteps_are_dmd2s():
    s = VPSchedule.from_scheduler_config(SD15)
    assert s.sampling_timesteps(4) == [999, 749, 499, 249]
    assert s.sampling_timesteps(1) == [999]


def test_vp_snr_inverse():
    s = VPSchedule.from_scheduler_config(SD15)
    t = torch.tensor([3.0, 100.5, 777.0, 998.0], dtype=torch.float64)
    torch.testing.assert_close(s.t_from_snr_ratio(sigma_alpha_ratio(s, t)), t, rtol=0, atol=1e-3)


def test_flow_schedule_matches_sd3_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = schedule_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **theirs.config})
    assert isinstance(ours, FlowSchedule) and ours.shift_factor == 3.0
    theirs.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])  # diffusers applies its shift to given sigmas
    torch.testing.assert_close(torch.tensor(ours.sampling_timesteps(4), dtype=torch.float32), theirs.sigmas[:-1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.model_timestep(torch.tensor([0.5])), torch.tensor([500.0]))
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    noised = torch.cat([theirs.scale_noise(x0[i : i + 1], theirs.timesteps[i + 1 : i + 2], eps[i : i + 1]) for i in (0, 1)])
    torch.testing.assert_close(add_noise(ours, x0, eps, theirs.sigmas[1:3]), noised, rtol=1e-5, atol=1e-6)


def test_vp_rejects_flow_config():
    with pytest.raises(ValueError, match="flow"):
        VPSchedule.from_scheduler_config({"shift": 3.0, "num_train_timesteps": 1000})


def test_uniform_integer_sampler_covers_dmd2_range():
    s = VPSchedule.from_scheduler_config(SD15)
    t = UniformTimesteps(20, 980, integer=True)(s, 20000, BatchRandom(0))
    assert t.min() == 20 and t.max() == 980 and torch.equal(t, t.floor())
    assert t.float().mean().item() == pytest.approx(500, abs=5)


def test_lognormal_sampler_has_edm_statistics():
    s = VPSchedule.from_scheduler_config(SD15)
    t = LogNormalTimesteps(-1.2, 1.2)(s, 2000, BatchRandom(1))
    wanted = (-1.2 + 1.2 * BatchRandom(1).randn((2000,))).double().exp()  # the same draws
    table = sigma_alpha_ratio(s, torch.tensor([0.0, 999.0]))
    inside = (wanted > table[0]) & (wanted < table[1])  # outside, t clamps to the schedule's ends
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(sigma_alpha_ratio(s, t)[inside], wanted[inside], rtol=2e-3, atol=0)


def test_logit_normal_sampler_on_flow():
    s = FlowSchedule(shift=1.0)
    t = LogitNormalTimesteps(0.0, 1.0)(s, 20000, BatchRandom(2))
    assert 0 < t.min() and t.max() < 1
    assert torch.logit(t.double()).mean().item() == pytest.approx(0.0, abs=0.03)
    assert torch.logit(t.double()).std().item() == pytest.approx(1.0, abs=0.03)


def test_unknown_sampler_names_valid_ones():
    with pytest.raises(ValueError, match="uniform, lognormal, logit_normal"):
        make_timestep_sampler("cosine")


def test_batch_random_is_independent_of_process_split():
    whole = BatchRandom(7, 0, 1).randn((6, 3))
    parts = [BatchRandom(7, r, 2).randn((3, 3)) for r in range(2)]
    torch.testing.assert_close(torch.cat(parts), whole)


def test_rcm_shifted_uniform_times_have_median_ratio_shift_and_clamp_their_tail_at_the_end():
    """sigma/alpha = 5u / (1 - u): median 5, and P(ratio > r_max) = 5 / (5 + r_max) of draws clamp at t = 999."""
    schedule = VPSchedule.from_scheduler_config(SD15)
    g = torch.Generator().manual_seed(0)
    rng = type("R", (), {"rand": lambda self, shape: torch.rand(shape, generator=g)})()
    t = ShiftedUniformTimesteps(5.0)(schedule, 40000, rng)
    r_max = float(sigma_alpha_ratio(schedule, torch.tensor([999.0])))
    assert abs(float((t >= 999).double().mean()) - 5 / (5 + r_max)) < 0.01
    assert abs(float(sigma_alpha_ratio(schedule, t.double().median()[None])) - 5.0) < 0.15
    assert t.min() >= 0 and t.max() <= 999
