"""The digits judge: a small CNN classifier, and the metrics it gives generated digits.

It is the small analog of the COCO protocol's two numbers, not a replacement for them:

* **digit-FID** -- the Frechet distance between Gaussians fitted to the judge's penultimate
  features (64-d) of generated images and of the 1,797 real digits, as FID does with Inception's
  2048-d pool features;
* **prompt accuracy** -- the share of samples the judge classifies as the digit the prompt named,
  as CLIP score measures prompt fidelity;
* **coverage** -- the same accuracy per digit, so a student that drops a digit shows it.

The judge is trained on 80% of the digits (a seeded split) with small random shifts and reports
its accuracy on the held-out 20%. It reads images in [-1, 1] at any size (resized to 32x32, the
channel mean taken), so a pipeline's output can be judged directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from diffdistill.data.digits import load_digits_images
from diffdistill.eval.fid import frechet_distance
from diffdistill.zoo import ZOO_ROOT

JUDGE_FILE = ZOO_ROOT / "digits_judge.safetensors"
RESOLUTION = 32
FEATURE_DIM = 64


class DigitJudge(nn.Module):
    def __init__(self):
        super().__init__()
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2)]
        self.conv = nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64))  # 32 -> 4
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] to the judge's input: one channel, 32x32."""
        images = images.float().mean(1, keepdim=True)
        if images.shape[-2:] != (RESOLUTION, RESOLUTION):
            images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=True)
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv(self.prepare(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def split_indices(n: int, seed: int = 0, held_out: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = int(round(n * (1 - held_out)))
    return order[:cut], order[cut:]


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translates each image by up to ``max_shift`` pixels (zero = background -1 padding)."""
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    size = images.shape[-1]
    out = torch.empty_like(images)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + size, dx : dx + size]
    return out


def train_judge(seed: int = 0, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, progress: bool = True) -> tuple[DigitJudge, dict]:
    images, labels = load_digits_images(RESOLUTION)
    train_idx, test_idx = split_indices(len(images), seed)
    torch.manual_seed(seed)
    judge = DigitJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * (len(train_idx) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    judge.train()
    for step in tqdm(range(steps), desc="judge", disable=not progress):
        index = train_idx[torch.randint(len(train_idx), (batch_size,), generator=generator)]
        loss = F.cross_entropy(judge(random_shift(images[index], generator)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    judge.eval()
    with torch.no_grad():
        accuracy = (judge(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return judge, {"held_out_accuracy": accuracy, "train_images": len(train_idx), "held_out_images": len(test_idx), "seed": seed}


def save_judge(judge: DigitJudge, report: dict, path=JUDGE_FILE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(judge.state_dict(), tmp, metadata={"report": json.dumps(report)})
    tmp.replace(path)
    return path


def load_judge(path=JUDGE_FILE) -> DigitJudge:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the digits judge {str(path)!r} is not there; `diffdistill zoo train-digits` trains it")
    judge = DigitJudge()
    judge.load_state_dict(load_file(path))
    with safe_open(path, "pt") as f:
        judge.report = json.loads((f.metadata() or {}).get("report", "{}"))
    return judge.eval()


@torch.no_grad()
def judge_outputs(judge: DigitJudge, images: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features float64 (N, 64), predicted digit (N,)) of images in [-1, 1]."""
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f = judge.features(images[i : i + batch_size])
        feats.append(f.double())
        preds.append(judge.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


_REFERENCE: dict = {}


def reference_statistics(judge: DigitJudge) -> tuple[np.ndarray, np.ndarray]:
    """The real digits' feature mean and covariance (all 1,797 images), cached per judge."""
    key = id(judge)
    if key not in _REFERENCE:
        images, _ = load_digits_images(RESOLUTION)
        _REFERENCE.clear()
        _REFERENCE[key] = feature_statistics(judge_outputs(judge, images)[0])
    return _REFERENCE[key]


def features_fid(judge: DigitJudge, features: np.ndarray, reference=None) -> float:
    """Frechet distance between judge features and the reference statistics (default: the real digits)."""
    return frechet_distance(*feature_statistics(features), *(reference if reference is not None else reference_statistics(judge)))


def digit_fid(judge: DigitJudge, images: torch.Tensor, reference=None) -> float:
    return features_fid(judge, judge_outputs(judge, images)[0], reference)


def judge_samples(judge: DigitJudge, images: torch.Tensor, labels) -> dict:
    """digit-FID, prompt accuracy and per-digit accuracy of generated ``images`` prompted with ``labels``."""
    labels = np.asarray(labels)
    features, predicted = judge_outputs(judge, images)
    correct = predicted == labels
    per_digit = {str(d): float(correct[labels == d].mean()) for d in range(10) if (labels == d).any()}
    return {
        "digit_fid": features_fid(judge, features),
        "prompt_accuracy": float(correct.mean()),
        "per_digit_accuracy": per_digit,
        "digits_covered": sum(v >= 0.5 for v in per_digit.values()),
        "num_samples": len(labels),
    }


__all__ = ["JUDGE_FILE", "DigitJudge", "digit_fid", "judge_samples", "load_judge", "reference_statistics", "save_judge", "train_judge"]
