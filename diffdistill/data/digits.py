"""scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped inside the package) as images.

The bundled teacher is trained on these, so the whole toolkit can be run for real with no
download. Images are upsampled (bilinear) to the requested side and scaled to [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PHRASINGS = ("a handwritten digit {d}", "the number {w}", "{d}")


def digit_prompt(label: int, phrasing: int) -> str:
    return PHRASINGS[phrasing % len(PHRASINGS)].format(d=label, w=DIGIT_WORDS[label])


def load_digits_images(resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (images in [-1, 1] of shape (N, 3, R, R), labels (N,)). Pixel values 0..16 in the source."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target.astype(np.int64))
