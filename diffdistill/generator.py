"""The one- and few-step student: sampling it, with and without gradient.

One step (DMD, DMD2 SD1.5): ``x = G(eps, t_init, c)``. DMD2 feeds unscaled noise at t = 999 for
SD1.5 and conditions on t = 399 for one-step SDXL; ``t_init`` is an option.

Few steps (DMD2 Sec. 4.4): timesteps ``t_0 > t_1 > ...``; each step predicts x0 and re-noises it
with fresh noise to the next timestep. **Backward simulation**: a training input for step k is
produced by running the student's own sampler for k steps without gradient, not by noising data,
so the student trains on the inputs it will see at inference. Only the last step keeps its graph.
"""

from __future__ import annotations

import torch

from diffdistill.backbones import unpack_latents
from diffdistill.backbones.guidance_embed import fold_guidance_embedding
from diffdistill.denoiser import Denoiser, add_lora, base_copy
from diffdistill.randomness import BatchRandom
from diffdistill.schedules import add_noise


def student_denoiser(teacher, lora_rank: int = 0):
    """The trainable student: a float32 copy of the teacher's backbone (whatever precision the
    frozen teacher is held in), or a fresh network where the teacher has no weights to copy.

    ``lora_rank > 0``: LoRA adapters (float32) on the teacher's own frozen weights instead, so the
    student adds no copy of the network (DMD2's SDXL LoRA student); it is exported as a LoRA.

    A guidance-distilled teacher (Flux.1-dev) gives a student that drops the guidance input, its
    embedding at ``teacher.student_guidance`` folded in (``student_guidance_embed: drop``), or keeps it
    and always sees that scale (``keep``)."""
    drop = teacher.guidance_distilled and teacher.student_guidance_embed == "drop"
    if lora_rank > 0:
        if teacher.make_student is not None:
            raise ValueError("student_lora_rank: this teacher has no weights to put adapters on (a toy); use student_lora_rank=0")
        if drop:
            raise ValueError("a LoRA student shares the guidance-distilled teacher's guidance embedding, so it cannot drop it: "
                             "set student_guidance_embed=keep, or train a full student (student_lora_rank=0)")
        add_lora(teacher.backbone, lora_rank, STUDENT_ADAPTER)
        return Denoiser(teacher.backbone, teacher.schedule, teacher.prediction_type, adapter=STUDENT_ADAPTER,
                        embedded_guidance=teacher.student_guidance)
    backbone = teacher.make_student() if teacher.make_student is not None else base_copy(teacher.backbone).float()
    if drop:
        backbone = fold_guidance_embedding(backbone, teacher.student_guidance)
    return teacher.denoiser(backbone.requires_grad_(True).train())


STUDENT_ADAPTER = "student"


class TorchRandom:
    """Fresh noise from one ``torch.Generator``, drawn as diffusers pipelines draw it (``randn_tensor``):
    one ``randn`` of the sample's shape and dtype per re-noising, on the generator's device. A
    sampler fed the generator that drew its initial noise thus draws what an exported pipeline draws."""

    def __init__(self, generator: torch.Generator, packed: bool = False):
        self.generator = generator
        self.packed = packed  # Flux: FluxPipeline re-noises its packed 2x2 tokens, so the draw is in that layout

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *side = x.shape
        shape = (b, side[0] * side[1] // 4, 4 * c) if self.packed else x.shape
        noise = torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=x.dtype).to(x.device)
        return unpack_latents(noise, *side) if self.packed else noise


def check_timesteps(schedule, timesteps: list[float]) -> list[float]:
    for t in timesteps:
        if not schedule.t_min <= t <= schedule.t_max:
            raise ValueError(f"generator timestep {t} is outside the schedule's [{schedule.t_min}, {schedule.t_max}]")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise ValueError(f"generator timesteps {timesteps} must decrease")
    return [float(t) for t in timesteps]


def generate(generator, schedule, timesteps: list[float], noise: torch.Tensor, cond: dict, rng, steps_with_grad_from: int | None = None,
             num_steps: int | None = None) -> torch.Tensor:
    """Runs ``num_steps`` (default all) steps of the student's sampler from ``noise``.

    Steps before ``steps_with_grad_from`` run under ``no_grad`` (backward simulation); fresh noise
    for each re-noising comes from ``rng`` so every rank and resumed run draws the same.
    """
    num_steps = len(timesteps) if num_steps is None else num_steps
    grad_from = num_steps - 1 if steps_with_grad_from is None else steps_with_grad_from
    x, n = noise, noise.shape[0]
    x0 = None
    for i in range(num_steps):
        t = torch.full((n,), timesteps[i], device=noise.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= grad_from):
            x0 = generator(x, t, cond)
        if i + 1 < num_steps:
            x = add_noise(schedule, x0.detach() if i < grad_from else x0, rng.randn_like(x0), torch.full((n,), timesteps[i + 1], device=noise.device))
    return x0


def backward_simulation(generator, schedule, timesteps: list[float], cond: dict, rng, shape) -> torch.Tensor:
    """DMD2's training sample: k ~ U{0..K-1} no-grad steps from noise, then one step with gradient.

    The number of steps is drawn once for the whole global batch (all ranks agree).
    """
    k = rng.shared_randint(0, len(timesteps)) if len(timesteps) > 1 else 0
    noise = rng.randn(shape)
    return generate(generator, schedule, timesteps, noise, cond, rng, steps_with_grad_from=k, num_steps=k + 1)


@torch.no_grad()
def sample_student(generator, schedule, timesteps, noise, cond, torch_generator=None):
    """What a user gets: the student's own few-step sampler (guidance is baked in by training).

    Re-noising draws from ``torch_generator`` itself, in the exported pipeline's order (see
    :class:`~diffdistill.generator.TorchRandom`), so both give the same sample for the same seed."""
    generator = getattr(generator, "module", generator)
    packed = getattr(generator, "kind", None) == "flux"
    rng = TorchRandom(torch_generator, packed) if torch_generator is not None else BatchRandom(0, device=noise.device)
    return generate(generator, schedule, timesteps, noise, cond, rng)
