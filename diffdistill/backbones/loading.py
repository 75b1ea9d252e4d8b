"""Loading teachers from local paths only: a diffusers pipeline folder, or a single file.

Safe by default: weights load from ``.safetensors``; pickle checkpoints (``.bin``, ``.ckpt``,
``.pt``, ``.pth``) are refused unless the user passes ``allow_pickle=True``, and remote code
runs only with ``trust_remote_code=True``. Nothing is downloaded: every call is offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from diffdistill.backbones import SUPPORTED_BACKBONES, backbone_kind, takes_guidance, vae_scale_factor
from diffdistill.backbones.meta import empty_pipeline
from diffdistill.denoiser import Denoiser
from diffdistill.schedules import schedule_from_scheduler_config

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
ACCEPTED_FORMS = ("a diffusers pipeline folder (with model_index.json), a .safetensors file with teacher_config=FOLDER, "
                  f"or a pickle checkpoint ({' '.join(PICKLE_SUFFIXES)}) with allow_pickle=true")
BACKBONE_COMPONENTS = ("unet", "transformer")


class CheckpointError(ValueError):
    """A path that exists but is not something we can load, with the fix in the message."""


@dataclass
class Teacher:
    """A loaded pipeline and what the engine needs from it."""

    pipe: object             # the diffusers pipeline (text encoders, VAE, scheduler config)
    backbone: torch.nn.Module
    component: str           # "unet" or "transformer": where the backbone lives in the pipeline
    kind: str                # backbone family, see diffdistill.backbones
    schedule: object
    prediction_type: str
    path: str
    make_student: object = None   # callable(**extra) -> fresh backbone, where a copy of the teacher will not do (toy); extra: time_cond_proj_dim
    make_critic: object = None
    data_shape: tuple | None = None  # per-sample shape, where the backbone has no sample_size (toy; Flux at data.resolution)
    student_guidance_embed: str = "drop"  # guidance-distilled teachers: the student drops its guidance input | keeps it
    student_guidance: float = 3.5          # ... the scale folded into it (drop) or always fed to it (keep)

    def denoiser(self, backbone: torch.nn.Module | None = None) -> Denoiser:
        """A Denoiser over ``backbone``; by default the teacher itself, which runs with its frozen
        weights alone even when a LoRA critic keeps its adapters on them (see scores.make_critic).
        Another backbone is a student's: one that kept a guidance input sees ``student_guidance`` there."""
        if backbone is None or backbone is self.backbone:
            return Denoiser(self.backbone, self.schedule, self.prediction_type, adapter=False)
        return Denoiser(backbone, self.schedule, self.prediction_type, embedded_guidance=self.student_guidance)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample latent shape (C, H, W). Flux's backbone sees 2x2-packed tokens of 4C channels and
        has no sample_size: its side is the pipeline's default (128 latents, 1024 px), or ``data.resolution``."""
        if self.data_shape is not None:
            return tuple(self.data_shape)
        cfg = self.backbone.config
        size = cfg.get("sample_size") or self.pipe.default_sample_size
        return (cfg.in_channels // 4 if self.kind == "flux" else cfg.in_channels, size, size)

    @property
    def guidance_distilled(self) -> bool:
        """The backbone embeds the guidance scale (Flux.1-dev): guidance at w is one pass, there is no CFG pair."""
        return takes_guidance(self.backbone)


def _weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and (p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors")]


def _check_pipeline_folder(path: Path, allow_pickle: bool) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"teacher path {str(path)!r} does not exist; give a local diffusers pipeline folder or a .safetensors file")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        hint = " (it has a config.json: this looks like a single model folder, give the pipeline folder above it)" if (path / "config.json").exists() else ""
        raise CheckpointError(f"{str(path)!r} is not a diffusion pipeline folder: no model_index.json{hint}")
    index = _read_model_index(index_file)
    component = next((c for c in BACKBONE_COMPONENTS if index.get(c)), None)
    if component is None:
        raise CheckpointError(f"{str(path)!r} has no 'unet' or 'transformer' component in model_index.json")
    backbone_class = index[component][1]
    if backbone_class not in SUPPORTED_BACKBONES:
        raise CheckpointError(f"backbone class {backbone_class} is not supported; supported: {', '.join(SUPPORTED_BACKBONES)}")
    files = _weight_files(path)
    if not any(p.suffix == ".safetensors" for p in files) and any(p.suffix in PICKLE_SUFFIXES for p in files):
        if not allow_pickle:
            raise CheckpointError(
                f"{str(path)!r} holds only pickle weights ({', '.join(sorted({p.suffix for p in files}))}), which can run "
                "arbitrary code when loaded; convert them to .safetensors, or pass allow_pickle=true if you trust the file"
            )
    for weights in (p for p in files if p.suffix == ".safetensors"):
        check_safetensors(weights)
    return index


def _read_model_index(index_file: Path) -> dict:
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(index_file)!r} is not valid JSON ({e}); restore it from the pipeline's source") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{str(index_file)!r} must be a JSON object of components; restore it from the pipeline's source")
    return index


def check_safetensors(path: Path) -> None:
    """Opens a weights file's header, which safetensors checks against the file's length: a truncated,
    empty or garbage file is named here rather than failing inside diffusers."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"{str(path)!r} is a damaged .safetensors file ({e}); re-download or re-export it") from None


def load_teacher(path: str | os.PathLike, *, config: str | None = None, allow_pickle: bool = False,
                 trust_remote_code: bool = False, torch_dtype=torch.float32, on_meta: bool = False) -> Teacher:
    """Loads a teacher from a local diffusers folder, or a single ``.safetensors`` plus ``config`` folder.

    ``on_meta``: build its networks on the meta device from their configs and read no weights (the
    same checks run, so every process refuses the same bad path); see :mod:`diffdistill.backbones.meta`."""
    path = Path(path).expanduser()
    if path.is_file() or path.suffix in PICKLE_SUFFIXES + (".safetensors",):
        return _load_single_file(path, config, allow_pickle, trust_remote_code, torch_dtype, on_meta)
    index = _check_pipeline_folder(path, allow_pickle)
    if on_meta:
        return _teacher_from_pipe(empty_pipeline(path, index, trust_remote_code), index, str(path))
    pipe = DiffusionPipeline.from_pretrained(
        path, local_files_only=True, use_safetensors=not allow_pickle, dtype=torch_dtype,
        trust_remote_code=trust_remote_code,
    )
    pipe.set_progress_bar_config(disable=True)
    return _teacher_from_pipe(pipe, index, str(path))


def _teacher_from_pipe(pipe, index: dict, path: str) -> Teacher:
    component = next(c for c in BACKBONE_COMPONENTS if index.get(c))
    backbone = getattr(pipe, component)
    backbone.requires_grad_(False).eval()
    teacher = Teacher(pipe, backbone, component, backbone_kind(backbone), None, "epsilon", path)
    set_schedule(teacher)
    return teacher


def set_schedule(teacher: Teacher) -> None:
    """The teacher's schedule and prediction type from its pipeline's scheduler config, at its latent size
    (a resolution-dependent shift, Flux's, is read at the image's token count)."""
    sched_cfg = dict(teacher.pipe.scheduler.config)
    sched_cfg["_class_name"] = type(teacher.pipe.scheduler).__name__
    teacher.schedule = schedule_from_scheduler_config(sched_cfg, image_tokens(teacher))
    teacher.prediction_type = "flow" if teacher.schedule.kind == "flow" else sched_cfg.get("prediction_type", "epsilon")


def image_tokens(teacher: Teacher) -> int:
    """How many image tokens the backbone sees per sample: Flux packs 2x2 latents; DiTs patchify by patch_size."""
    _, h, w = teacher.latent_shape
    patch = 2 if teacher.kind == "flux" else teacher.backbone.config.get("patch_size") or 1
    return (h // patch) * (w // patch)


def set_resolution(teacher: Teacher, pixels: int) -> None:
    """A backbone without a sample_size (Flux) samples at ``pixels`` (``data.resolution``): its latent side,
    and the schedule's resolution-dependent shift with it."""
    factor = vae_scale_factor(teacher.pipe) * (2 if teacher.kind == "flux" else 1)  # Flux's side: a multiple of the 2x2 packing
    if pixels % factor:
        raise ValueError(f"data.resolution={pixels} is not a multiple of {factor}, which this {teacher.kind} teacher's latents need")
    channels = teacher.latent_shape[0]
    teacher.data_shape = (channels, pixels // vae_scale_factor(teacher.pipe), pixels // vae_scale_factor(teacher.pipe))
    set_schedule(teacher)


def _load_single_file(path: Path, config: str | None, allow_pickle: bool, trust_remote_code: bool, torch_dtype,
                      on_meta: bool = False) -> Teacher:
    """A single checkpoint: our own diffusers-format backbone weights, or an original SD file.

    ``config`` must be a local pipeline folder whose configs (and other components) describe it.
    """
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix not in PICKLE_SUFFIXES + (".safetensors",):
        raise CheckpointError(f"teacher {str(path)!r} is a {path.suffix or 'suffix-less'} file, not a teacher; give {ACCEPTED_FORMS}")
    if path.suffix != ".safetensors" and not allow_pickle:
        raise CheckpointError(
            f"{str(path)!r} is a pickle checkpoint ({path.suffix}), which can run arbitrary code when loaded; "
            "convert it to .safetensors, or pass allow_pickle=true if you trust the file"
        )
    if config is None:
        raise CheckpointError(
            f"a single-file checkpoint needs a local config: pass teacher_config=/path/to/pipeline_folder "
            f"(a diffusers folder of the same architecture) alongside {path.name}"
        )
    teacher = load_teacher(config, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, torch_dtype=torch_dtype, on_meta=on_meta)
    if on_meta:  # the file's weights come with the rest, from the process that reads them
        teacher.path = str(path)
        return teacher
    state = load_state_dict_file(path)
    if any(k.startswith("model.diffusion_model.") for k in state):
        state = _convert_original_backbone(teacher, path)
    missing, unexpected = teacher.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path.name} does not match the {type(teacher.backbone).__name__} described by {config}: "
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    teacher.path = str(path)
    return teacher


def _convert_original_backbone(teacher: Teacher, path: Path) -> dict:
    """Original (CompVis / SGM) key layout: let diffusers' single-file loader convert it, offline."""
    model_class = type(teacher.backbone)
    model = model_class.from_single_file(str(path), config=teacher.path, subfolder=teacher.component, local_files_only=True)
    return model.state_dict()


def load_state_dict_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors(path)
        return load_file(str(path))
    if not allow_pickle:
        raise CheckpointError(f"refusing to unpickle {str(path)!r}; convert it to .safetensors or pass allow_pickle=true")
    return torch.load(str(path), map_location="cpu", weights_only=True)
