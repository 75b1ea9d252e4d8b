"""Resolving a recipe's ``teacher:`` string to a loaded :class:`~diffdistill.backbones.loading.Teacher`.

* a local diffusers pipeline folder, or a single ``.safetensors`` (with ``teacher_config``);
* ``tiny:unet`` / ``tiny:dit`` / ``tiny:sd3`` -- a tiny random pipeline built in memory from a seed;
* ``zoo:NAME`` -- a teacher shipped inside the package, under ``diffdistill/zoo/weights/NAME``
  (see :mod:`diffdistill.zoo`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffdistill.backbones.loading import Teacher, _teacher_from_pipe, load_teacher, set_resolution
from diffdistill.backbones.tiny import tiny_pipeline
from diffdistill.config import ConfigError, TrainConfig

ZOO_ROOT = Path(__file__).parent / "zoo" / "weights"


def zoo_path(name: str) -> Path:
    path = ZOO_ROOT / name
    if not (path / "model_index.json").is_file():
        available = sorted(p.name for p in ZOO_ROOT.iterdir() if p.is_dir()) if ZOO_ROOT.is_dir() else []
        raise FileNotFoundError(
            f"zoo teacher {name!r} is not shipped in this install (available: {', '.join(available) or 'none'}); "
            f"`diffdistill zoo train-{name}` builds it"
        )
    return path


def resolve_teacher(spec: str, *, config=None, allow_pickle=False, trust_remote_code=False, seed: int = 0, dtype: str = "float32",
                    on_meta: bool = False) -> Teacher:
    """``on_meta``: a teacher read from disk has its networks built on the meta device, no weights read
    (a ``tiny:`` teacher is built from its seed either way: it reads nothing)."""
    if not spec:
        raise ValueError("no teacher given: set teacher=/path/to/pipeline (or tiny:unet for a test model)")
    if spec.startswith("tiny:"):
        pipe = tiny_pipeline(spec.split(":", 1)[1], seed).to(getattr(torch, dtype))
        index = {"unet": [None, None]} if hasattr(pipe, "unet") and pipe.unet is not None else {"transformer": [None, None]}
        return _teacher_from_pipe(pipe, index, spec)
    if spec.startswith("zoo:"):
        return load_teacher(zoo_path(spec.split(":", 1)[1]), torch_dtype=getattr(torch, dtype), on_meta=on_meta)
    return load_teacher(spec, config=config, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                        torch_dtype=getattr(torch, dtype), on_meta=on_meta)


def configure_teacher(teacher: Teacher, cfg: TrainConfig) -> None:
    """Recipe keys that shape what is built from the teacher: a guidance-distilled teacher's student
    (``student_guidance_embed``, ``student_guidance``), and the latent size of a backbone without a
    sample_size (Flux) from ``data.resolution``."""
    defaults = TrainConfig()
    if teacher.guidance_distilled:
        teacher.student_guidance_embed, teacher.student_guidance = cfg.student_guidance_embed, cfg.student_guidance
    elif (cfg.student_guidance_embed, cfg.student_guidance) != (defaults.student_guidance_embed, defaults.student_guidance):
        raise ConfigError(f"student_guidance_embed / student_guidance are for a guidance-distilled teacher (guidance_embeds: true, Flux.1-dev); "
                          f"this {teacher.kind} teacher has no guidance input: drop them")
    config = getattr(teacher.backbone, "config", None)
    if cfg.data.resolution and teacher.pipe is not None and isinstance(config, dict) and not config.get("sample_size"):
        try:
            set_resolution(teacher, cfg.data.resolution)
        except ValueError as e:
            raise ConfigError(str(e)) from None


__all__ = ["ZOO_ROOT", "configure_teacher", "resolve_teacher", "zoo_path"]
