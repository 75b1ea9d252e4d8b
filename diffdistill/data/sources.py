"""Data sources: an indexable set of (prompt, optional latent) items, read in a fixed order.

The order is a function of (seed, epoch) and a position is a function of the step, so the data
a step sees does not depend on how many processes share it, and a resumed run continues exactly
where it stopped. Images are encoded to latents once, with the teacher's VAE (distribution mean,
so the cache is deterministic).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from diffdistill.data.digits import digit_prompt, load_digits_images
from diffdistill.randomness import derive_seed


class DataSource:
    def __init__(self, prompts: list[str], latents: torch.Tensor | None, seed: int, uncond_prob: float):
        if not prompts:
            raise ValueError("the data source is empty: give data.prompts, data.prompts_file, or an image source")
        self.prompts, self.latents, self.seed, self.uncond_prob = prompts, latents, seed, uncond_prob
        self._orders: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data-order", epoch))
            self._orders = {epoch: torch.randperm(len(self), generator=g)}
        return self._orders[epoch]

    def items(self, start: int, n: int) -> dict:
        """Items at global positions start .. start+n-1 of the endless, per-epoch shuffled stream."""
        positions = range(start, start + n)
        epoch, offset = divmod(start, len(self))
        if offset + n <= len(self):  # the common case: one slice of one epoch's order
            index = self._order(epoch)[offset : offset + n]
        else:
            index = torch.stack([self._order(p // len(self))[p % len(self)] for p in positions])
        drop = [self.uncond_prob > 0 and torch.rand((), generator=torch.Generator().manual_seed(derive_seed(self.seed, "uncond", p))) < self.uncond_prob
                for p in positions]
        batch = {"prompts": ["" if d else self.prompts[i] for d, i in zip(drop, index.tolist())]}
        if self.latents is not None:
            batch["x0"] = self.latents[index]
        return batch


@torch.no_grad()
def encode_images(teacher, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Images in [-1, 1] to the teacher's latent space: (mean - shift) * scale, as its pipeline expects."""
    vae = teacher.pipe.vae
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = [(vae.encode(images[i : i + batch_size].to(vae.dtype)).latent_dist.mean.float() - shift) * scale for i in range(0, len(images), batch_size)]
    return torch.cat(out).float()


def image_resolution(teacher, data_cfg) -> int:
    if data_cfg.resolution is not None:
        return data_cfg.resolution
    return teacher.latent_shape[-1] * teacher.pipe.vae_scale_factor


def _digits(cfg, teacher):
    images, labels = load_digits_images(image_resolution(teacher, cfg.data))
    prompts = [digit_prompt(int(label), i) for i, label in enumerate(labels)]
    return prompts, encode_images(teacher, images)


def _imagefolder(cfg, teacher):
    root = Path(cfg.data.path or "")
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"data.path={str(root)!r} needs a metadata.jsonl with one {{\"file_name\", \"text\"}} object a line")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    size = image_resolution(teacher, cfg.data)
    def load(name):
        image = Image.open(root / name).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)
    images = torch.stack([load(r["file_name"]) for r in rows]).float() / 127.5 - 1
    return [r["text"] for r in rows], encode_images(teacher, images)


def _prompts(cfg, teacher):
    prompts = list(cfg.data.prompts)
    if cfg.data.prompts_file:
        path = Path(cfg.data.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"data.prompts_file={str(path)!r} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts, None


_SOURCES = {"digits": _digits, "imagefolder": _imagefolder, "prompts": _prompts}


def build_data_source(cfg, teacher) -> DataSource:
    prompts, latents = _SOURCES[cfg.data.source](cfg, teacher)
    return DataSource(prompts, latents, cfg.seed, cfg.data.uncond_prob)
