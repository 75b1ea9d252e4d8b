"""The Method protocol and the registry. No logic to inherit: a method is a small object.

A method owns the modules it trains (``nets``, by name), says which phase a step is, and returns
per-sample losses. It never calls an optimizer, never touches the accelerator, never does I/O:
the trainer does all of that. The trainer may replace entries of ``nets`` with wrapped modules
(DDP), so a method always calls ``self.nets[name](...)`` rather than keeping its own reference.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Protocol

import torch

from diffdistill.config import ConfigError, _coerce, unknown_key_error
from diffdistill.guidance import guidance_from_options


class Method(Protocol):
    nets: dict[str, torch.nn.Module]
    phases: tuple[str, ...]          # the phases this method uses, e.g. ("generator", "critic")
    default_sample_steps: int

    def phase(self, step: int) -> str:
        """'generator' or 'critic': which loss this optimizer step minimizes."""

    def phase_nets(self, phase: str) -> list[str]:
        """Names in ``nets`` whose parameters the phase's optimizer steps."""

    def generator_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Per-sample loss (shape (n,)) and float logs."""

    def critic_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """Per-sample loss of the critic phase (fake score, GAN head)."""

    def sample(self, noise: torch.Tensor, cond: dict, uncond: dict, steps: int, guidance: float, generator) -> torch.Tensor:
        """x0 latents from the current generator, as a user would sample it."""


# name -> (options dataclass, builder(options, teacher, train_cfg, prompts) -> Method)
METHODS: dict[str, tuple[type, Callable]] = {}
# imported on first use so a recipe's method registers itself
_MODULES = ("sft", "kd", "dmd", "dmd2", "sid", "sim", "fdistill", "diff_instruct", "consistency", "scm", "rcm", "phased_dmd", "meanflow", "ladd")


def register_method(name: str, options_cls: type):
    def wrap(builder):
        METHODS[name] = (options_cls, builder)
        return builder

    return wrap


def _load_all() -> None:
    for module in _MODULES:
        importlib.import_module(f"diffdistill.methods.{module}")


def method_options(spec: dict):
    """Validates ``method: {name: ..., **options}`` against that method's own dataclass."""
    _load_all()
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in METHODS:
        raise unknown_key_error(str(name), sorted(METHODS), where="method")
    options_cls, _ = METHODS[name]
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    hints = __import__("typing").get_type_hints(options_cls)
    kwargs = {}
    for key, value in spec.items():
        if key == "student_lora_rank" and key not in fields:
            takers = ", ".join(sorted(n for n, (cls, _) in METHODS.items() if "student_lora_rank" in {f.name for f in dataclasses.fields(cls)}))
            raise ConfigError(f"method {name} trains a full student, not LoRA adapters on the teacher: drop method.student_lora_rank, "
                              f"or use a method with LoRA students ({takers})")
        if key not in fields:
            raise unknown_key_error(f"method.{key}", [f"method.{k}" for k in fields], where=f"{name} option")
        kwargs[key] = _coerce(value, hints[key], f"method.{key}")
    try:
        return name, options_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {name}: {e}") from e


TRANSFORMER_KINDS = ("dit", "pixart", "sd3", "flux", "sana")


def check_teacher_options(options, teacher) -> None:
    """Options this teacher cannot honour, refused before any network is copied: CFG-style guidance
    that needs an unconditional pass of a guidance-distilled teacher's fake score (which has only a
    guidance input), and a patch GAN head, which reads a UNet's bottleneck map, on a transformer.
    (Raised as ValueError; :func:`build_method` names the method in the ConfigError.)"""
    if getattr(options, "gan_head", None) == "patch" and teacher.kind in TRANSFORMER_KINDS:
        raise ValueError(f"gan_head=patch reads a UNet's bottleneck feature map (DMD2's SD1.5 head), and a {teacher.kind} "
                          "teacher's features are tokens: use gan_head=pooled")
    if teacher.guidance_distilled and hasattr(options, "guidance_style"):
        guidance = guidance_from_options(options)
        if guidance.fake != 1.0 or guidance.fake_train != 1.0 or guidance.fake_range is not None:
            raise ValueError(f"guidance_style={options.guidance_style} guides the fake score by CFG, which needs an "
                              "unconditional pass, and this teacher is guidance-distilled (its guidance is one input, no CFG pair): "
                              "use guidance_style=cfg (or random without fake_guidance_range)")


def build_method(spec: dict, teacher, train_cfg, prompts: list[str] = ()) -> Method:
    """``prompts`` are the training prompts, for methods that precompute teacher outputs (DMD's pairs)."""
    name, options = method_options(spec)
    try:
        check_teacher_options(options, teacher)
        return METHODS[name][1](options, teacher, train_cfg, list(prompts) or [""])
    except ValueError as e:
        raise ConfigError(f"method {name}: {e}") from e
