"""Optimizer state in host memory (``optimizer_offload: true``), for one process without FSDP.

AdamW keeps two float32 moments per trained parameter: 8 bytes, twice the weights themselves. Here
they live in host memory beside a host copy of each parameter; a step copies the gradients to the
host, runs the optimizer there, and copies the updated parameters back. The device keeps the
weights and gradients only. (Under FSDP, ``cpu_offload`` does this for shards, with PyTorch's own
``CPUOffloadPolicy``.) The host copies are the optimizer's parameters, so the update is the one the
same optimizer makes on the device, and the checkpoint format is unchanged.
"""

from __future__ import annotations

import torch


class HostOffloadedOptimizer:
    """``make(host_params)`` -> the optimizer that steps host copies of ``params`` (same order)."""

    def __init__(self, params: list[torch.nn.Parameter], make):
        self.params = list(params)
        pin = torch.cuda.is_available()  # pinned pages let the copies overlap; CUDA only
        self.host = [torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=True) for p in self.params]
        if pin:
            self.host = [torch.nn.Parameter(h.data.pin_memory(), requires_grad=True) for h in self.host]
        self.optimizer = make(self.host)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups  # the trainer sets each step's learning rate here

    @property
    def state(self):
        return self.optimizer.state

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for param, host in zip(self.params, self.host):
            host.grad = None if param.grad is None else param.grad.to("cpu", non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the gradients have arrived
        self.optimizer.step()
        for param, host in zip(self.params, self.host):
            param.copy_(host, non_blocking=True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restores the moments; the host copies are refreshed from the live parameters, which a
        resume has just loaded (they are no longer the ones copied when the run was built)."""
        self.optimizer.load_state_dict(state)
        for param, host in zip(self.params, self.host):
            host.copy_(param)


__all__ = ["HostOffloadedOptimizer"]
