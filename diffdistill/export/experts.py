"""Phased DMD students in a diffusers folder: one backbone per expert, run in turn.

The folder is the teacher's pipeline with expert 0 as its backbone (``unet/`` or ``transformer/``)
and every later expert k beside it (``unet_expert_k/``), plus a scheduler whose K-step chain is
the experts' deterministic (DDIM) steps, t_k -> t_{k+1}, the last to x0:

* VP teachers: ``EulerDiscreteScheduler`` at the experts' timesteps (``timesteps=[...]``), final sigma
  0. Euler's step in the variance-exploding sigma, ``x + (sigma' - sigma)(x - x0) / sigma``, is DDIM's
  step written in ``x / alpha``; ``timestep_spacing="leading"`` makes its initial noise scale
  ``sqrt(sigma^2 + 1)`` exact ("trailing" uses sigma alone). DDIMScheduler would step to
  ``t - T // K``, which matches only schedules with even gaps, and takes no timesteps.
* flow teachers: ``FlowMatchEulerDiscreteScheduler`` without re-noising (see :mod:`.flow`).

No stock pipeline switches backbones between steps, so the card gives the few lines that do it:
``callback_on_step_end`` puts expert k+1 in place after step k. The export runs that same
callback to check the folder against diffdistill's sampler, and the test runs the card's lines.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from diffusers import EulerDiscreteScheduler

from diffdistill.export.card import model_card
from diffdistill.export.diffusers_folder import (
    _check_scheduler,
    call_text,
    check_requested_scheduler,
    default_prompts,
    exported_backbone,
    global_rng,
    sampling_call,
    student_pipeline,
    verify,
)
from diffdistill.export.errors import ExportError
from diffdistill.export.flow import flow_scheduler
from diffdistill.export.student import Student


def experts_scheduler(student: Student, requested: str | None = None):
    """The scheduler whose steps are the experts' deterministic steps (see the module docstring)."""
    teacher = student.teacher
    if teacher.schedule.kind == "flow":
        check_requested_scheduler(student, requested, "FlowMatchEulerDiscreteScheduler")
        return flow_scheduler(student, deterministic=True)
    check_requested_scheduler(student, requested, "EulerDiscreteScheduler")
    if teacher.prediction_type not in ("epsilon", "v_prediction"):
        raise ExportError(f"EulerDiscreteScheduler cannot read {teacher.prediction_type!r} predictions; phased experts of this teacher have no diffusers export")
    if any(not float(t).is_integer() for t in student.timesteps):
        raise ExportError(f"expert timesteps {student.timesteps} are not integers, which diffusers' discrete schedulers need; retrain with integer method.timesteps")
    source = teacher.pipe.scheduler.config
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    scheduler = EulerDiscreteScheduler(**{k: source[k] for k in keys if source.get(k) is not None}, prediction_type=teacher.prediction_type,
                                       timestep_spacing="leading", final_sigmas_type="zero", steps_offset=1)
    _check_scheduler(scheduler, teacher.schedule, [], boundary=False)
    return scheduler


def expert_folders(student: Student) -> list[str]:
    """Where each expert lies in the folder: the pipeline's own component for expert 0, then ``<component>_expert_k``."""
    component = student.teacher.component
    return [component] + [f"{component}_expert_{k}" for k in range(1, len(student.experts))]


def switcher(component: str, experts: list):
    """The callback that puts expert k+1 in place after step k (and expert 0 back after the last step)."""
    def next_expert(pipe, step, timestep, callback_kwargs):
        setattr(pipe, component, experts[(step + 1) % len(experts)])
        return callback_kwargs
    return next_expert


def usage_snippet(student: Student, out: str, call: dict) -> str:
    """Plain diffusers lines that run the experts in turn; ``generate(prompt, **kwargs)`` is the student's sampler."""
    component, cls = student.teacher.component, type(student.backbone).__name__
    folders = expert_folders(student)
    seed = "torch.manual_seed(0)" if global_rng(student) else "torch.Generator().manual_seed(0)"
    return "\n".join([
        "import torch",
        f"from diffusers import DiffusionPipeline, {cls}",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{out}")  # its {component} is expert 0',
        f"experts = [pipe.{component}] + [{cls}.from_pretrained(\"{out}\", subfolder=f\"{component}_expert_{{k}}\") for k in range(1, {len(folders)})]",
        "",
        "",
        "def next_expert(pipe, step, timestep, callback_kwargs):",
        f"    pipe.{component} = experts[(step + 1) % len(experts)]  # expert k runs step k; expert 0 again for the next call",
        "    return callback_kwargs",
        "",
        "",
        "def generate(prompt, **kwargs):",
        f"    return pipe(prompt, {call_text(call)}, callback_on_step_end=next_expert, **kwargs)",
        "",
        "",
        f'image = generate("a photograph of a cat", generator={seed}).images[0]',
    ])


def write_experts(student: Student, out: Path, steps: int, name: str | None = None, requested: str | None = None) -> dict:
    """Writes the folder with every expert, checks the chain against diffdistill's sampler, writes the card."""
    count = len(student.experts)
    if steps != count:
        raise ExportError(f"--steps {steps}: a phased student runs each of its {count} experts once, so it samples in exactly {count} steps; drop --steps")
    pipe = student_pipeline(student, experts_scheduler(student, requested))
    if "callback_on_step_end" not in inspect.signature(type(pipe).__call__).parameters:
        raise ExportError(f"{type(pipe).__name__} takes no callback_on_step_end, so nothing can switch experts between its steps; "
                          "phased students of this teacher have no diffusers export")
    experts = [getattr(pipe, student.teacher.component)] + [exported_backbone(student, b) for b in student.experts[1:]]
    custom = student.teacher.schedule.kind == "vp"  # Euler's own spacing is not the experts': pass timesteps=
    call = sampling_call(student, pipe, steps, custom)
    pipe.save_pretrained(out, safe_serialization=True)
    for folder, expert in zip(expert_folders(student)[1:], experts[1:]):
        expert.save_pretrained(out / folder, safe_serialization=True)
    error = verify(student, pipe, steps, default_prompts(student), {**call, "callback_on_step_end": switcher(student.teacher.component, experts)})
    notes = [(f"One backbone per expert: {', '.join(f'`{f}/`' for f in expert_folders(student))}. A plain `pipe(...)` call runs expert 0 "
              "at every step, which is not this student: use `generate` above, whose callback puts expert k in place for step k."),
             (f"Each step is deterministic ({type(pipe.scheduler).__name__}: expert k predicts x0 and steps by DDIM to the next timestep, "
              "the last to x0): the initial noise is the only randomness."),
             "Guidance is baked in; the call runs no classifier-free guidance pass."]
    extra = {"Experts": f"{count}, at timesteps {[float(t) for t in student.timesteps]}",
             "Checked on export": f"max |experts in turn - diffdistill sampler| = {error:.2e} for one seeded {steps}-step call"}
    (out / "README.md").write_text(model_card(student, "diffusers", usage_snippet(student, name or str(out), call), notes, extra))
    info = {"format": "diffusers", "steps": steps, "timesteps": [float(t) for t in student.timesteps], "experts": expert_folders(student),
            "max_abs_diff_vs_sampler": error, "call": call}
    (out / "diffdistill_export.json").write_text(json.dumps(info, indent=2))
    return info
