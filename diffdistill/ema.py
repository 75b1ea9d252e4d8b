"""Exponential moving average of a module's parameters (Polyak averaging), kept in float32."""

from __future__ import annotations

import torch


@torch.no_grad()
def lerp_parameters(average: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * online, for a module copy that is itself used as a
    network (LCM's target, Phased DMD's deployed experts), not a float32 shadow."""
    for a, o in zip(average.parameters(), online.parameters()):
        a.lerp_(o.detach().to(a.dtype), 1 - decay)


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                self.shadow[key].lerp_(value.detach().float(), 1 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:3]} ...")
        self.shadow = {k: v.float().clone() for k, v in state.items()}
