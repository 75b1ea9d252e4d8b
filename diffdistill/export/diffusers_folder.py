"""The diffusers format: the teacher's pipeline class, the student backbone and a stock scheduler
configured so that ``DiffusionPipeline.from_pretrained(OUT)(prompt, num_inference_steps=K)`` runs
the student's own K-step sampler, with no diffdistill import.

The scheduler is diffusers' ``LCMScheduler``: each step predicts x0, then re-noises it with fresh
noise to the next timestep, which is exactly :func:`diffdistill.generator.generate`. Two settings
make it exact rather than approximate:

* ``original_inference_steps = N`` (the number of training timesteps): LCM's schedule is then
  ``[(i+1) * (1000 // N) - 1]`` reversed, e.g. [999, 749, 499, 249] for N = 4 and [999] for N = 1,
  the trailing timesteps DMD2 trains on; ``num_inference_steps=K`` picks K of them by index.
* ``timestep_scaling = 1e6``: LCM's consistency boundary condition ``c_skip x_t + c_out x0`` has
  ``c_skip = 0.25 / ((t s)^2 + 0.25)`` and ``c_out = t s / sqrt((t s)^2 + 0.25)``, which are
  0 and 1 to float32 precision at s = 1e6 for every t >= 1 (checked on export).

Guidance is baked into the student, so the pipeline must not run CFG. UNet students get LCM's
``time_cond_proj_dim`` guidance embedding with zero weights: SD and SDXL pipelines then skip CFG
at any ``guidance_scale`` (their ``do_classifier_free_guidance`` is ``guidance_scale > 1 and
time_cond_proj_dim is None``) and the zero projection adds exactly 0 to the time embedding.
Other pipelines (DiT, PixArt) have no such switch: call them with ``guidance_scale=1``.

Two students differ from that picture:

* ``cd`` (LCM): its UNet has a trained guidance input, kept as it is; the pipeline embeds
  ``guidance_scale - 1`` into it exactly as LCM's training did, so ``guidance_scale`` is the w the
  student samples at. Its boundary condition is LCM's own (``timestep_scaling`` 10, not 1e6), and
  ``num_inference_steps=K`` picks K of its N-point grid as its sampler does.
* flow-matching students (SD3): ``FlowMatchEulerDiscreteScheduler``, see :mod:`.flow`;
  ``phased_dmd`` students, one backbone per expert: see :mod:`.experts`.

:func:`sampling_call` gives the keyword arguments of the call that reproduces the student; the
export's check and the card's snippet both use it, so the two cannot disagree.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import torch
from diffusers import LCMScheduler

from diffdistill.conditioning import encode_prompts
from diffdistill.export.card import model_card
from diffdistill.export.flow import flow_call, flow_family, flow_notes, flow_scheduler
from diffdistill.export.student import (
    ExportError,
    Student,
    inference_timesteps,
    reference_sample,
)
from diffdistill.sampling import decode_latents

TIMESTEP_SCALING = 1e6     # makes LCM's c_skip ~ 1e-19 and c_out == 1 in float32 (see module docstring)
GUIDANCE_EMBED_DIM = 256   # LCM's time_cond_proj_dim (LCM-SD1.5, LCM-SDXL)
CFG_SWITCH_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # skip CFG when time_cond_proj_dim is set
BOUNDARY_TOLERANCE = 1e-6  # largest |c_out - 1| and c_skip we accept
VERIFY_TOLERANCE = 1e-3    # largest |pipeline - sampler| on export (float32 rounding gives ~1e-5 on tiny models)
SCHEDULER_NAMES = {"lcm": "LCMScheduler", "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
                   "tcd": "TCDScheduler", "flow-match-euler": "FlowMatchEulerDiscreteScheduler"}  # --scheduler's short names


def lcm_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """LCMScheduler's training schedule for ``original_inference_steps = n``, largest first."""
    k = num_train_timesteps // n
    return [(i + 1) * k - 1 for i in range(n)][::-1]


def lcm_scheduler(student: Student):
    """An LCMScheduler on the teacher's noise schedule that samples like the student (see module doc).

    Returns ``(scheduler, custom)``; ``custom`` is True where the student's timesteps are not
    LCM's linear schedule, so a user must pass ``timesteps=[...]`` to the pipeline."""
    teacher = student.teacher
    if teacher.schedule.kind != "vp":
        raise ExportError("LCMScheduler re-noises with DDPM (VP) noise; this flow-matching student takes FlowMatchEulerDiscreteScheduler")
    if teacher.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ExportError(f"LCMScheduler cannot read {teacher.prediction_type!r} predictions; use --format single-file")
    if student.input_scale != 1.0:
        raise ExportError(f"this student starts from {student.input_scale:.4g} * z (SiD's scale_input), and diffusers pipelines start "
                          "from unit noise (init_noise_sigma is fixed at 1): use --format single-file, or train with method.scale_input=false")
    if any(not float(t).is_integer() for t in student.timesteps):
        raise ExportError(f"student timesteps {student.timesteps} are not integers, which diffusers' discrete schedulers need; use --format single-file")
    consistency = student.consistency
    if consistency is not None and consistency.sigma_data != 0.5:
        raise ExportError(f"LCMScheduler's boundary condition has sigma_data 0.5, this cd student {consistency.sigma_data}; use --format single-file")
    timesteps = [int(t) for t in student.timesteps]
    source = teacher.pipe.scheduler.config
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")  # what VPSchedule reads
    scheduler = LCMScheduler(
        **{k: source[k] for k in keys if source.get(k) is not None}, original_inference_steps=len(timesteps),
        prediction_type=teacher.prediction_type, clip_sample=False, timestep_spacing="trailing",
        timestep_scaling=consistency.timestep_scaling if consistency else TIMESTEP_SCALING,  # cd: LCM's own boundary condition
        steps_offset=1,  # unused by LCM; 1 keeps SD pipelines from rewriting the config
    )
    _check_scheduler(scheduler, student.teacher.schedule, timesteps, boundary=consistency is None)
    return scheduler, timesteps != lcm_timesteps(scheduler.config.num_train_timesteps, len(timesteps))


def _check_scheduler(scheduler, schedule, timesteps: list[int], boundary: bool = True) -> None:
    gap = (scheduler.alphas_cumprod.double() - schedule.alphas_cumprod.cpu()).abs().max().item()
    if gap > 1e-6:
        raise ExportError(f"LCMScheduler's noise schedule differs from the teacher's by {gap:.2e}; the teacher's scheduler config is not one we can copy")
    for t in timesteps if boundary else ():
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        if float(c_skip) > BOUNDARY_TOLERANCE or abs(float(c_out) - 1) > BOUNDARY_TOLERANCE:
            raise ExportError(f"LCM boundary condition at t={t}: c_skip={float(c_skip):.2e}, c_out={float(c_out)}; cannot make it exact")


def student_scheduler(student: Student, requested: str | None = None):
    """``(scheduler, custom)`` for the student's kind (VP: LCMScheduler; flow: FlowMatchEulerDiscreteScheduler),
    after checking a ``--scheduler`` the user named against it."""
    flow = student.teacher.schedule.kind == "flow"
    check_requested_scheduler(student, requested, "FlowMatchEulerDiscreteScheduler" if flow else "LCMScheduler")
    return (flow_scheduler(student, deterministic=student.deterministic), False) if flow else lcm_scheduler(student)


def check_requested_scheduler(student: Student, requested: str | None, written: str) -> None:
    """``--scheduler``: refuses a scheduler of the other noise family, or one that would not reproduce the student."""
    if requested is None:
        return
    name = SCHEDULER_NAMES.get(requested.lower(), requested)
    flow_named, flow_student = name.startswith("FlowMatch"), student.teacher.schedule.kind == "flow"
    kind = {True: "flow-matching", False: "VP (DDPM-noise)"}
    if flow_named != flow_student:
        raise ExportError(f"--scheduler {requested}: {name} is a {kind[flow_named]} scheduler and this {type(student.teacher.pipe).__name__} "
                          f"student is {kind[flow_student]}; omit --scheduler (the export writes {written}, set to the student's own timesteps)")
    if name != written:
        raise ExportError(f"--scheduler {requested}: this student exports with {written}, the scheduler that reproduces its sampler exactly; omit --scheduler")


def zero_guidance_embedding(unet):
    """A copy of the UNet with LCM's guidance embedding (``time_embedding.cond_proj``, no bias)
    set to zero: SD pipelines then skip CFG, and every output is unchanged."""
    if unet.config.time_cond_proj_dim is not None:
        raise ExportError("the student UNet already has a guidance embedding (time_cond_proj_dim), which training did not feed; "
                          "its pipeline would condition it on guidance_scale. Export with --format single-file")
    # Private keys go: "_use_default_values" would make from_config drop our time_cond_proj_dim.
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    new = type(unet).from_config({**config, "time_cond_proj_dim": GUIDANCE_EMBED_DIM})
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if missing != ["time_embedding.cond_proj.weight"] or unexpected:
        raise ExportError(f"unexpected UNet layout when adding the guidance embedding: missing {missing[:3]}, unexpected {unexpected[:3]}")
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new.to(next(unet.parameters()).dtype).requires_grad_(False).eval()


def exported_backbone(student: Student, backbone):
    """The backbone as the folder holds it: UNets get the zero guidance embedding that switches CFG
    off, unless (cd) they carry a trained one that the pipeline feeds with guidance_scale."""
    if student.teacher.kind != "unet" or (student.consistency and student.consistency.embedding_dim > 0):
        return backbone
    return zero_guidance_embedding(backbone)


def _rebuild(pipe, components: dict):
    """The same pipeline class around new components, with the teacher's non-module settings."""
    params = inspect.signature(type(pipe).__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    for name in params:
        if name not in kwargs and name != "self" and name in pipe.config and not isinstance(pipe.config[name], (list, tuple)):
            kwargs[name] = pipe.config[name]
    if "id2label" in params and getattr(pipe, "labels", None):  # DiTPipeline keeps label -> id only
        id2label: dict[int, list[str]] = {}
        for label, index in pipe.labels.items():
            id2label.setdefault(index, []).append(label)
        kwargs["id2label"] = {i: ", ".join(names) for i, names in id2label.items()}
    new = type(pipe)(**kwargs)
    new.set_progress_bar_config(disable=True)
    return new


def student_pipeline(student: Student, scheduler=None):
    """The exported pipeline, in memory: teacher components, student backbone, the student's scheduler."""
    scheduler = scheduler if scheduler is not None else student_scheduler(student)[0]
    pipe = student.teacher.pipe
    components = {**pipe.components, student.teacher.component: exported_backbone(student, student.backbone), "scheduler": scheduler}
    return _rebuild(pipe, components)


def skips_cfg(pipe) -> bool:
    return type(pipe).__name__ in CFG_SWITCH_PIPELINES and getattr(pipe, "unet", None) is not None


def global_rng(student: Student) -> bool:
    """Pipelines whose scheduler.step re-noises from torch's global generator (DiT, flow): seed that one."""
    return type(student.teacher.pipe).__name__ == "DiTPipeline" or student.teacher.schedule.kind == "flow"


def sampling_call(student: Student, pipe, steps: int, custom: bool = False) -> dict:
    """Keyword arguments (besides prompt and generator) of the K-step call that samples as diffdistill does."""
    if student.teacher.schedule.kind == "flow":
        return flow_call(student, pipe, steps)
    timesteps = [int(t) for t in inference_timesteps(student.timesteps, steps)]
    call = {"timesteps": timesteps} if custom else {"num_inference_steps": steps}
    if student.consistency and student.consistency.embedding_dim > 0:
        return {**call, "guidance_scale": student.consistency.guidance}  # the w the student is conditioned on
    return call if skips_cfg(pipe) else {**call, "guidance_scale": 1.0}


def run_pipeline(pipe, prompts: list, call: dict, seed: int, global_generator: bool = False) -> tuple[str, torch.Tensor]:
    """One seeded call of an exported pipeline with ``call`` (:func:`sampling_call`): ``("latent", x0)``,
    or ``("image", [0, 1])`` for pipelines with no latent output (DiT). The test's child process mirrors this call."""
    if type(pipe).__name__ == "DiTPipeline":
        labels = encode_prompts(pipe, prompts)["class_labels"].tolist()
        with torch.random.fork_rng(devices=[]):
            return "image", pipe(class_labels=labels, generator=torch.manual_seed(seed), output_type="pt", **call).images
    with torch.random.fork_rng(devices=[]) if global_generator else contextlib.nullcontext():
        generator = torch.manual_seed(seed) if global_generator else torch.Generator(pipe.device).manual_seed(seed)
        return "latent", pipe(prompts, generator=generator, output_type="latent", **call).images


def reference_output(student: Student, kind: str, prompts: list, steps: int, seed: int) -> torch.Tensor:
    """diffdistill's own sampler for the same call, as latents or decoded like the pipeline decodes."""
    shared = global_rng(student)
    with torch.random.fork_rng(devices=[]) if shared else contextlib.nullcontext():
        generator = torch.manual_seed(seed) if shared else torch.Generator(next(student.backbone.parameters()).device).manual_seed(seed)
        x0 = reference_sample(student, prompts, steps, generator)
    return x0 if kind == "latent" else decode_latents(student.teacher.pipe, x0)


@torch.no_grad()
def verify(student: Student, pipe, steps: int, prompts: list, call: dict, seed: int = 0) -> float:
    """Largest |pipeline - diffdistill sampler| over one seeded call; an :class:`ExportError` beyond
    float rounding, so a wrong export is never written."""
    kind, out = run_pipeline(pipe, prompts, call, seed, global_rng(student))
    if student.teacher.schedule.kind == "flow":
        out = flow_family(student).latents(student, pipe, out)
    error = (out.float().cpu() - reference_output(student, kind, prompts, steps, seed).float().cpu()).abs().max().item()
    if not error <= VERIFY_TOLERANCE:
        raise ExportError(f"the exported {type(pipe).__name__} samples differently from diffdistill's sampler (max |diff| {error:.3g} "
                          f"> {VERIFY_TOLERANCE}); this is a bug in the export, please report it with the run's config.yaml")
    return error


def default_prompts(student: Student) -> list:
    """Prompts (class ids for DiT) to verify with: the run's own sample prompts, else its data's."""
    cfg = student.config
    if type(student.teacher.pipe).__name__ == "DiTPipeline":
        return ["1", "7"]
    return (list(cfg.sample_prompts) or list(cfg.data.prompts) or ["a photograph of a cat", "a handwritten digit 7"])[:2]


def call_text(call: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in call.items())


def usage_snippet(student: Student, out: str, call: dict) -> str:
    load = f'import torch\nfrom diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("{out}")\n'
    seed = "torch.manual_seed(0)" if global_rng(student) else "torch.Generator().manual_seed(0)"
    if type(student.teacher.pipe).__name__ == "DiTPipeline":
        return load + f"image = pipe(class_labels=[7], {call_text(call)}, generator={seed}).images[0]  # guidance is baked in: keep CFG off"
    return load + f'image = pipe("a photograph of a cat", {call_text(call)}, generator={seed}).images[0]'


def write_diffusers(student: Student, out: Path, steps: int, name: str | None = None, scheduler: str | None = None) -> dict:
    """Writes the pipeline folder, verifies it against diffdistill's sampler, writes the card.
    ``name`` is where the folder will end up (``out`` may be a temporary path); ``scheduler`` is --scheduler."""
    sched, custom = student_scheduler(student, scheduler)
    pipe = student_pipeline(student, sched)
    if custom and "timesteps" not in inspect.signature(type(pipe).__call__).parameters:
        raise ExportError(f"the student's timesteps {[int(t) for t in student.timesteps]} are not LCMScheduler's linear schedule, and {type(pipe).__name__} "
                          "takes no timesteps= to pass them; use --format single-file")
    call = sampling_call(student, pipe, steps, custom)
    pipe.save_pretrained(out, safe_serialization=True)
    error = verify(student, pipe, steps, default_prompts(student), call)
    picked = "h = t - r of exactly this K folded in" if student.deterministic else "K steps pick K of the training timesteps, evenly by index"
    extra = {"Default steps": f"{steps} ({picked})",
             "Call": f"`{call_text(call)}`",
             "Checked on export": f"max |pipeline - diffdistill sampler| = {error:.2e} for one seeded {steps}-step call"}
    (out / "README.md").write_text(model_card(student, "diffusers", usage_snippet(student, name or str(out), call), _notes(student, pipe, custom), extra))
    info = {"format": "diffusers", "steps": steps, "timesteps": [float(t) if student.teacher.schedule.kind == "flow" else int(t) for t in student.timesteps],
            "max_abs_diff_vs_sampler": error, "custom_timesteps": custom, "call": call}
    (out / "diffdistill_export.json").write_text(json.dumps(info, indent=2))
    return info


def _notes(student: Student, pipe, custom: bool) -> list[str]:
    if student.teacher.schedule.kind == "flow":
        return flow_notes(student, pipe)
    notes = []
    if custom:
        notes.append(f"The student's timesteps {[int(t) for t in student.timesteps]} are not LCMScheduler's linear schedule: pass `timesteps=[...]` "
                     "(a subset of them) instead of `num_inference_steps`.")
    if student.consistency and student.consistency.embedding_dim > 0:
        lo, hi = student.consistency.guidance_range
        notes.append(f"`guidance_scale` is the guidance w the consistency student is conditioned on (LCM's `time_cond_proj_dim` embedding of w - 1): "
                     f"it was trained on w in [{lo:g}, {hi:g}], so stay inside that range. The pipeline runs no classifier-free guidance pass.")
    elif skips_cfg(pipe):
        notes.append("Guidance is baked in. The UNet carries a zero-weight guidance embedding (`time_cond_proj_dim`), so the "
                     "pipeline skips classifier-free guidance at any `guidance_scale` and the embedding changes nothing.")
    else:
        notes.append(f"Guidance is baked in: call {type(pipe).__name__} with `guidance_scale=1` (its default runs CFG, "
                     "which doubles the work and changes the sample).")
    notes.append("`num_inference_steps` must be at most the number of training timesteps; the pipeline's default (50) is refused.")
    return notes
