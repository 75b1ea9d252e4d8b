"""Assembly: a recipe becomes a teacher, a data source and a method, handed to the trainer.

This is the one module that knows every layer below it. The trainer
(:class:`~diffdistill.engine.trainer.Trainer`) receives the three as objects and knows only the
Method protocol; benchmarks and the toy pass their own teacher and data through the same door.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffdistill.config import TrainConfig
from diffdistill.data.sources import build_data_source
from diffdistill.engine.trainer import Trainer, make_accelerator, place_teacher
from diffdistill.methods import build_method
from diffdistill.randomness import derive_seed
from diffdistill.teachers import resolve_teacher


def build_trainer(cfg: TrainConfig, teacher=None, data=None) -> Trainer:
    """The trainer for ``cfg``; ``teacher`` and ``data`` default to what the recipe names."""
    accelerator = make_accelerator(cfg)  # first, so a batch that does not split fails before any loading
    torch.manual_seed(derive_seed(cfg.seed, "init"))  # same initial weights (e.g. GAN heads) on every rank
    teacher = teacher or resolve_teacher(cfg.teacher, config=cfg.teacher_config, allow_pickle=cfg.allow_pickle,
                                         trust_remote_code=cfg.trust_remote_code, seed=cfg.seed, dtype=cfg.teacher_dtype)
    place_teacher(teacher, accelerator.device)  # before the method: DMD's regression pairs sample the teacher there
    data = data or build_data_source(cfg, teacher)
    method = build_method(cfg.method, teacher, cfg, data.prompts)
    return Trainer(cfg, teacher, method, data, accelerator)


def train(cfg: TrainConfig) -> Path:
    """Runs (or resumes) the recipe and returns the run folder."""
    return build_trainer(cfg).fit()


__all__ = ["build_trainer", "train"]
