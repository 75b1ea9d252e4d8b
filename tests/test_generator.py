"""DMD2's backward simulation: k ~ U{0..K-1} student steps from noise without gradient, then one with."""

import torch

from diffdistill.generator import backward_simulation
from diffdistill.randomness import BatchRandom
from diffdistill.schedules import VPSchedule
from diffdistill.toy import SD15_SCHEDULE

TIMESTEPS = [999.0, 749.0, 499.0, 249.0]


class Recorder(torch.nn.Module):
    """A student that records each call's timestep and whether it builds a graph."""

    def __init__(self):
        super().__init__()
        self.scale, self.calls = torch.nn.Parameter(torch.tensor(0.5)), []

    def forward(self, x, t, cond):
        self.calls.append((float(t[0]), torch.is_grad_enabled()))
        return self.scale * x


def test_backward_simulation_runs_k_uniform_steps_and_keeps_only_the_last_graph():
    schedule, counts = VPSchedule.from_scheduler_config(SD15_SCHEDULE), [0] * len(TIMESTEPS)
    for seed in range(400):
        student = Recorder()
        x = backward_simulation(student, schedule, TIMESTEPS, {}, BatchRandom(seed), (2, 3))
        times, grads = zip(*student.calls)
        k = len(times) - 1
        counts[k] += 1
        assert list(times) == TIMESTEPS[: k + 1]  # the student's own sampler, in order, from noise
        assert grads == (False,) * k + (True,) and x.requires_grad  # the graph reaches the last step only
    assert all(70 <= c <= 130 for c in counts), counts  # k uniform over 0..3 (100 expected each; a binomial sd of 8.7)
