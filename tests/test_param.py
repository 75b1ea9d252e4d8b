import pytest
import torch

from diffdistill import param


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.9, 0.5, 0.1, 0.99], dtype=torch.float64).view(4, 1, 1, 1)
    sigma = torch.tensor([0.3, 0.8, 0.995, 0.05], dtype=torch.float64).view(4, 1, 1, 1)
    return x0, eps, alpha, sigma, alpha * x0 + sigma * eps


@pytest.mark.parametrize("kind", param.PREDICTION_TYPES)
def test_round_trip_through_every_prediction_type(kind, state):
    x0, eps, alpha, sigma, x_t = state
    out = param.from_x0(kind, x_t, x0, alpha, sigma)
    torch.testing.assert_close(param.to_x0(kind, x_t, out, alpha, sigma), x0, rtol=0, atol=1e-10)


def test_targets_match_their_definitions(state):
    x0, eps, alpha, sigma, x_t = state
    torch.testing.assert_close(param.from_x0("epsilon", x_t, x0, alpha, sigma), eps)
    torch.testing.assert_close(param.from_x0("v_prediction", x_t, x0, alpha, sigma), alpha * eps - sigma * x0)
    torch.testing.assert_close(param.from_x0("flow", x_t, x0, alpha, sigma), eps - x0)


def test_v_prediction_matches_diffusers_velocity():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    x0, eps, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    abar = sched.alphas_cumprod[t].view(2, 1, 1, 1)
    x_t = sched.add_noise(x0, eps, t)
    v = param.from_x0("v_prediction", x_t, x0, abar.sqrt(), (1 - abar).sqrt())
    torch.testing.assert_close(v, sched.get_velocity(x0, eps, t), rtol=1e-4, atol=1e-5)


def test_score_is_tweedie(state):
    x0, eps, alpha, sigma, x_t = state
    torch.testing.assert_close(param.score_from_x0(x_t, x0, alpha, sigma), -eps / sigma)


def test_flow_conversion_on_rectified_flow_path():
    t = torch.tensor([0.2, 0.7], dtype=torch.float64).view(2, 1)
    x0, eps = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    x_t = (1 - t) * x0 + t * eps
    u = eps - x0  # d x_t / dt
    torch.testing.assert_close(param.to_x0("flow", x_t, u, 1 - t, t), x0)


def test_unknown_prediction_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="epsilon, v_prediction, sample, flow"):
        param.to_x0("velocity", None, None, None, None)
