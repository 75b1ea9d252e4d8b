"""In-training quality for ``zoo:digits`` students: the digit judge on fixed prompts (``eval_every``).

The same judge and prompts as the quickstart and ``benchmarks/digits.py``: digit-FID (ranking,
lower is better), prompt accuracy and digits covered. The teacher's line is the teacher pipeline at
25 guided DDIM steps on the same prompts and number of samples (digit-FID falls with the count).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from diffdistill.data.digits import digit_prompt
from diffdistill.teachers import zoo_path
from diffdistill.zoo.judge import judge_samples, load_judge

TEACHER_STEPS = 25  # the teacher every digits student is judged against: 25 guided DDIM steps


def evaluation_prompts(n: int) -> tuple[list[str], list[int]]:
    """``n`` prompts cycling through the digits 0-9 and the three phrasings."""
    labels = [i % 10 for i in range(n)]
    return [digit_prompt(d, i // 10) for i, d in enumerate(labels)], labels


def initial_noise(n: int, latent_shape, seed: int) -> torch.Tensor:
    return torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate_images(pipe, prompts: list[str], latents: torch.Tensor, steps: int, guidance: float, batch_size: int = 250) -> torch.Tensor:
    """The pipeline's own output (``output_type="pt"``) for given initial latents, mapped to [-1, 1]."""
    images = []
    for i in range(0, len(prompts), batch_size):
        out = pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                   latents=latents[i : i + batch_size], output_type="pt")
        images.append(out.images * 2 - 1)
    return torch.cat(images)


def load_pipeline(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_shape(pipe) -> tuple[int, int, int]:
    config = pipe.unet.config
    return (config.in_channels, config.sample_size, config.sample_size)


class DigitsQuality:
    metric, lower_is_better = "digit_fid", True

    def __init__(self, num_samples: int = 500, teacher_guidance: float = 2.0, seed: int = 0):
        self.prompts, self.labels = evaluation_prompts(num_samples)
        self.teacher_guidance, self.seed = teacher_guidance, seed
        self.judge = load_judge()

    @classmethod
    def for_config(cls, cfg) -> DigitsQuality:
        """``eval_samples`` of the run; the teacher's line at the recipe's guidance (2, the teacher's best, if it names none)."""
        guidance = cfg.method.get("guidance")
        return cls(cfg.eval_samples, float(guidance) if isinstance(guidance, (int, float)) else 2.0, cfg.seed)

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        judged = judge_samples(self.judge, samples, self.labels)
        return {k: judged[k] for k in ("digit_fid", "prompt_accuracy", "digits_covered")}

    def reference(self) -> dict[str, float]:
        teacher = load_pipeline(zoo_path("digits"))
        noise = initial_noise(len(self.prompts), latent_shape(teacher), self.seed)
        return self(generate_images(teacher, self.prompts, noise, TEACHER_STEPS, self.teacher_guidance))


__all__ = ["TEACHER_STEPS", "DigitsQuality", "evaluation_prompts", "generate_images", "initial_noise", "latent_shape", "load_pipeline"]
