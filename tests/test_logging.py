"""Trackers: Weights & Biases (offline, no network) receives the metrics, the config and the sample grids."""

from pathlib import Path

import pytest

from diffdistill.config import ConfigError, load_recipe
from diffdistill.engine import logging as run_logging
from diffdistill.run import build_trainer, train

DMD2 = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "dmd2.yaml"
FAST = ["batch_size=2", "log_every=1", "checkpoint_every=100", "resume=false"]


def test_wandb_offline_run_holds_the_metrics_config_and_grids(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(load_recipe(DMD2, [f"out={tmp_path / 'my-run'}", *FAST, "max_steps=3", "sample_every=3", "log_with=wandb", "optim.lr=0.000123"]))
    (folder,) = (run / "wandb").glob("offline-run-*")
    (log,) = folder.glob("*.wandb")
    data = log.read_bytes()  # W&B's record stream: keys and string values are stored as text
    for expected in (b"loss_generator", b"loss_critic", b"samples", b"optim.lr", b"0.000123", b"my-run"):
        assert expected in data, expected


def test_tracker_choice_is_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(run_logging, "wandb_available", lambda: False)  # as on a machine without it
    with pytest.raises(ConfigError, match="pip install wandb"):
        build_trainer(load_recipe(DMD2, [f"out={tmp_path}", "log_with=wandb"]))
    with pytest.raises(ConfigError, match="choose one of tensorboard, wandb, none"):
        build_trainer(load_recipe(DMD2, [f"out={tmp_path}", "log_with=mlflow"]))
