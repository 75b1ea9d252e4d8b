"""Assembly: a recipe becomes a teacher, a data source and a method, handed to the trainer.

This is the one module that knows every layer below it. The trainer
(:class:`~diffdistill.engine.trainer.Trainer`) receives the three as objects and knows only the
Method protocol; benchmarks and the toy pass their own teacher and data through the same door.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from diffdistill.backbones.loading import Teacher
from diffdistill.config import TrainConfig
from diffdistill.data.sources import build_data_source
from diffdistill.engine.broadcast import broadcast_from_main
from diffdistill.engine.trainer import Trainer, make_accelerator, place_teacher
from diffdistill.methods import build_method
from diffdistill.randomness import derive_seed
from diffdistill.teachers import configure_teacher, resolve_teacher


def build_trainer(cfg: TrainConfig, teacher=None, data=None, evaluator=None) -> Trainer:
    """The trainer for ``cfg``; ``teacher`` and ``data`` default to what the recipe names. ``evaluator``
    scores quality every ``eval_every`` steps (:func:`diffdistill.quality.evaluator_for` picks one)."""
    accelerator = make_accelerator(cfg)  # first, so a batch that does not split fails before any loading
    announce_precision_without_gpu(cfg, accelerator)
    torch.manual_seed(derive_seed(cfg.seed, "init"))  # same initial weights (e.g. GAN heads) on every rank
    teacher = teacher or load_recipe_teacher(cfg, accelerator)
    configure_teacher(teacher, cfg)
    place_teacher(teacher, accelerator.device)  # before the method: DMD's regression pairs sample the teacher there
    data = data or build_data_source(cfg, teacher)
    method = build_method(cfg.method, teacher, cfg, data.prompts)
    return Trainer(cfg, teacher, method, data, accelerator, evaluator)


def announce_precision_without_gpu(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """A recipe written for GPUs asks for mixed precision; on a machine without CUDA that is CPU autocast,
    which a user should hear about once rather than find in the timings."""
    if cfg.mixed_precision != "no" and accelerator.device.type == "cpu" and accelerator.is_main_process:
        print(f"note: mixed_precision={cfg.mixed_precision} on a machine without CUDA: autocast runs on the CPU, usually slower "
              "than float32 there; set mixed_precision=no to train in float32", file=sys.stderr)


def load_recipe_teacher(cfg: TrainConfig, accelerator: Accelerator) -> Teacher:
    """The recipe's teacher. Under several processes with ``load_on_main_only``, a teacher on disk is
    read by the main process alone: the others build it on the meta device and receive its weights by
    broadcast, before the student and critic are copied from it. So the files are read once, and the
    others never hold them in host memory: where loading copies them (a dtype conversion, pickle or
    original-layout files) a node holds one host copy, not one per GPU (8 x Flux's 24 GB on 8 GPUs).
    A ``tiny:`` teacher is built from its seed on every process: there is nothing to read."""
    read_once = cfg.load_on_main_only and accelerator.num_processes > 1 and not cfg.teacher.startswith("tiny:")
    teacher = resolve_teacher(cfg.teacher, config=cfg.teacher_config, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code,
                              seed=cfg.seed, dtype=cfg.teacher_dtype, on_meta=read_once and not accelerator.is_main_process)
    if read_once:
        broadcast_from_main(teacher_networks(teacher), accelerator.device)
    return teacher


def teacher_networks(teacher: Teacher) -> dict[str, nn.Module]:
    """Every module that holds the teacher's weights: its backbone, and its pipeline's VAE and text encoders."""
    components = teacher.pipe.components if teacher.pipe is not None else {}
    return {teacher.component: teacher.backbone, **{k: v for k, v in components.items() if isinstance(v, nn.Module)}}


def train(cfg: TrainConfig, evaluator=None) -> Path:
    """Runs (or resumes) the recipe and returns the run folder."""
    return build_trainer(cfg, evaluator=evaluator).fit()


__all__ = ["announce_precision_without_gpu", "build_trainer", "configure_teacher", "load_recipe_teacher", "teacher_networks", "train"]
