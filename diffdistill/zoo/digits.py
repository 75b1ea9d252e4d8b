"""``zoo:digits``: a small SD-shaped text-to-image teacher trained here on real handwritten digits.

The data is scikit-learn's 1,797 handwritten digits (8x8 scans that ship inside the package),
upsampled to 32x32 and captioned in three phrasings ("a handwritten digit 7", "the number seven",
"7"), with 10% empty captions so classifier-free guidance works. The pipeline is a
``StableDiffusionPipeline`` with every part small:

* ``AutoencoderKL``: 32x32x3 <-> 4x8x8, three levels, 0.23M parameters;
* ``UNet2DConditionModel``: channels (32, 64), cross-attention at the 4x4 level only, ~1M parameters,
  epsilon prediction on SD1.5's beta schedule;
* ``CLIPTextModel``: two layers of width 32 over a character-level tokenizer, trained jointly with
  the UNet (kept at its random initialization, it left the 31 captions hard to tell apart: 59%
  prompt accuracy at 25 guided steps after the same training);
* ``DDIMScheduler`` with trailing spacing.

Training has two stages. The VAE is an autoencoder, not a diffusion model, so it gets its own short
loop (reconstruction + a small KL term; its ``scaling_factor`` is set so that latents have unit
standard deviation, as SD's 0.18215 does). The UNet is then trained by the project's own ``sft``
method and :class:`~diffdistill.engine.trainer.Trainer` from ``recipes/zoo/digits_teacher.yaml``.
``diffdistill zoo train-digits`` runs both from a seed and writes the folder that ``zoo:digits``
loads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file
from tqdm.auto import tqdm

from diffdistill.backbones.tiny import TEXT_DIM, tiny_text_encoder, tiny_tokenizer
from diffdistill.config import load_recipe
from diffdistill.data.digits import load_digits_images
from diffdistill.engine.checkpoint import latest_checkpoint
from diffdistill.export import staged
from diffdistill.run import train
from diffdistill.zoo import ZOO_RECIPES

RESOLUTION = 32


def digits_vae(seed: int):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False,
    )


def digits_unet(seed: int, cross_attention_dim: int):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=16, norm_num_groups=16,
    )


def digits_pipeline(seed: int = 0):
    """The untrained pipeline: every part built from its config and seeded."""
    tokenizer = tiny_tokenizer()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", timestep_spacing="trailing",
    )
    pipe = StableDiffusionPipeline(
        vae=digits_vae(seed + 1), text_encoder=tiny_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
        unet=digits_unet(seed, TEXT_DIM), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator, kl_weight: float) -> torch.Tensor:
    """Reconstruction MSE of a posterior sample plus ``kl_weight`` times KL(q(z|x) || N(0, I)) per latent value."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    reconstruction = vae.decode(latents).sample
    kl = posterior.kl() / posterior.mean[0].numel()
    return F.mse_loss(reconstruction, images) + kl_weight * kl.mean()


def train_vae(vae, images: torch.Tensor, steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3,
              kl_weight: float = 1e-4, progress: bool = True) -> dict:
    """Trains the autoencoder in place and sets its ``scaling_factor`` to 1 / std of the latent means."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    for _ in tqdm(range(steps), desc="vae", disable=not progress):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        loss = vae_loss(vae, images[index], generator, kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        reconstruction = torch.cat([vae.decode(means[i : i + 256]).sample for i in range(0, len(means), 256)])
    scaling_factor = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return {"vae_reconstruction_mse": float(F.mse_loss(reconstruction, images)), "scaling_factor": scaling_factor}


def load_trained_weights(run_dir: Path, pipe) -> None:
    """Copies a finished sft run into ``pipe``: the UNet's EMA (else raw) weights and, if it was trained, the text encoder."""
    checkpoint = latest_checkpoint(run_dir)
    path = checkpoint / "ema-generator.safetensors"
    if not path.is_file():
        path = checkpoint / "net-generator.safetensors"
    pipe.unet.load_state_dict({k.removeprefix("backbone."): v for k, v in load_file(path).items() if k.startswith("backbone.")})
    if (checkpoint / "net-text_encoder.safetensors").is_file():
        pipe.text_encoder.load_state_dict(load_file(checkpoint / "net-text_encoder.safetensors"))


def train_digits_teacher(out, seed: int = 0, vae_steps: int = 600, unet_steps: int | None = None,
                         overrides: list[str] | None = None, progress: bool = True, vae_from=None) -> dict:
    """Reproduces ``zoo:digits`` from ``seed``: VAE, then UNet by ``sft``; writes a pipeline folder to ``out``.

    ``out`` is written under a temporary name and renamed into place when complete. Returns the
    training report (also saved as ``out/zoo.json``). ``vae_from``: a digits pipeline folder whose
    trained VAE is reused (stage 1 skipped).
    """
    out = Path(out)
    report: dict = {"seed": seed}
    tic = time.perf_counter()
    pipe = digits_pipeline(seed)
    images, _ = load_digits_images(RESOLUTION)
    if vae_from is not None:
        pipe.vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae")
        report["vae_from"] = str(vae_from)
    else:
        report.update(train_vae(pipe.vae, images, vae_steps, seed, progress=progress))
    report["vae_seconds"] = time.perf_counter() - tic
    with tempfile.TemporaryDirectory() as work:
        skeleton = Path(work) / "skeleton"
        pipe.save_pretrained(skeleton, safe_serialization=True)
        args = [f"teacher={skeleton}", f"out={Path(work) / 'run'}", f"seed={seed}", "resume=false", *(overrides or [])]
        if unet_steps is not None:
            args.append(f"max_steps={unet_steps}")
        cfg = load_recipe(ZOO_RECIPES / "digits_teacher.yaml", args)
        tic = time.perf_counter()
        run_dir = train(cfg)
        report["unet_seconds"] = time.perf_counter() - tic
        report["unet_steps"] = cfg.max_steps
        load_trained_weights(run_dir, pipe)
        with staged(out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            shutil.copy(run_dir / "metrics.jsonl", tmp / "train_metrics.jsonl")
            (tmp / "zoo.json").write_text(json.dumps(report, indent=2))
    return report


__all__ = ["RESOLUTION", "digits_pipeline", "train_digits_teacher", "train_vae", "vae_loss"]
