"""Flow-matching students in a diffusers folder: the teacher's pipeline class (SD3/SD3.5, Flux, SANA:
one :data:`FLOW_FAMILIES` entry each) with a ``FlowMatchEulerDiscreteScheduler`` that runs the
student's own sampler. (SANA ships DPM-Solver, which rounds timesteps to integers: it is replaced.)

The scheduler's settings, and why:

* ``shift = 1.0``, ``use_dynamic_shifting = False``: the scheduler shifts every sigma it is handed,
  ``sigmas=[...]`` from the caller included, so any other shift (SD3's teacher has 3.0) would move
  the student off the sigmas it was trained on. With 1.0 a sigma goes through untouched.
* ``stochastic_sampling = True``: a step computes ``x0 = x - sigma v`` and re-noises it with fresh
  noise to the next sigma, ``(1 - s') x0 + s' eps'``: exactly :func:`diffdistill.generator.generate`.
  The scheduler appends sigma 0, so the last step returns x0. (Phased experts step deterministically:
  ``False``, where Euler's ``x + (s' - s) v`` is DDIM's step for flow.)
* ``num_train_timesteps`` is the teacher's, so the network sees ``sigma * 1000`` as in training.

Which K a plain ``pipe(prompt, num_inference_steps=K)`` gets right depends on what the pipeline
asks the scheduler for (:attr:`FlowFamily.plain_sigmas`). SD3 (and SANA) hand it no sigmas, so it
spaces ``linspace(1, 1/1000, K)``: exact for one step from t = 1 (DMD2's and DMD's default), not for
a few-step schedule such as [1, .75, .5, .25]. Flux hands it ``linspace(1, 1/K, K)``, which is that
schedule. No scheduler setting can make SD3's spacing land on a trailing few-step schedule
(``shift_terminal`` stretches it, but turns K = 1 into 0/0), so where a plain call is not exact the
card and the export's check pass the student's ``sigmas=[...]``.

Guidance is baked into the student. SD3's and SANA's pipelines run CFG whenever ``guidance_scale > 1``
(defaults 7.0 and 4.5) and have no config switch for it (unlike SD's ``time_cond_proj_dim``), so every
call, in the card and in the check, passes ``guidance_scale=1.0``: the one way a stock pipeline runs the
student alone. Flux runs CFG only with ``true_cfg_scale > 1`` (default 1). A Flux.1-dev student that
dropped its guidance input (the teacher's embedding at ``student_guidance`` folded into a bias, see
:mod:`diffdistill.backbones.guidance_embed`) is saved with ``guidance_embeds: false``, so the pipeline feeds
it no guidance; one that kept it is called with ``guidance_scale=student_guidance``, the scale it trained at.

Size: Flux and SANA pipelines default to 1024 px, so calls pass the trained ``height``/``width`` (and SANA
``use_resolution_binning=False``); Flux's resolution-dependent shift was resolved at that size in
training (``teacher.schedule``), which the export's fixed shift of 1 on the student's own sigmas keeps.

Randomness: SD3's and Flux's pipelines call ``scheduler.step`` without the caller's generator, so the
re-noising draws from torch's global generator. Seeding with ``generator=torch.manual_seed(seed)``
(which is the global generator) makes the pipeline draw what diffdistill's sampler draws. Flux re-noises
its packed 2x2 tokens, and diffdistill's sampler draws Flux's noise in that layout too
(:class:`diffdistill.generator.TorchRandom`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffdistill.backbones import unpack_latents
from diffdistill.conditioning import FLUX_DEFAULT_TEXT_LENGTH, flux_text_length, sd3_text_length
from diffdistill.export.errors import ExportError
from diffdistill.export.student import Student, inference_timesteps

SD3_DEFAULT_TEXT_LENGTH = 256  # StableDiffusion3Pipeline's max_sequence_length default


def _sd3_call(student: Student, pipe) -> dict:
    """CFG off (guidance is baked in); T5 padded to the length diffdistill conditioned the student on."""
    length = sd3_text_length(pipe)
    return {"guidance_scale": 1.0, **({} if length == SD3_DEFAULT_TEXT_LENGTH else {"max_sequence_length": length})}


def _size(student: Student, pipe) -> dict:
    """The image size the student was trained at (its latent side times the VAE's factor): Flux's and SANA's
    pipeline defaults (1024 px) are not the tiny models', and a Flux export's shift is fixed at that size."""
    _, h, w = student.teacher.latent_shape
    return {"height": h * pipe.vae_scale_factor, "width": w * pipe.vae_scale_factor}


def _flux_call(student: Student, pipe) -> dict:
    """No CFG (true_cfg_scale stays 1); the student's guidance input, where it kept one, at the scale it was trained with;
    T5 padded to the length it was conditioned on."""
    keeps = bool(pipe.transformer.config.get("guidance_embeds"))
    length = flux_text_length(pipe)
    return {**_size(student, pipe), **({"guidance_scale": student.teacher.student_guidance} if keeps else {}),
            **({} if length == FLUX_DEFAULT_TEXT_LENGTH else {"max_sequence_length": length})}


def _sana_call(student: Student, pipe) -> dict:
    """CFG off (SanaPipeline runs it above guidance_scale 1); no resolution binning, which would move the size."""
    return {**_size(student, pipe), "guidance_scale": 1.0, "use_resolution_binning": False}


def _flux_latents(student: Student, pipe, tokens: torch.Tensor) -> torch.Tensor:
    """FluxPipeline returns packed 2x2 tokens as its latent output: unpacked to (B, C, H, W), the student's layout."""
    _, h, w = student.teacher.latent_shape
    return unpack_latents(tokens, h, w)


@dataclass(frozen=True)
class FlowFamily:
    """One flow pipeline class, as the export needs it."""

    plain_sigmas: Callable[[int], list | None]        # what a plain num_inference_steps=K call hands the scheduler (None: its own spacing)
    call_kwargs: Callable[[Student, object], dict]   # what every call needs: CFG off, the text length and size trained on, ...
    notes: list = field(default_factory=list)        # family-specific lines for the card
    latents: Callable = lambda student, pipe, x: x   # output_type="latent" in the student's layout (Flux: unpack the 2x2 patches)


# SD3 and SANA hand the scheduler no sigmas (its own spacing); Flux hands it linspace(1, 1/K, K), DMD2's trailing schedule.
FLOW_FAMILIES = {
    "StableDiffusion3Pipeline": FlowFamily(
        plain_sigmas=lambda k: None, call_kwargs=_sd3_call,
        notes=[("`guidance_scale=1.0` is required: StableDiffusion3Pipeline runs classifier-free guidance whenever it is above 1 "
                "(its default is 7.0), which doubles the work and pushes the baked-in guidance twice.")]),
    "FluxPipeline": FlowFamily(
        plain_sigmas=lambda k: np.linspace(1.0, 1 / k, k).tolist(), call_kwargs=_flux_call, latents=_flux_latents,
        notes=[("Guidance is baked in. A student that dropped Flux.1-dev's guidance input (`guidance_embeds: false`, the "
                "default `student_guidance_embed: drop`) ignores `guidance_scale`; one that kept it is called with the scale it "
                "was trained at. Leave `true_cfg_scale` at 1 and pass no `negative_prompt`: either runs a second, CFG pass."),
               ("`height`/`width` are the training size: the scheduler's shift is fixed (no dynamic shifting), so another size "
                "samples the trained sigmas at a resolution the student has not seen."),
               "`output_type=\"latent\"` returns FluxPipeline's packed 2x2 tokens, (B, H/2 * W/2, 4C)."]),
    "SanaPipeline": FlowFamily(
        plain_sigmas=lambda k: None, call_kwargs=_sana_call,
        notes=[("`guidance_scale=1.0` is required (SanaPipeline runs CFG above 1, default 4.5), and `use_resolution_binning=False` "
                "keeps the trained size. The scheduler replaces Sana's DPM-Solver, which rounds timesteps to integers.")]),
}


def flow_family(student: Student) -> FlowFamily:
    name = type(student.teacher.pipe).__name__
    if name not in FLOW_FAMILIES:
        raise ExportError(f"no diffusers export for flow-matching {name} students yet (supported: {', '.join(FLOW_FAMILIES)}); "
                          "use --format single-file")
    return FLOW_FAMILIES[name]


def flow_scheduler(student: Student, deterministic: bool = False) -> FlowMatchEulerDiscreteScheduler:
    """FlowMatchEulerDiscreteScheduler that re-noises (or, ``deterministic``, Euler-steps) through the student's sigmas."""
    if student.teacher.prediction_type != "flow":
        raise ExportError(f"a flow-matching teacher predicting {student.teacher.prediction_type!r} has no diffusers scheduler here; use --format single-file")
    if student.input_scale != 1.0:
        raise ExportError(f"this student starts from {student.input_scale:.4g} * z (SiD's scale_input), and diffusers pipelines start "
                          "from unit noise: use --format single-file, or train with method.scale_input=false")
    if student.consistency is not None:
        raise ExportError("a cd (consistency) student of a flow teacher needs LCM's boundary condition c_skip x + c_out D, which no diffusers "
                          "flow scheduler applies (LCMScheduler is VP-only); use --format single-file and sample with diffdistill, or distill "
                          "a flow teacher with scm or rcm, whose students export as diffusers folders")
    num_train = int(student.teacher.pipe.scheduler.config.get("num_train_timesteps", 1000))
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train, shift=1.0, use_dynamic_shifting=False,
                                           stochastic_sampling=not deterministic)


def student_sigmas(student: Student, steps: int) -> list[float]:
    return [float(t) for t in inference_timesteps(student.timesteps, steps)]


def pipeline_sigmas(scheduler, family: FlowFamily, steps: int) -> torch.Tensor:
    """The sigmas a plain ``num_inference_steps=steps`` call runs (without the appended 0)."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_inference_steps=steps, sigmas=family.plain_sigmas(steps))
    return probe.sigmas[:-1].float()


def plain_steps(student: Student, scheduler) -> list[int]:
    """The K for which a plain ``num_inference_steps=K`` call runs exactly the student's sigmas (float32, as the network sees them)."""
    family = flow_family(student)
    return [k for k in range(1, len(student.timesteps) + 1)
            if torch.equal(pipeline_sigmas(scheduler, family, k), torch.tensor(student_sigmas(student, k), dtype=torch.float32))]


def flow_call(student: Student, pipe, steps: int) -> dict:
    """The keyword arguments of the K-step call that reproduces the student (the card shows the same)."""
    family = flow_family(student)
    step_arg = {"num_inference_steps": steps} if steps in plain_steps(student, pipe.scheduler) else {"sigmas": student_sigmas(student, steps)}
    return {**step_arg, **family.call_kwargs(student, pipe)}


def flow_notes(student: Student, pipe) -> list[str]:
    plain = plain_steps(student, pipe.scheduler)
    exact = f"exact for K in {plain}" if plain else "exact for no K"
    if student.deterministic:  # meanflow
        k = len(student.timesteps)
        return [(f"The scheduler is FlowMatchEulerDiscreteScheduler with shift 1.0, no dynamic shifting and no stochastic sampling: each "
                 f"step is x + (s' - s) v, MeanFlow's z_r = z_t - (t - r) u with the average velocity u. The interval h = t - r = 1/{k} of "
                 f"its {k}-step sampler is folded into the weights, so only K = {k} on the sigmas {[float(t) for t in student.timesteps]} "
                 "reproduces it (another K samples with a mismatched h)."), *flow_family(student).notes]
    notes = [(f"The scheduler is FlowMatchEulerDiscreteScheduler with shift 1.0, no dynamic shifting and stochastic sampling: each step "
              f"predicts x0 and re-noises it to the next sigma, the student's own sampler. A plain `num_inference_steps=K` call is {exact}; "
              f"for other K pass the student's `sigmas=` (K of {[float(t) for t in student.timesteps]}, evenly by index)."),
             ("Re-noising draws from torch's global generator (the pipeline passes no generator to `scheduler.step`): seed with "
              "`generator=torch.manual_seed(seed)` to reproduce a sample.")]
    return notes + list(flow_family(student).notes)
