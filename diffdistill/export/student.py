"""Reading a finished run back: its config, its teacher, and the student's weights and timesteps.

A run folder (see :mod:`diffdistill.engine.trainer`) holds ``checkpoints/latest`` -> ``step-N/``
with ``net-generator.safetensors`` (a Denoiser's state dict: keys ``backbone.*``), optionally
``ema-generator.safetensors``, and ``state.json`` whose ``config`` is the resolved recipe the
weights were trained under. A ``parallel: fsdp`` run saves folders of shards instead
(``net-generator/``, ``ema-generator/``), read whole here on one process. Every export format
starts from the :class:`Student` built here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffdistill.backbones.guidance_embed import fold_guidance_embedding
from diffdistill.backbones.interval_embed import fold_interval_input
from diffdistill.backbones.loading import Teacher
from diffdistill.conditioning import encode_prompts
from diffdistill.config import TrainConfig, from_dict
from diffdistill.engine.checkpoint import best_checkpoint, complete_checkpoints, latest_checkpoint, read_state, saved_state
from diffdistill.export.errors import ExportError
from diffdistill.export.method_students import Consistency, student_spec
from diffdistill.generator import sample_student
from diffdistill.methods.base import method_options
from diffdistill.methods.phased_dmd import expert_step
from diffdistill.teachers import configure_teacher, resolve_teacher


@dataclass
class Student:
    """The distilled generator as a backbone of the teacher's class, plus what it was trained for."""

    teacher: Teacher
    backbone: torch.nn.Module          # same class and config as teacher.backbone, student weights
    timesteps: list[float]             # the student's sampler, e.g. [999, 749, 499, 249]
    config: object                     # the run's TrainConfig
    method: str
    run_dir: Path
    checkpoint: Path
    step: int
    ema: bool                          # weights are the EMA of the generator
    adapters: dict | None = None       # LoRA-trained student: {module name: (A, B)}, already merged into backbone
    input_scale: float = 1.0           # the first step sees input_scale * z (SiD's scale_input: sigma_{t_0}), not z
    default_steps: int | None = None   # steps an export samples by default; None: all timesteps
    consistency: Consistency | None = None  # cd: LCM's boundary condition and guidance input on top of the backbone
    experts: list | None = None        # phased_dmd: one backbone per timestep, experts[0] is backbone
    deterministic: bool = False        # meanflow: steps deterministically (DDIM) through all its timesteps, h folded for exactly that K

    def denoiser(self):
        return self.teacher.denoiser(self.backbone)

    def sampling_net(self):
        """What the sampler calls: the denoiser, or cd's consistency function around it."""
        return self.consistency.wrap(self.denoiser()) if self.consistency else self.denoiser()


def student_input_scale(method_spec: dict, schedule, timesteps: list) -> float:
    """SiD (``scale_input``) feeds sigma_{t_0} z to the first step, as SiD-LSG's x_init; others feed z."""
    _, options = method_options(method_spec)
    return float(schedule.sigma(torch.tensor([float(timesteps[0])]))) if getattr(options, "scale_input", False) else 1.0


def _checkpoint(run_dir: Path, which: str = "latest") -> tuple[Path, dict]:
    """The checkpoint ``which`` names: ``latest``, ``best`` (see ``eval_every``), or a step (``1200`` / ``step-00001200``)."""
    if not run_dir.is_dir():
        raise ExportError(f"run folder {str(run_dir)!r} does not exist; give the out= folder of a `diffdistill train` run")
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "checkpoints").is_dir():
        raise ExportError(f"{str(run_dir)!r} is not a run folder (no config.yaml, no checkpoints/); give the out= folder of a `diffdistill train` run")
    if which != "latest":
        path = _chosen_checkpoint(run_dir, which)
        return path, json.loads((path / "state.json").read_text())
    path = latest_checkpoint(run_dir)
    if path is None:
        partial = sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-*")) if (run_dir / "checkpoints").is_dir() else []
        hint = f" (found only the interrupted write {partial[0]})" if partial else ""
        raise ExportError(
            f"{str(run_dir)!r} has no finished checkpoint{hint}: checkpoints/latest is missing or points nowhere. "
            "Train until the first checkpoint is written (at checkpoint_every steps and at max_steps), then export"
        )
    return path, json.loads((path / "state.json").read_text())


def _chosen_checkpoint(run_dir: Path, which: str) -> Path:
    root = run_dir / "checkpoints"
    if which == "best":
        path = best_checkpoint(run_dir)
        if path is None:
            raise ExportError(f"{str(run_dir)!r} has no best checkpoint: checkpoints/best is written by runs with eval_every > 0 "
                              "(and names a checkpoint that still exists); export --checkpoint latest, or train with eval_every=N")
        return path
    name = which if which.startswith("step-") else f"step-{int(which):08d}" if which.isdigit() else None
    found = [p.name for p in complete_checkpoints(root)]
    if name not in found:
        raise ExportError(f"--checkpoint {which}: choose latest, best or one of the run's checkpoints ({', '.join(found) or 'none'})")
    return root / name


def _weights_file(path: Path, ema: bool | None, names: tuple = ("net-generator", "ema-generator")) -> tuple[Path, bool]:
    """A student net's saved weights (a file, or a folder of shards) and whether they are the EMA;
    ``names`` are the raw and EMA state names (phased_dmd: ``net-expert_k``, ``net-ema_k``)."""
    raw_name, ema_name = names
    ema_saved, net_saved = saved_state(path, ema_name), saved_state(path, raw_name)
    if ema is None:
        ema = ema_saved is not None
    if ema and ema_saved is None:
        raise ExportError(f"{path} has no EMA weights ({ema_name}: the run kept none); export without --ema")
    chosen = ema_saved if ema else net_saved
    if chosen is None:
        raise ExportError(f"{path} has no student weights ({raw_name}.safetensors); was this run trained with a distillation method?")
    return chosen, ema


def _resolve_teacher(cfg, teacher: str | None) -> Teacher:
    """The run's teacher as training configured it: its student's guidance input (Flux.1-dev) and latent size and shift (Flux)."""
    spec = teacher or cfg.teacher
    try:
        loaded = resolve_teacher(spec, config=cfg.teacher_config, allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code, seed=cfg.seed)
    except FileNotFoundError as e:
        raise ExportError(f"the run's teacher {spec!r} cannot be loaded ({e}); if it moved, pass --teacher /new/path") from e
    configure_teacher(loaded, cfg)
    return loaded


def drops_guidance(teacher: Teacher) -> bool:
    """A guidance-distilled teacher's student trained without the guidance input (``student_guidance_embed: drop``)."""
    return teacher.guidance_distilled and teacher.student_guidance_embed == "drop"


def split_lora(state: dict) -> tuple[dict, dict]:
    """Splits a peft-injected state dict into base weights (``base_layer`` names folded back) and
    adapters ``{module: (A, B)}`` (adapter name ``default``)."""
    base, pairs = {}, {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            module, rest = key.split(".lora_A." if ".lora_A." in key else ".lora_B.", 1)
            pairs.setdefault(module, {})["A" if ".lora_A." in key else "B"] = value
        else:
            base[key.replace(".base_layer.", ".")] = value
    return base, {m: (p["A"], p["B"]) for m, p in pairs.items()}


def _merge_lora(backbone: torch.nn.Module, adapters: dict) -> None:
    """W += B @ A (scale 1: lora_alpha = r, the convention of diffdistill's LoRA nets)."""
    modules = dict(backbone.named_modules())
    with torch.no_grad():
        for name, (a, b) in adapters.items():
            weight = modules[name].weight
            delta = b.flatten(1).double() @ a.flatten(1).double()
            weight += delta.reshape(weight.shape).to(weight.dtype)


def load_into_backbone(teacher: Teacher, state: dict, source: str, template=None) -> tuple[torch.nn.Module, dict | None]:
    """A copy of the teacher's backbone (or of ``template``: cd's adds a guidance input; a Flux.1-dev student that
    dropped its guidance input has it folded in first, see :func:`~diffdistill.generator.student_denoiser`) holding ``state``
    (keys without ``backbone.``); any shape or key mismatch is an :class:`ExportError` naming the
    teacher, never a silent partial load."""
    base, adapters = split_lora(state)
    backbone = copy.deepcopy(teacher.backbone if template is None else template).float()
    if template is None and drops_guidance(teacher):  # trained without the guidance input: fold it as student_denoiser did
        backbone = fold_guidance_embedding(backbone, teacher.student_guidance)
    own = backbone.state_dict()
    if adapters and not base:  # a LoRA student's checkpoint holds its adapters alone: the base is the teacher
        base = dict(own)
    missing = sorted(set(own) - set(base))
    unexpected = sorted(set(base) - set(own))
    shapes = [f"{k}: {tuple(base[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(base) & set(own)) if base[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ExportError(
            f"{source} does not match the teacher {teacher.path!r} ({type(backbone).__name__}): {len(missing)} missing keys "
            f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, {len(shapes)} shape mismatches {shapes[:2]}. "
            "Pass --teacher with the pipeline this run was trained from"
        )
    backbone.load_state_dict(base)
    if adapters:
        _merge_lora(backbone, adapters)
    return backbone.requires_grad_(False).eval(), adapters or None


def _load_net(path: Path, names: tuple, ema: bool | None, teacher: Teacher, template) -> tuple[torch.nn.Module, dict | None, bool]:
    weights, ema = _weights_file(path, ema, names)
    raw = read_state(weights)
    if not all(k.startswith("backbone.") for k in raw):
        raise ExportError(f"{weights} is not a Denoiser state dict (keys should start with 'backbone.')")
    backbone, adapters = load_into_backbone(teacher, {k[len("backbone."):]: v for k, v in raw.items()}, str(weights), template)
    return backbone, adapters, ema


def load_student(run_dir, *, ema: bool | None = None, teacher: str | None = None, checkpoint: str = "latest") -> Student:
    """A finished checkpoint of ``run_dir`` (``checkpoint``: latest, best or a step) as a :class:`Student`
    (EMA weights if the run kept them, unless ``ema=False``). ``teacher`` overrides the recipe's teacher path (if it moved)."""
    run_dir = Path(run_dir)
    path, state = _checkpoint(run_dir, checkpoint)
    cfg = from_dict(TrainConfig, state["config"])
    loaded_teacher = _resolve_teacher(cfg, teacher)
    spec = student_spec(cfg.method, loaded_teacher, cfg)
    loaded = [_load_net(path, names, ema, loaded_teacher, spec.template) for names in spec.nets]
    backbone, adapters, used_ema = loaded[0]
    if spec.interval is not None:  # meanflow: its constant h at K uniform steps, folded into a bias
        backbone = fold_interval_input(backbone, spec.interval).requires_grad_(False).eval()
    scale = student_input_scale(cfg.method, loaded_teacher.schedule, spec.timesteps)
    return Student(loaded_teacher, backbone, spec.timesteps, cfg, cfg.method["name"], run_dir, path, int(state["step"]), used_ema, adapters, scale,
                   spec.default_steps, spec.consistency, [b for b, _, _ in loaded] if spec.experts else None, spec.interval is not None)


def inference_timesteps(timesteps: list, steps: int) -> list:
    """The timesteps a K-step sample uses: K evenly spaced indices into the training timesteps,
    chosen as diffusers' LCMScheduler chooses them (so the exported pipeline agrees)."""
    if not 1 <= steps <= len(timesteps):
        raise ExportError(f"--steps {steps}: the student was trained on {len(timesteps)} timestep(s) {list(timesteps)}; choose 1..{len(timesteps)}")
    index = np.floor(np.linspace(0, len(timesteps), num=steps, endpoint=False)).astype(int)
    return [timesteps[i] for i in index]


@torch.no_grad()
def reference_sample(student: Student, prompts: list, steps: int, generator: torch.Generator) -> torch.Tensor:
    """diffdistill's own K-step sample (x0 latents), drawing from ``generator`` exactly as the
    exported pipeline does: the initial latents first, then one draw per re-noising."""
    device = next(student.backbone.parameters()).device
    cond = encode_prompts(student.teacher.pipe, prompts, device)
    noise = torch.randn((len(prompts), *student.teacher.latent_shape), generator=generator, device=generator.device).to(device)
    if student.experts or student.deterministic:
        return expert_chain(student, noise, cond)
    timesteps = inference_timesteps(student.timesteps, steps)
    return sample_student(student.sampling_net(), student.teacher.schedule, timesteps, noise * student.input_scale, cond, generator)


def expert_chain(student: Student, noise: torch.Tensor, cond: dict) -> torch.Tensor:
    """phased_dmd's sampler: expert k takes x from t_k to t_{k+1} by one deterministic step (the last to x0);
    meanflow's: its one backbone takes every step (z_r = z_t - (t - r) u is that step in the flow frame)."""
    x, schedule, timesteps = noise, student.teacher.schedule, student.timesteps
    for k, backbone in enumerate(student.experts or [student.backbone] * len(timesteps)):
        x = expert_step(student.teacher.denoiser(backbone), schedule, x, timesteps[k], (timesteps[k + 1:] or [None])[0], cond)
    return x
