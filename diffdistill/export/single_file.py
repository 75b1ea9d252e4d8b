"""The single-file format: one ``.safetensors`` with the student backbone's weights (diffusers key
layout, as ``backbone.state_dict()``) and, in the safetensors metadata under ``"diffdistill"``, a
JSON record of everything needed to rebuild the pipeline around it with the teacher's config:
teacher spec, component, backbone class and config, method, timesteps, prediction type.

Load it back with :func:`load_single_file` (a pipeline) or :func:`load_student_file` (the
:class:`~diffdistill.export.student.Student`); a teacher folder that moved is given explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffdistill.backbones.loading import load_teacher
from diffdistill.export.diffusers_folder import student_pipeline
from diffdistill.export.student import ExportError, Student, load_into_backbone
from diffdistill.teachers import resolve_teacher

METADATA_KEY = "diffdistill"
FORMAT = "diffdistill-student/1"


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def student_metadata(student: Student, steps: int) -> dict:
    teacher, cfg = student.teacher, student.config
    return {
        "format": FORMAT,
        "teacher": cfg.teacher,                       # path, tiny:ARCH or zoo:NAME, as the recipe gave it
        "teacher_config": cfg.teacher_config,
        "seed": cfg.seed,                             # tiny:ARCH teachers are built from it
        "pipeline_class": type(teacher.pipe).__name__ if teacher.pipe is not None else None,
        "component": teacher.component,
        "backbone_class": type(student.backbone).__name__,
        "backbone_config": _jsonable({k: v for k, v in dict(student.backbone.config).items() if not k.startswith("_")}),
        "prediction_type": teacher.prediction_type,
        "teacher_scheduler_config": _jsonable(dict(teacher.pipe.scheduler.config)) if teacher.pipe is not None else None,
        "method": student.method,
        "method_options": _jsonable(cfg.method),
        "timesteps": list(student.timesteps),
        "input_scale": student.input_scale,           # the first step's input is input_scale * z
        "default_steps": steps,
        "step": student.step,
        "ema": student.ema,
        # a guidance-distilled teacher's student: whether it dropped the guidance input (folded in at that scale) or keeps it
        "student_guidance_embed": teacher.student_guidance_embed if teacher.guidance_distilled else None,
        "student_guidance": teacher.student_guidance if teacher.guidance_distilled else None,
    }


def write_single_file(student: Student, out: Path, steps: int) -> dict:
    if student.consistency is not None:
        raise ExportError("a cd student samples through LCM's boundary condition and its guidance input, which this file's metadata does not "
                          "record yet: use --format diffusers")
    meta = student_metadata(student, steps)
    tensors = {k: v.detach().contiguous().cpu() for k, v in student.backbone.state_dict().items()}
    save_file(tensors, str(out), metadata={METADATA_KEY: json.dumps(meta), "format": "pt"})
    return {"format": "single-file", "steps": steps, "tensors": len(tensors), "metadata": meta}


def read_metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ExportError(f"{path} has no diffdistill metadata; it was not written by `diffdistill export --format single-file`")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ExportError(f"{path} is in format {meta.get('format')!r}; this diffdistill reads {FORMAT!r}")
    return meta


def _check_config(meta: dict, class_name: str, config: dict, source: str) -> None:
    """Backbone configs must agree key by key before any weight is loaded (clearer than a shape error)."""
    own = {k: v for k, v in _jsonable(dict(config)).items() if not k.startswith("_")}
    folded = {"guidance_embeds"} if meta.get("student_guidance_embed") == "drop" else set()  # the student's is off, the teacher's on
    differ = sorted(k for k, v in meta["backbone_config"].items() if k in own and own[k] != v and k not in folded)
    if class_name != meta["backbone_class"] or differ:
        detail = ", ".join(f"{k}: file {meta['backbone_config'][k]!r} vs teacher {own[k]!r}" for k in differ[:3])
        raise ExportError(f"the teacher {source!r} does not match this student ({meta['backbone_class']} vs {class_name}; {detail}); "
                          "pass teacher_config= the pipeline folder the student was distilled from")


def load_student_file(path, teacher_config: str | None = None) -> Student:
    """The student in ``path`` inside its teacher's pipeline. ``teacher_config`` overrides the teacher
    recorded in the file (a local pipeline folder of the same architecture)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"single-file student {str(path)!r} does not exist")
    meta = read_metadata(path)
    spec = teacher_config or meta["teacher"]
    folder = Path(str(spec))
    if folder.is_dir():
        config_file = folder / meta["component"] / "config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        _check_config(meta, config.get("_class_name", "?"), config, spec)
        teacher = load_teacher(path, config=spec)  # the diffusers-format single-file path: weights into the teacher's pipeline
        backbone = teacher.backbone
    else:
        teacher = resolve_teacher(spec, config=meta.get("teacher_config"), seed=int(meta.get("seed", 0)))
        if meta.get("student_guidance_embed"):
            teacher.student_guidance_embed, teacher.student_guidance = meta["student_guidance_embed"], float(meta["student_guidance"])
        _check_config(meta, type(teacher.backbone).__name__, teacher.backbone.config, spec)
        backbone, _ = load_into_backbone(teacher, load_file(str(path)), str(path))
    return Student(teacher, backbone, list(meta["timesteps"]), None, meta["method"], path.parent, path, int(meta["step"]), bool(meta["ema"]),
                   input_scale=float(meta.get("input_scale", 1.0)))


def load_single_file(path, teacher_config: str | None = None):
    """A diffusers pipeline sampling the student in ``path`` (as the diffusers export would write it)."""
    return student_pipeline(load_student_file(path, teacher_config))
