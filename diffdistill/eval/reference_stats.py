"""Reference statistics of a COCO validation split, computed once and cached.

The reference set is every image of the split listed in its caption annotations
(40,504 images of val2014, 5,000 of val2017) under the protocol's transform
(:mod:`~diffdistill.eval.protocol`).  Its Inception mean and covariance go to a
``.npz`` and its features to a ``.npy`` (KID draws subsets from them), under a
cache key naming the split, the image list, the resolution and the extractor's
weights, so that a change to any of them recomputes.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffdistill.eval import protocol
from diffdistill.eval.fid import load_statistics


def reference_image_paths(coco_dir: str | Path, split: str, annotations: dict) -> list[Path]:
    """Every image listed in the split's annotations, in image-id order; all must exist."""
    folder = Path(coco_dir) / split
    images = sorted(annotations["images"], key=lambda im: int(im["id"]))
    paths = [folder / im["file_name"] for im in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} COCO {split} images are missing (first: {missing[0]}). "
            f"The reference statistics need the whole split under {folder}."
        )
    return paths


@dataclass
class ReferenceStatistics:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features_path: Path
    stats_path: Path
    from_cache: bool
    metadata: dict = field(default_factory=dict)

    def features(self) -> np.ndarray:
        return np.load(self.features_path, mmap_mode="r")


def reference_cache_key(split: str, paths: list[Path], extractor_key: str, resolution: int) -> str:
    """Protocol, split, image list, resolution and extractor weights: change any and the cache misses."""
    listing = hashlib.sha256("\n".join(p.name for p in paths).encode()).hexdigest()[:10]
    return f"coco-{split}-n{len(paths)}-{listing}_crop-lanczos{resolution}-clean299_{extractor_key}"


def reference_statistics(
    coco_dir: str | Path,
    split: str,
    annotations: dict,
    extractor,
    cache_dir: str | Path,
    *,
    batch_size: int = 64,
    workers: int = 0,
    resolution: int = protocol.PROTOCOL_RESOLUTION,
) -> ReferenceStatistics:
    """The COCO reference Gaussian (and features, for KID), computed once and cached as ``.npz`` + ``.npy``."""
    paths = reference_image_paths(coco_dir, split, annotations)
    key = reference_cache_key(split, paths, extractor.key, resolution)
    stats_path = Path(cache_dir) / f"{key}.npz"
    features_path = Path(cache_dir) / f"{key}.features.npy"
    if stats_path.is_file() and features_path.is_file():
        mu, sigma, count, metadata = load_statistics(stats_path)
        return ReferenceStatistics(mu, sigma, count, features_path, stats_path, True, metadata)
    features_path.parent.mkdir(parents=True, exist_ok=True)
    stats = protocol.extract_features(
        paths,
        extractor,
        batch_size=batch_size,
        workers=workers,
        features_path=features_path,
        resolution=resolution,
        desc=f"reference COCO {split}",
    )
    metadata = {
        "split": split,
        "images": len(paths),
        "transform": f"centre crop on the long edge, PIL LANCZOS {resolution}, clean-fid clean mode 299",
        "extractor": extractor.describe(),
    }
    stats.save(stats_path, **metadata)
    return ReferenceStatistics(stats.mean, stats.covariance, stats.count, features_path, stats_path, False, metadata)
