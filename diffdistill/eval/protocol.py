"""The protocol's image transform, and streaming images through it into Inception statistics.

The protocol is GigaGAN's (Kang et al., 2023, evaluation code), which DMD2 reuses:
every image, generated or real, is centre-cropped to a square on its long edge,
resized with PIL LANCZOS to 256x256, and only then handed to clean-fid's clean
mode (:func:`~diffdistill.eval.fid.clean_resize`, 299 px).  :func:`extract_features`
runs that transform and a feature extractor over a list of image files, for the
reference images and the generated ones alike.
"""

import os
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm.auto import tqdm

from diffdistill.eval.fid import FeatureStatistics, clean_resize

PROTOCOL_RESOLUTION = 256


def centre_crop_long_edge(image: Image.Image) -> Image.Image:
    """Crop the long edge to the short one, centred, with torchvision's ``center_crop`` rounding
    (``int(round(margin / 2))``, Python's round-half-to-even), as GigaGAN's ``CenterCropLongEdge``."""
    width, height = image.size
    side = min(width, height)
    left, top = int(round((width - side) / 2.0)), int(round((height - side) / 2.0))
    return image.crop((left, top, left + side, top + side))


def protocol_image(image: Image.Image, resolution: int = PROTOCOL_RESOLUTION) -> np.ndarray:
    """GigaGAN's evaluation transform: RGB, centre crop on the long edge, PIL LANCZOS to ``resolution``, uint8."""
    square = centre_crop_long_edge(image.convert("RGB"))
    return np.asarray(square.resize((resolution, resolution), resample=Image.LANCZOS))


class ProtocolImages:
    """A map-style dataset: file -> (clean-resized float tensor 3x299x299, protocol uint8 image HxWx3)."""

    def __init__(self, paths: list[Path], resolution: int = PROTOCOL_RESOLUTION):
        self.paths, self.resolution = list(paths), resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        with Image.open(self.paths[index]) as image:
            small = protocol_image(image, self.resolution)
        clean = torch.from_numpy(clean_resize(small).transpose(2, 0, 1).copy())
        return clean, torch.from_numpy(small.copy())


def extract_features(
    paths: list[Path],
    extractor,
    *,
    batch_size: int = 64,
    workers: int = 0,
    features_path: Path | None = None,
    on_batch=None,
    resolution: int = PROTOCOL_RESOLUTION,
    desc: str = "features",
) -> FeatureStatistics:
    """Stream ``paths`` through the protocol transform and the extractor into float64 statistics.

    With ``features_path``, the float32 features are also written to a ``.npy``
    memory map (KID draws subsets from it) instead of being kept in memory.
    ``on_batch(start_index, protocol_images)`` sees each batch of 256 px uint8
    images (the CLIP score uses them).
    """
    stats = FeatureStatistics(extractor.dim)
    store = None
    if features_path is not None:
        partial = features_path.with_name(features_path.name + ".partial.npy")
        store = open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(paths), extractor.dim))
    loader = torch.utils.data.DataLoader(
        ProtocolImages(paths, resolution), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    start = 0
    for clean, small in tqdm(loader, desc=desc, unit="batch"):
        features = extractor(clean)
        stats.update(features)
        if store is not None:
            store[start : start + len(features)] = features
        if on_batch is not None:
            on_batch(start, small.numpy())
        start += len(features)
    if store is not None:
        store.flush()
        del store
        os.replace(partial, features_path)
    return stats
