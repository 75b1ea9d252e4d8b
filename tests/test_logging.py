"""Trackers: Weights & Biases (offline, no network) receives the metrics, the config and the sample grids."""

import time
from pathlib import Path

import pytest

from diffdistill.config import ConfigError, load_recipe
from diffdistill.engine import logging as run_logging
from diffdistill.run import build_trainer, train

DMD2 = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "dmd2.yaml"
FAST = ["batch_size=2", "log_every=1", "checkpoint_every=100", "resume=false"]


class Brightness:
    """A stand-in quality metric (eval_every): the samples' mean."""

    metric, lower_is_better, prompts = "brightness", False, ["a digit 1", "a digit 2"]

    def __call__(self, samples):
        return {"brightness": float(samples.mean())}

    def reference(self):
        return {"brightness": 0.0}


def test_wandb_offline_run_holds_the_metrics_config_grids_and_quality_curve(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(load_recipe(DMD2, [f"out={tmp_path / 'my-run'}", *FAST, "max_steps=3", "sample_every=3", "log_with=wandb", "optim.lr=0.000123",
                                   "eval_every=3"]), Brightness())
    (folder,) = (run / "wandb").glob("offline-run-*")
    (log,) = folder.glob("*.wandb")
    expected = (b"loss_generator", b"loss_critic", b"samples", b"optim.lr", b"0.000123", b"my-run", b"eval/brightness", b"quality")
    # W&B's record stream (keys and string values stored as text); its writer process may still be
    # flushing when finish() has returned, on a loaded machine for a second or two
    deadline = time.monotonic() + 60
    while not all(key in log.read_bytes() for key in expected) and time.monotonic() < deadline:
        time.sleep(0.5)
    data = log.read_bytes()
    for key in expected:
        assert key in data, key


def test_tracker_choice_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(run_logging, "wandb_available", lambda: False)  # as on a machine without it
    with pytest.raises(ConfigError, match="pip install wandb"):
        build_trainer(load_recipe(DMD2, [f"out={tmp_path}", "log_with=wandb"]))
    with pytest.raises(ConfigError, match="choose one of tensorboard, wandb, none"):
        build_trainer(load_recipe(DMD2, [f"out={tmp_path}", "log_with=mlflow"]))


def test_loss_figure_has_a_panel_per_loss_and_a_true_moving_average(tmp_path):
    from PIL import Image

    from diffdistill.plots import labelled_grid, loss_figure, moving_average

    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    rows = [{"step": s, "phase": "critic" if s % 2 else "generator", ("loss_critic" if s % 2 else "loss_generator"): 1.0 / s} for s in range(1, 60)]
    path = loss_figure(rows, tmp_path / "loss.png")
    assert Image.open(path).size == (7 * 120, round(2 * 2.6 * 120))  # two panels at 120 dpi
    assert loss_figure(rows[:1], tmp_path / "none.png") is None  # one point is no curve
    import torch

    grid = labelled_grid({"teacher\n25 steps": torch.rand(3, 3, 8, 8), "student\n1 step": torch.rand(3, 3, 8, 8)}, ["a", "b", "c"], tmp_path / "g.png")
    assert Image.open(grid).size[0] > Image.open(grid).size[1] > 0
