"""Conversions between the parameterizations of a diffusion network's output.

All processes here share one form, ``x_t = alpha * x0 + sigma * eps`` (VP: alpha = sqrt(abar),
sigma = sqrt(1 - abar); rectified flow: alpha = 1 - t, sigma = t). Given (x_t, alpha, sigma), any
one of x0, eps, v or flow velocity determines the others:

    eps = (x_t - alpha * x0) / sigma
    v   = alpha * eps - sigma * x0            (Salimans & Ho 2022, "v-prediction")
    u   = eps - x0                            (rectified-flow velocity dx_t/dt for alpha=1-t, sigma=t)
    score = (alpha * x0 - x_t) / sigma**2     (Tweedie)

``alpha`` and ``sigma`` are tensors broadcastable to ``x_t`` (see :func:`append_dims`). This is the
only module that converts: backbones declare their native prediction type and the Denoiser calls
:func:`to_x0` once.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Appends trailing singleton dims so a per-sample value broadcasts over a batch of images."""
    if x.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor of {x.ndim} dims to {ndim} dims")
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def eps_from_x0(x_t, x0, alpha, sigma):
    return (x_t - alpha * x0) / sigma


def x0_from_eps(x_t, eps, alpha, sigma):
    return (x_t - sigma * eps) / alpha


def v_from_x0(x_t, x0, alpha, sigma):
    """v = alpha * eps - sigma * x0 (normalized so alpha**2 + sigma**2 = 1 is not assumed)."""
    return alpha * eps_from_x0(x_t, x0, alpha, sigma) - sigma * x0


def x0_from_v(x_t, v, alpha, sigma):
    """Inverse of :func:`v_from_x0`: x0 = (alpha * x_t - sigma * v) / (alpha**2 + sigma**2)."""
    return (alpha * x_t - sigma * v) / (alpha**2 + sigma**2)


def flow_from_x0(x_t, x0, alpha, sigma):
    """Rectified-flow velocity u = eps - x0 (SD3 / Flux convention, x_t = (1-t) x0 + t eps)."""
    return eps_from_x0(x_t, x0, alpha, sigma) - x0


def x0_from_flow(x_t, u, alpha, sigma):
    """Inverse of :func:`flow_from_x0`: x_t = alpha x0 + sigma (u + x0) gives x0 = (x_t - sigma u)/(alpha + sigma)."""
    return (x_t - sigma * u) / (alpha + sigma)


def score_from_x0(x_t, x0, alpha, sigma):
    """Score of the noised marginal, grad log p_t(x_t) = (alpha * x0 - x_t) / sigma**2 (Tweedie)."""
    return (alpha * x0 - x_t) / sigma**2


_TO_X0 = {
    "epsilon": x0_from_eps,
    "v_prediction": x0_from_v,
    "sample": lambda x_t, out, alpha, sigma: out,
    "flow": x0_from_flow,
}
_FROM_X0 = {
    "epsilon": eps_from_x0,
    "v_prediction": v_from_x0,
    "sample": lambda x_t, x0, alpha, sigma: x0,
    "flow": flow_from_x0,
}


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in _TO_X0:
        raise ValueError(
            f"unknown prediction type {prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}"
        )
    return prediction_type


def to_x0(prediction_type: str, x_t, output, alpha, sigma):
    """Converts a network output of the given prediction type to an x0 estimate."""
    return _TO_X0[check_prediction_type(prediction_type)](x_t, output, alpha, sigma)


def from_x0(prediction_type: str, x_t, x0, alpha, sigma):
    """Converts an x0 estimate to the given prediction type (the target of native-space losses)."""
    return _FROM_X0[check_prediction_type(prediction_type)](x_t, x0, alpha, sigma)
