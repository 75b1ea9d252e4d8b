"""What a user sees of a run: metrics.jsonl, PNG grids, and TensorBoard or Weights & Biases
through accelerate's trackers (``log_with``), which receive the metrics, the config and the grids."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffdistill.config import ConfigError, to_dict
from diffdistill.engine.config_changes import flatten

TRACKERS = ("tensorboard", "wandb", "none")


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def wandb_available() -> bool:
    return importlib.util.find_spec("wandb") is not None


def tracker_for(log_with: str) -> str | None:
    """accelerate's tracker name for ``log_with``: TensorBoard when installed (metrics.jsonl and the
    PNGs are written either way), W&B as asked (an error naming the install when it is missing)."""
    if log_with not in TRACKERS:
        raise ConfigError(f"log_with={log_with!r}: choose one of {', '.join(TRACKERS)}")
    if log_with == "wandb" and not wandb_available():
        raise ConfigError("log_with=wandb needs the wandb package: `pip install wandb` (WANDB_MODE=offline logs without an account), "
                          "or log_with=tensorboard|none")
    if log_with == "tensorboard" and not tensorboard_available():
        return None
    return None if log_with == "none" else log_with


def flat_config(cfg) -> dict:
    """The run's settings as dotted keys with scalar values (TensorBoard's hparams take nothing else)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(to_dict(cfg)).items()}


def log_image(trackers: list, path: Path, step: int, name: str = "samples") -> None:
    """A PNG (a sample grid, the quality curve) to every tracker under ``name``, in the form each one takes."""
    image = np.asarray(Image.open(path).convert("RGB"))
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({name: image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({name: [image]}, step=step)


def append_metrics(run_dir: Path, step: int, logs: dict) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **logs}) + "\n")


def save_grid(images: torch.Tensor, path: Path, columns: int | None = None) -> Path:
    """Images in [0, 1], shape (N, 3, H, W), tiled into one PNG (nearest-upscaled when tiny)."""
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * h, columns * w)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    array = (grid.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    picture = Image.fromarray(array)
    if max(picture.size) < 512:  # a 16 px sample is unreadable at 1:1
        scale = 512 // max(picture.size) + 1
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Keeps only rows up to ``step`` (a resume from it logs the later ones again), rewriting the
    file atomically; a half-written last row (a killed run) goes too."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line + "\n")
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
