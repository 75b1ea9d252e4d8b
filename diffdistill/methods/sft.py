"""Plain denoising fine-tuning in the backbone's native prediction type (Ho et al. 2020).

    L(theta) = E_{x0, eps, t} || F_theta(alpha_t x0 + sigma_t eps, t, c) - target_t ||^2

where target is eps, v = alpha eps - sigma x0, x0 or the flow velocity eps - x0, whichever the
backbone predicts. This proves the training loop, and trains the bundled teacher.

With ``train_text_encoder`` the pipeline's (single, CLIP) text encoder is trained jointly, as
small text-to-image models trained from scratch need: prompts are then encoded inside the loss
with gradients, not read from the trainer's frozen-encoder cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffdistill.denoiser import native_from_x0
from diffdistill.generator import student_denoiser
from diffdistill.methods.base import register_method
from diffdistill.sampling import ddim_sample
from diffdistill.schedules import add_noise, make_timestep_sampler


@dataclass
class SFTOptions:
    timesteps: str = "uniform"        # uniform | lognormal | logit_normal (see diffdistill.schedules)
    sample_steps: int = 25            # DDIM steps for sample grids: this is still a many-step model
    train_text_encoder: bool = False  # train the pipeline's text encoder jointly (one CLIP encoder: SD 1.x / 2.x shape)


class SFT:
    phases = ("generator",)

    def __init__(self, options: SFTOptions, teacher):
        self.options, self.teacher = options, teacher
        self.schedule = teacher.schedule
        self.nets = {"generator": student_denoiser(teacher)}
        if options.train_text_encoder:
            self.nets["text_encoder"] = trainable_text_encoder(teacher)
        self.sample_timesteps = make_timestep_sampler(options.timesteps)
        self.default_sample_steps = options.sample_steps

    def phase(self, step: int) -> str:
        return "generator"

    def phase_nets(self, phase: str) -> list[str]:
        return list(self.nets)

    def encode(self, prompts: list[str]) -> dict:
        """Prompts through the trained text encoder, with gradients (as the pipeline's encode_prompt does for SD)."""
        tokenizer = self.teacher.pipe.tokenizer
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        return {"encoder_hidden_states": self.nets["text_encoder"](ids.to(self.teacher.backbone.device))[0].float()}

    def generator_loss(self, batch: dict):
        if "x0" not in batch:
            raise ValueError("sft trains on data: set data.source to digits or imagefolder")
        x0, rng = batch["x0"], batch["rng"]
        t = self.sample_timesteps(self.schedule, x0.shape[0], rng)
        eps = rng.randn_like(x0)
        x_t = add_noise(self.schedule, x0, eps, t)
        generator = self.nets["generator"]
        cond = self.encode(batch["prompts"]) if "text_encoder" in self.nets else batch["cond"]
        prediction = generator(x_t, t, cond, output="native")
        target = native_from_x0(self.schedule, self.teacher.prediction_type, x_t, t, x0)
        loss = (prediction - target).square().flatten(1).mean(1)
        return loss, {"loss_sft": loss.mean().item()}

    def critic_loss(self, batch: dict):
        raise RuntimeError("sft has no critic phase")

    def sample(self, noise, cond, uncond, steps, guidance, generator=None):
        denoiser = self.nets["generator"]
        denoiser = getattr(denoiser, "module", denoiser)  # DDP wrapper: sample with the plain module
        return ddim_sample(denoiser, noise, self.schedule.sampling_timesteps(steps), cond, uncond, guidance)


def trainable_text_encoder(teacher):
    pipe = teacher.pipe
    if type(pipe).__name__ != "StableDiffusionPipeline" or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"method.train_text_encoder=true needs a pipeline with one CLIP text encoder (StableDiffusionPipeline), "
                         f"not {type(pipe).__name__}; set it to false")
    return pipe.text_encoder.requires_grad_(True)


@register_method("sft", SFTOptions)
def build_sft(options: SFTOptions, teacher, train_cfg, prompts) -> SFT:
    return SFT(options, teacher)
