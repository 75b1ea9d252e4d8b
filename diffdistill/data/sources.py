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

from diffdistill.backbones import vae_scale_factor
from diffdistill.data.digits import digit_prompt, load_digits_images
from diffdistill.data.hf_dataset import HFDatasetImages
from diffdistill.data.latent_shards import LatentShards, write_latent_shards
from diffdistill.data.webdataset import WebDatasetShards
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
    out = [(_latent_mean(vae.encode(images[i : i + batch_size].to(vae.dtype))) - shift) * scale for i in range(0, len(images), batch_size)]
    return torch.cat(out).float()


def _latent_mean(encoded) -> torch.Tensor:
    """A KL autoencoder's posterior mean; a deterministic one's latent (Sana's deep-compression autoencoder)."""
    return (encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latent).float()


def image_resolution(teacher, data_cfg) -> int:
    if data_cfg.resolution is not None:
        return data_cfg.resolution
    return teacher.latent_shape[-1] * vae_scale_factor(teacher.pipe)


def image_source(cfg, teacher):
    """(captions, load) for a recipe's image data: ``load(a, b)`` gives images a..b-1 in [-1, 1]."""
    size = image_resolution(teacher, cfg.data)
    if cfg.data.source == "digits":
        images, labels = load_digits_images(size)
        return [digit_prompt(int(label), i) for i, label in enumerate(labels)], lambda a, b: images[a:b]
    if cfg.data.source == "webdataset":
        samples = WebDatasetShards(cfg.data.path)
        return samples.captions, lambda a, b: _pixels([samples.image(i) for i in range(a, min(b, len(samples)))], size)
    if cfg.data.source == "hf_dataset":
        rows = HFDatasetImages(cfg.data.path, cfg.data.split, cfg.data.image_column, cfg.data.caption_column)
        return rows.captions, lambda a, b: _pixels(rows.images(a, b), size)
    if cfg.data.source != "imagefolder":
        raise ValueError(f"data.source={cfg.data.source!r} has no images to encode: use digits, imagefolder, webdataset or hf_dataset")
    root = Path(cfg.data.path or "")
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"data.path={str(root)!r} needs a metadata.jsonl with one {{\"file_name\", \"text\"}} object a line")
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows], lambda a, b: _pixels([Image.open(root / r["file_name"]) for r in rows[a:b]], size)


def _pixels(images: list, size: int) -> torch.Tensor:
    """PIL images, resized to size x size (bicubic), as one (N, 3, size, size) tensor in [-1, 1]."""
    def one(image):
        image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)

    return torch.stack([one(image) for image in images]).float() / 127.5 - 1


def _images(cfg, teacher):
    prompts, load = image_source(cfg, teacher)
    return prompts, encode_images(teacher, load(0, len(prompts)))


def _latents(cfg, teacher):
    shards = LatentShards(cfg.data.path or "")
    if tuple(shards.index["latent_shape"]) != tuple(teacher.latent_shape):
        raise ValueError(f"data.path={cfg.data.path!r} holds latents of shape {shards.index['latent_shape']}, but this teacher's are "
                         f"{list(teacher.latent_shape)}: encode them with this teacher (`diffdistill encode-latents`)")
    return shards.prompts(), shards


def encode_dataset(cfg, teacher, out, shard_size: int = 1024, chunk: int = 256) -> Path:
    """``diffdistill encode-latents``: the recipe's images through the teacher's VAE once, as shards."""
    prompts, load = image_source(cfg, teacher)
    chunks = (encode_images(teacher, load(a, a + chunk)) for a in range(0, len(prompts), chunk))  # chunk: a multiple of encode's 64
    info = {"teacher": cfg.teacher, "source": cfg.data.source, "resolution": image_resolution(teacher, cfg.data)}
    return write_latent_shards(Path(out), prompts, chunks, info, shard_size)


def _prompts(cfg, teacher):
    prompts = list(cfg.data.prompts)
    if cfg.data.prompts_file:
        path = Path(cfg.data.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"data.prompts_file={str(path)!r} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts, None


_SOURCES = {"digits": _images, "imagefolder": _images, "webdataset": _images, "hf_dataset": _images, "latents": _latents,
            "prompts": _prompts}


def build_data_source(cfg, teacher) -> DataSource:
    prompts, latents = _SOURCES[cfg.data.source](cfg, teacher)
    return DataSource(prompts, latents, cfg.seed, cfg.data.uncond_prob)
