"""The LoRA format: the student as a low-rank update of the teacher, loadable with
``pipe.load_lora_weights(OUT)`` on the teacher's own pipeline.

* A LoRA-trained student exports its adapters as they are.
* A full student is extracted per ``Linear`` / ``Conv2d``: the truncated SVD of
  ``dW = W_student - W_teacher`` (flattened to out x in*kh*kw) gives ``B = U_r sqrt(S_r)`` and
  ``A = sqrt(S_r) V_r^T``, the best rank-r approximation in Frobenius norm (Eckart-Young). Bias
  changes ride along exactly as ``lora_B.bias`` (peft's ``lora_bias``). Other parameters (norms,
  embeddings) have no LoRA form: their changes are listed, and show in the output error.

Keys follow diffusers' PEFT convention, ``<component>.<module>.lora_A.weight`` / ``lora_B.weight``,
with scale 1 (no alphas: diffusers then sets lora_alpha = r per module). The report gives the
relative Frobenius error per layer and the largest output difference, teacher+LoRA vs student,
on a fixed probe input (:func:`probe`), next to the teacher-vs-student difference for scale.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffdistill.conditioning import encode_prompts
from diffdistill.export.card import model_card
from diffdistill.export.diffusers_folder import call_text, sampling_call, student_scheduler
from diffdistill.export.student import ExportError, Student

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file name load_lora_weights looks for
PROBE_PROMPT = "a photograph of a cat"


def lora_layers(backbone: torch.nn.Module) -> dict:
    """Modules a LoRA can update: Linear, and ungrouped Conv2d."""
    return {name: m for name, m in backbone.named_modules()
            if isinstance(m, torch.nn.Linear) or isinstance(m, torch.nn.Conv2d) and m.groups == 1}


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors ``(A, B)`` of a weight difference, in peft's layer shapes, and the
    relative Frobenius error ``|dW - BA| / |dW|``."""
    matrix = delta.flatten(1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]
    norm = matrix.norm()
    error = float((matrix - b @ a).norm() / norm) if norm > 0 else 0.0
    if delta.ndim == 4:  # Conv2d: A is a conv of the layer's kernel into r channels, B a 1x1 conv out of them
        a, b = a.reshape(r, *delta.shape[1:]), b.reshape(delta.shape[0], r, 1, 1)
    return a.to(delta.dtype).contiguous(), b.to(delta.dtype).contiguous(), error


def extract(teacher_backbone, student_backbone, rank: int) -> tuple[dict, dict]:
    """``{module: {"A", "B", "bias"?}}`` for every updatable layer that changed, and the per-layer errors."""
    teacher_layers, student_layers = lora_layers(teacher_backbone), lora_layers(student_backbone)
    factors, errors = {}, {}
    for name, layer in student_layers.items():
        base = teacher_layers[name]
        d_weight = (layer.weight - base.weight).detach().float()
        d_bias = (layer.bias - base.bias).detach().float() if layer.bias is not None else None
        if not d_weight.any() and (d_bias is None or not d_bias.any()):
            continue
        a, b, errors[name] = low_rank(d_weight, rank)
        factors[name] = {"A": a, "B": b, "bias": d_bias}
    return factors, errors


def from_adapters(adapters: dict) -> dict:
    return {name: {"A": a.float(), "B": b.float(), "bias": None} for name, (a, b) in adapters.items()}


def unrepresented(teacher_backbone, student_backbone, layers: dict) -> dict:
    """Change of every parameter outside the LoRA-able layers (it stays the teacher's), relative to
    the larger of its two norms."""
    covered = {f"{name}.{p}" for name in layers for p in ("weight", "bias")}
    teacher = dict(teacher_backbone.named_parameters())
    changes = {}
    for key, value in student_backbone.named_parameters():
        if key in covered or key not in teacher:
            continue
        diff = (value - teacher[key]).detach().float().norm()
        if diff > 0:
            scale = torch.maximum(teacher[key].detach().float().norm(), value.detach().float().norm())  # a zero-initialized bias has norm 0
            changes[key] = float(diff / scale)
    return changes


def to_state_dict(factors: dict, prefix: str) -> dict:
    """diffusers' PEFT keys; with any bias change, every lora_B gets a bias (peft's lora_bias is global)."""
    with_bias = any(f["bias"] is not None and f["bias"].any() for f in factors.values())
    state = {}
    for name, f in factors.items():
        state[f"{prefix}.{name}.lora_A.weight"] = f["A"].contiguous()
        state[f"{prefix}.{name}.lora_B.weight"] = f["B"].contiguous()
        if with_bias:
            out = f["B"].shape[0]
            state[f"{prefix}.{name}.lora_B.bias"] = f["bias"] if f["bias"] is not None else torch.zeros(out)
    return state


def to_kohya(state: dict) -> dict:
    """diffusers' PEFT keys in the kohya layout ComfyUI, A1111/Forge and kohya's scripts read:
    ``lora_unet_<module with dots as underscores>.lora_down.weight`` (A), ``.lora_up.weight`` (B) and
    ``.alpha`` = rank (scale 1, as in the diffusers layout). diffusers' ``load_lora_weights`` reads it too."""
    if any(key.endswith("lora_B.bias") for key in state):
        raise ExportError("the kohya layout has no LoRA bias, and this student changed biases: export --lora-layout diffusers, "
                          "or the diffusers/single-file formats for the exact student")
    kohya = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        if component != "unet":
            raise ExportError(f"--lora-layout kohya is written for UNet teachers (SD1.5/2.1, SDXL), not a {component}; use --lora-layout diffusers")
        module, factor = rest.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        kohya[f"{name}.lora_down.weight" if factor.startswith("A") else f"{name}.lora_up.weight"] = value
        if factor.startswith("A"):
            kohya[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    return kohya


LORA_LAYOUTS = ("diffusers", "kohya")


def merged(teacher_backbone, factors: dict):
    """The teacher with every factor applied, ``W + B A`` and ``b + bias``: what load_lora_weights computes."""
    model = copy.deepcopy(teacher_backbone).float()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, f in factors.items():
            layer = modules[name]
            layer.weight += (f["B"].flatten(1).double() @ f["A"].flatten(1).double()).reshape(layer.weight.shape).float()
            if f["bias"] is not None:
                if layer.bias is None:
                    raise ExportError(f"{name} has no bias in the teacher but the student changed one; cannot express it as LoRA")
                layer.bias += f["bias"]
    return model


@torch.no_grad()
def probe(student: Student, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The fixed input outputs are compared on: seeded noise at the student's first timestep."""
    teacher = student.teacher
    x = torch.randn((1, *teacher.latent_shape), generator=torch.Generator().manual_seed(seed))
    prompt = "7" if type(teacher.pipe).__name__ == "DiTPipeline" else PROBE_PROMPT
    cond = encode_prompts(teacher.pipe, [prompt]) if teacher.pipe is not None else {}
    return x, torch.tensor([float(student.timesteps[0])]), cond


@torch.no_grad()
def output_difference(student: Student, backbone) -> float:
    """max |backbone - student| of the raw (native) output on :func:`probe`."""
    x, t, cond = probe(student)
    own = student.teacher.denoiser(student.backbone).raw(x, t, cond)
    return (student.teacher.denoiser(backbone).raw(x, t, cond) - own).abs().max().item()


def lora_report(student: Student, factors: dict, errors: dict, rank: int) -> dict:
    teacher = student.teacher.backbone
    worst = max(errors, key=errors.get) if errors else None
    return {
        "rank": rank,
        "source": "adapters" if student.adapters else "svd",
        "layers": len(factors),
        "relative_frobenius": errors,
        "max_relative_frobenius": errors[worst] if worst else 0.0,
        "worst_layer": worst,
        "mean_relative_frobenius": sum(errors.values()) / len(errors) if errors else 0.0,
        "unrepresented": unrepresented(teacher, student.backbone, lora_layers(teacher)),
        "max_abs_output_diff": output_difference(student, merged(teacher, factors)),
        "max_abs_output_diff_teacher": output_difference(student, teacher),
        "probe": f"seed 0 noise at t={student.timesteps[0]}, prompt {PROBE_PROMPT!r} (class 7 for DiT); raw backbone output",
    }


def check_loadable(student: Student) -> None:
    pipe = student.teacher.pipe
    if pipe is None or not hasattr(type(pipe), "load_lora_weights"):
        name = type(pipe).__name__ if pipe is not None else "this teacher"
        raise ExportError(f"{name} has no LoRA loader in diffusers (no load_lora_weights); export --format diffusers or single-file")
    if student.consistency and student.consistency.embedding_dim > 0:
        raise ExportError("this cd student's guidance input (time_embedding.cond_proj) is a layer the teacher's UNet does not have, and a LoRA "
                          "cannot add one: use --format diffusers (or train with method.guidance_embedding_dim=0, LCM-LoRA's setting)")


def write_lora(student: Student, out: Path, steps: int, rank: int, name: str | None = None, layout: str = "diffusers") -> dict:
    """Writes the adapter file (``layout``: diffusers/peft keys, or kohya's), the student's scheduler
    (for its sampler), a report and a card."""
    check_loadable(student)
    if layout not in LORA_LAYOUTS:
        raise ExportError(f"--lora-layout {layout}: choose one of {', '.join(LORA_LAYOUTS)}")
    if rank < 1:
        raise ExportError(f"--rank {rank}: the LoRA rank must be at least 1")
    teacher = student.teacher
    if student.adapters:
        factors, errors = from_adapters(student.adapters), {}
        rank = max(a.shape[0] for a, _ in student.adapters.values())
    else:
        factors, errors = extract(teacher.backbone, student.backbone, rank)
    if not factors:
        raise ExportError("the student's Linear/Conv weights equal the teacher's: nothing to extract (did the generator train at all?)")
    out.mkdir(parents=True, exist_ok=True)
    state = to_state_dict(factors, teacher.component)
    save_file(to_kohya(state) if layout == "kohya" else state, str(out / WEIGHT_NAME), metadata={"format": "pt"})
    report = {**lora_report(student, factors, errors, rank), "lora_bias": any(k.endswith("lora_B.bias") for k in state)}
    (out / "lora_report.json").write_text(json.dumps(report, indent=2))
    custom = _write_scheduler(student, out)
    (out / "README.md").write_text(model_card(student, "LoRA", _usage(student, name or str(out), steps, custom), _notes(report), _card_extra(report)))
    return {"format": "lora", "layout": layout, "steps": steps, **{k: v for k, v in report.items() if k != "relative_frobenius"}}


def _write_scheduler(student: Student, out: Path) -> tuple | None:
    """The student's scheduler beside the adapters; ``(class name, custom)``, or None where there is none."""
    try:
        scheduler, custom = student_scheduler(student)
    except ExportError:
        return None
    scheduler.save_pretrained(out / "scheduler")
    return type(scheduler).__name__, custom


def _usage(student: Student, out: str, steps: int, written: tuple | None) -> str:
    teacher = student.config.teacher
    tiny = teacher.startswith("tiny:")
    where = f"  # `diffdistill tiny-sd DIR --arch {teacher[5:]}` writes this teacher" if tiny else "  # the teacher"
    cls = written[0] if written else "LCMScheduler"
    lines = [f"import torch\nfrom diffusers import DiffusionPipeline, {cls}", "",
             f'pipe = DiffusionPipeline.from_pretrained("{"DIR" if tiny else teacher}"){where}',
             f'pipe.load_lora_weights("{out}")']
    if written is not None:
        lines.append(f'pipe.scheduler = {cls}.from_pretrained("{out}", subfolder="scheduler")  # the student\'s sampler')
        pipe = student.teacher.pipe
        call = {**sampling_call(student, pipe, steps, written[1]), "guidance_scale": 1.0}  # the teacher's backbone has no CFG switch
        seed = "torch.manual_seed(0)" if student.teacher.schedule.kind == "flow" else "torch.Generator().manual_seed(0)"
        lines.append(f'image = pipe("a photograph of a cat", {call_text(call)}, generator={seed}).images[0]  # guidance is baked in')
    return "\n".join(lines)


def _card_extra(report: dict) -> dict:
    return {
        "LoRA": f"rank {report['rank']} ({report['source']}), {report['layers']} layers",
        "Reconstruction": (f"relative Frobenius error mean {report['mean_relative_frobenius']:.3g}, max {report['max_relative_frobenius']:.3g} "
                           f"({report['worst_layer']}); max |output diff| on the probe {report['max_abs_output_diff']:.3g} "
                           f"(teacher vs student: {report['max_abs_output_diff_teacher']:.3g}); per layer in lora_report.json"),
    }


def _notes(report: dict) -> list[str]:
    notes = ["Call the pipeline with `guidance_scale=1`: guidance is baked into the student, and the teacher's UNet has no switch that skips CFG."]
    if report["lora_bias"]:
        notes.append("Bias changes travel as `lora_B.bias` (peft's lora_bias), so `pipe.fuse_lora()` cannot fuse layers that have no bias "
                     "(peft warns about this on load); unfused inference is exact.")
    if report["unrepresented"]:
        worst = max(report["unrepresented"], key=report["unrepresented"].get)
        notes.append(f"{len(report['unrepresented'])} changed parameters have no LoRA form and stay the teacher's "
                     f"(largest relative change {report['unrepresented'][worst]:.3g} in `{worst}`); use the diffusers export for the exact student.")
    return notes
