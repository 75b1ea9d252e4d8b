"""In-training quality for real teachers (``eval_every``): FID-N and CLIP score on a caption subset.

The first ``eval_samples`` captions of ``eval_prompts`` are sampled by the trainer each evaluation
(same noise every time); the images go through the protocol's transform (centre crop, LANCZOS 256,
clean-fid's clean resize) and Inception, and their Gaussian is compared with ``eval_reference``: the
``.npz`` statistics `diffdistill eval` caches for the real images (``--cache-dir``), written with
the same Inception file. CLIP score is added when ``$DIFFDISTILL_CLIP`` names a CLIP model. Nothing
is downloaded: a missing Inception file stops the run before training, with where to put it.

FID on a few hundred samples is biased upward against FID-30k; it ranks checkpoints of one run.
The curve has no teacher line: the teacher's own FID-N costs far more sampling than training does
(run `diffdistill eval` on the teacher at the same N for it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffdistill.eval import EvalInputError, clip_score
from diffdistill.eval.coco import read_prompts_file
from diffdistill.eval.fid import (
    FeatureStatistics,
    InceptionFeatureExtractor,
    clean_resize,
    frechet_distance,
    load_statistics,
    resolve_inception_path,
)
from diffdistill.eval.protocol import protocol_image


def _uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Images in [-1, 1] (N, 3, H, W) as HxWx3 uint8, as a saved PNG would hold them."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return list(pixels.numpy())


class CaptionQuality:
    metric, lower_is_better = "fid", True

    def __init__(self, prompts_file: str | Path, reference: str | Path, num_samples: int, device: str = "cpu"):
        self.prompts = read_prompts_file(prompts_file, num_samples).captions
        if not Path(reference).is_file():
            raise EvalInputError(f"eval_reference={str(reference)!r} does not exist: give the .npz Inception statistics of real images "
                                 "that `diffdistill eval` caches (its --cache-dir)")
        self.extractor = InceptionFeatureExtractor.load(resolve_inception_path(), device)
        self.mu, self.sigma, _, metadata = load_statistics(reference)
        saved_with = metadata.get("extractor", {})
        if isinstance(saved_with, dict) and saved_with.get("sha256") not in (None, self.extractor.sha256):
            raise EvalInputError(f"eval_reference={str(reference)!r} was computed with another Inception file "
                                 f"({saved_with.get('sha256', '')[:12]}, here {self.extractor.sha256[:12]}); recompute it with this one")
        clip_path = clip_score.resolve_clip_path()
        self.clip = clip_score.load_clip_scorer(clip_path, device) if clip_path is not None else None

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        small = [protocol_image(Image.fromarray(image)) for image in _uint8(samples)]
        stats = FeatureStatistics(self.extractor.dim)
        for i in range(0, len(small), 50):
            batch = np.stack([clean_resize(image).transpose(2, 0, 1) for image in small[i : i + 50]])
            stats.update(self.extractor(torch.from_numpy(batch)))
        metrics = {"fid": frechet_distance(stats.mean, stats.covariance, self.mu, self.sigma)}
        if self.clip is not None:
            metrics["clip_score"] = float(np.mean(self.clip.similarities(small, self.prompts[: len(small)])))
        return metrics

    def reference(self) -> dict[str, float]:
        return {}


__all__ = ["CaptionQuality"]
