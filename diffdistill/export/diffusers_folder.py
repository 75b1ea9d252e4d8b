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
        raise ExportError("the diffusers format supports VP (DDPM-style) teachers; this flow-matching student has no stock "
                          "diffusers scheduler that re-noises to its timesteps yet: use --format single-file")
    if teacher.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ExportError(f"LCMScheduler cannot read {teacher.prediction_type!r} predictions; use --format single-file")
    if student.input_scale != 1.0:
        raise ExportError(f"this student starts from {student.input_scale:.4g} * z (SiD's scale_input), and diffusers pipelines start "
                          "from unit noise (init_noise_sigma is fixed at 1): use --format single-file, or train with method.scale_input=false")
    if any(not float(t).is_integer() for t in student.timesteps):
        raise ExportError(f"student timesteps {student.timesteps} are not integers, which diffusers' discrete schedulers need; use --format single-file")
    timesteps = [int(t) for t in student.timesteps]
    source = teacher.pipe.scheduler.config
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")  # what VPSchedule reads
    scheduler = LCMScheduler(
        **{k: source[k] for k in keys if source.get(k) is not None}, original_inference_steps=len(timesteps),
        prediction_type=teacher.prediction_type, timestep_scaling=TIMESTEP_SCALING, clip_sample=False,
        timestep_spacing="trailing", steps_offset=1,  # unused by LCM; 1 keeps SD pipelines from rewriting the config
    )
    _check_scheduler(scheduler, student.teacher.schedule, timesteps)
    return scheduler, timesteps != lcm_timesteps(scheduler.config.num_train_timesteps, len(timesteps))


def _check_scheduler(scheduler, schedule, timesteps: list[int]) -> None:
    gap = (scheduler.alphas_cumprod.double() - schedule.alphas_cumprod.cpu()).abs().max().item()
    if gap > 1e-6:
        raise ExportError(f"LCMScheduler's noise schedule differs from the teacher's by {gap:.2e}; the teacher's scheduler config is not one we can copy")
    for t in timesteps:
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        if float(c_skip) > BOUNDARY_TOLERANCE or abs(float(c_out) - 1) > BOUNDARY_TOLERANCE:
            raise ExportError(f"LCM boundary condition at t={t}: c_skip={float(c_skip):.2e}, c_out={float(c_out)}; cannot make it exact")


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


def student_pipeline(student: Student):
    """The exported pipeline, in memory: teacher components, student backbone, LCMScheduler."""
    scheduler, _ = lcm_scheduler(student)
    backbone = zero_guidance_embedding(student.backbone) if student.teacher.kind == "unet" else student.backbone
    pipe = student.teacher.pipe
    components = {**pipe.components, student.teacher.component: backbone, "scheduler": scheduler}
    return _rebuild(pipe, components)


def skips_cfg(pipe) -> bool:
    return type(pipe).__name__ in CFG_SWITCH_PIPELINES and getattr(pipe, "unet", None) is not None


def run_pipeline(pipe, prompts: list, steps: int, seed: int, timesteps: list | None = None) -> tuple[str, torch.Tensor]:
    """One seeded K-step call of an exported pipeline: ``("latent", x0)``, or ``("image", [0, 1])``
    for pipelines with no latent output (DiT). ``timesteps`` replaces ``steps`` for students whose
    timesteps LCM's schedule cannot express. The test's child process mirrors this call."""
    step_args = {"timesteps": timesteps} if timesteps else {"num_inference_steps": steps}
    if type(pipe).__name__ == "DiTPipeline":
        labels = encode_prompts(pipe, prompts)["class_labels"].tolist()
        # DiTPipeline passes no generator to scheduler.step: re-noising draws from the global
        # generator, so seed that one and hand it in for the initial latents too.
        with torch.random.fork_rng(devices=[]):
            images = pipe(class_labels=labels, guidance_scale=1.0, generator=torch.manual_seed(seed), output_type="pt", **step_args).images
        return "image", images
    kwargs = {} if skips_cfg(pipe) else {"guidance_scale": 1.0}  # skips_cfg: the default guidance_scale is left on purpose
    generator = torch.Generator(pipe.device).manual_seed(seed)
    return "latent", pipe(prompts, generator=generator, output_type="latent", **step_args, **kwargs).images


def reference_output(student: Student, kind: str, prompts: list, steps: int, seed: int) -> torch.Tensor:
    """diffdistill's own sampler for the same call, as latents or decoded like the pipeline decodes."""
    dit = type(student.teacher.pipe).__name__ == "DiTPipeline"
    with torch.random.fork_rng(devices=[]) if dit else contextlib.nullcontext():
        generator = torch.manual_seed(seed) if dit else torch.Generator(next(student.backbone.parameters()).device).manual_seed(seed)
        x0 = reference_sample(student, prompts, steps, generator)
    return x0 if kind == "latent" else decode_latents(student.teacher.pipe, x0)


@torch.no_grad()
def verify(student: Student, pipe, steps: int, prompts: list, custom: bool, seed: int = 0) -> float:
    """Largest |pipeline - diffdistill sampler| over one seeded call; an :class:`ExportError` beyond
    float rounding, so a wrong export is never written."""
    timesteps = [int(t) for t in inference_timesteps(student.timesteps, steps)] if custom else None
    kind, out = run_pipeline(pipe, prompts, steps, seed, timesteps)
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


def usage_snippet(student: Student, pipe, out: str, steps: int, custom: bool) -> str:
    timesteps = [int(t) for t in inference_timesteps(student.timesteps, steps)]
    step_arg = f"timesteps={timesteps}" if custom else f"num_inference_steps={steps}"
    load = f'import torch\nfrom diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("{out}")\n'
    if type(pipe).__name__ == "DiTPipeline":
        return load + f"image = pipe(class_labels=[7], {step_arg}, guidance_scale=1.0).images[0]  # guidance is baked in: keep CFG off"
    guidance = "" if skips_cfg(pipe) else ", guidance_scale=1.0"
    return load + f'image = pipe("a photograph of a cat", {step_arg}{guidance}, generator=torch.Generator().manual_seed(0)).images[0]'


def write_diffusers(student: Student, out: Path, steps: int, name: str | None = None) -> dict:
    """Writes the pipeline folder, verifies it against diffdistill's sampler, writes the card.
    ``name`` is where the folder will end up (``out`` may be a temporary path)."""
    pipe = student_pipeline(student)
    _, custom = lcm_scheduler(student)
    if custom and "timesteps" not in inspect.signature(type(pipe).__call__).parameters:
        raise ExportError(f"the student's timesteps {[int(t) for t in student.timesteps]} are not LCMScheduler's linear schedule, and {type(pipe).__name__} "
                          "takes no timesteps= to pass them; use --format single-file")
    pipe.save_pretrained(out, safe_serialization=True)
    error = verify(student, pipe, steps, default_prompts(student), custom)
    notes = _notes(student, pipe, steps, custom)
    extra = {"Default steps": f"{steps} (`num_inference_steps` 1..{len(student.timesteps)} pick training timesteps by index)",
             "Checked on export": f"max |pipeline - diffdistill sampler| = {error:.2e} for one seeded {steps}-step call"}
    (out / "README.md").write_text(model_card(student, "diffusers", usage_snippet(student, pipe, name or str(out), steps, custom), notes, extra))
    info = {"format": "diffusers", "steps": steps, "timesteps": [int(t) for t in student.timesteps], "max_abs_diff_vs_sampler": error,
            "custom_timesteps": custom}
    (out / "diffdistill_export.json").write_text(json.dumps(info, indent=2))
    return info


def _notes(student: Student, pipe, steps: int, custom: bool) -> list[str]:
    notes = []
    if custom:
        notes.append(f"The student's timesteps {[int(t) for t in student.timesteps]} are not LCMScheduler's linear schedule: pass `timesteps=[...]` "
                     "(a subset of them) instead of `num_inference_steps`.")
    if skips_cfg(pipe):
        notes.append("Guidance is baked in. The UNet carries a zero-weight guidance embedding (`time_cond_proj_dim`), so the "
                     "pipeline skips classifier-free guidance at any `guidance_scale` and the embedding changes nothing.")
    else:
        notes.append(f"Guidance is baked in: call {type(pipe).__name__} with `guidance_scale=1` (its default runs CFG, "
                     "which doubles the work and changes the sample).")
    notes.append("`num_inference_steps` must be at most the number of training timesteps; the pipeline's default (50) is refused.")
    return notes
