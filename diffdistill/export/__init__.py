"""Export a finished run's student where people already work:

* ``diffusers``   -- a pipeline folder plain ``DiffusionPipeline.from_pretrained`` loads and samples
  in K steps exactly as diffdistill does (:mod:`.diffusers_folder`);
* ``single-file`` -- one ``.safetensors`` with the weights and the metadata to rebuild it (:mod:`.single_file`);
* ``lora``        -- adapters for ``pipe.load_lora_weights`` on the teacher (:mod:`.lora`);
* ``original``    -- one ``.safetensors`` in the reference code's layout that ComfyUI and A1111/Forge
  load (:mod:`.original`): SD1.5/2.x and SDXL with UNet, VAE and text encoders; SD3/SD3.5 and Flux
  the transformer alone (:mod:`.original_transformers`).

Every format is written beside ``OUT`` under a hidden temporary name and renamed into place when
complete, so ``OUT`` is never a half-written export; an existing ``OUT`` is replaced only with
``overwrite=True``, and only when it is itself an export: a folder holding the marker file every
export writes (:data:`EXPORT_MARKER`), or a single file carrying our metadata. What an export killed
midway leaves beside ``OUT`` is cleared by the next export to the same ``OUT``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError, safe_open

from diffdistill.export.diffusers_folder import write_diffusers
from diffdistill.export.experts import write_experts
from diffdistill.export.lora import write_lora
from diffdistill.export.original import write_original
from diffdistill.export.single_file import METADATA_KEY, load_single_file, write_single_file
from diffdistill.export.student import ExportError, Student, inference_timesteps, load_student

FORMATS = ("diffusers", "single-file", "lora", "original")
FILE_FORMATS = ("single-file", "original")  # one .safetensors; the others write folders
EXPORT_MARKER = ".diffdistill-export"  # in every exported folder: what --overwrite may replace


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_destination(run_dir: Path, out: Path, fmt: str, overwrite: bool) -> None:
    """Refuses, before any work, an OUT that exists (without overwrite), has the wrong form, or holds the run."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt in FILE_FORMATS and out.suffix != ".safetensors":
        raise ExportError(f"--format {fmt} writes one file: give --to a path ending in .safetensors, not {str(out)!r}")
    if fmt not in FILE_FORMATS and out.suffix == ".safetensors":
        raise ExportError(f"--format {fmt} writes a folder; {str(out)!r} looks like a file name (use --format single-file for one file)")
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target in run.parents:
        raise ExportError(f"--to {str(out)!r} would replace the run folder itself; export somewhere else")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ExportError(f"{str(out)!r} already exists; pass --overwrite to replace it (it is replaced only once the new export is complete)")
    if out.exists() and overwrite and not is_previous_export(out):
        what = f"a folder without {EXPORT_MARKER}" if out.is_dir() else "a file without diffdistill's metadata"
        raise ExportError(f"--overwrite replaces only a previous export, and {str(out)!r} is {what}; "
                          "choose another --to, or move it away yourself")


def is_previous_export(out: Path) -> bool:
    """A folder an export wrote (its marker), an empty folder (nothing to lose), or a single file with our metadata."""
    if out.is_dir() and not out.is_symlink():
        return (out / EXPORT_MARKER).is_file() or not any(out.iterdir())
    if out.is_file() and out.suffix == ".safetensors":
        try:
            with safe_open(str(out), framework="pt") as f:
                return METADATA_KEY in (f.metadata() or {})
        except SafetensorError:
            return False
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def clear_stale(out: Path) -> None:
    """Clears what a killed export left beside ``out`` (its process is gone): a half-written ``.OUT.tmp-PID``
    is removed; a swapped-out previous export ``.OUT.old-PID`` is put back if ``out`` is missing, else removed."""
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*"), key=lambda p: ".old-" not in p.name):
        kind, _, pid = path.name[len(out.name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(path, out)
        else:
            _remove(path)


@contextlib.contextmanager
def staged(out: Path):
    """Yields a temporary path beside ``out``; on success moves it into place, on failure removes it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_file() or not out.exists():
        os.replace(tmp, out)  # a file (or a new folder) replaces atomically
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"  # a folder cannot be renamed over a folder: swap, then delete
    _remove(old)
    os.replace(out, old)
    os.replace(tmp, out)
    _remove(old)


def export_student(student: Student, out, fmt: str = "diffusers", steps: int | None = None, overwrite: bool = False,
                   rank: int = 64, lora_layout: str = "diffusers", scheduler: str | None = None) -> dict:
    """Writes ``student`` to ``out`` in ``fmt``; returns what was written and checked. ``scheduler``
    (--scheduler) only checks the scheduler the export picks: naming the wrong family is an error."""
    out = Path(out)
    check_destination(student.run_dir, out, fmt, overwrite)
    steps = (student.default_steps or len(student.timesteps)) if steps is None else steps
    inference_timesteps(student.timesteps, steps)  # validates steps
    if student.deterministic and (steps != len(student.timesteps) or fmt != "diffusers"):
        raise ExportError(f"a meanflow student is exported with h = t - r of its {len(student.timesteps)}-step sampler folded into its weights, "
                          f"as a diffusers folder: drop --steps {steps} and --format {fmt}, or train with method.sample_steps=K for another K")
    if student.experts and fmt != "diffusers":
        raise ExportError(f"a {student.method} student has one backbone per expert ({len(student.experts)}), which --format {fmt} cannot hold; "
                          "use --format diffusers (a folder with every expert and the lines that run them in turn)")
    if scheduler is not None and fmt != "diffusers":
        raise ExportError(f"--scheduler names the diffusers folder's scheduler; --format {fmt} writes none: drop --scheduler")
    with staged(out) as tmp:
        if fmt == "diffusers" and student.experts:
            info = write_experts(student, tmp, steps, str(out), scheduler)
        elif fmt == "diffusers":
            info = write_diffusers(student, tmp, steps, str(out), scheduler)
        elif fmt == "single-file":
            info = write_single_file(student, tmp, steps)
        elif fmt == "original":
            info = write_original(student, tmp, steps)
        else:
            info = write_lora(student, tmp, steps, rank, str(out), lora_layout)
        if tmp.is_dir():
            (tmp / EXPORT_MARKER).write_text(json.dumps({"format": fmt, "checkpoint": str(student.checkpoint)}) + "\n")
    return {**info, "out": str(out), "checkpoint": str(student.checkpoint), "ema": student.ema}


def export_run(run_dir, out, fmt: str = "diffusers", steps: int | None = None, ema: bool | None = None, overwrite: bool = False,
               rank: int = 64, teacher: str | None = None, lora_layout: str = "diffusers", checkpoint: str = "latest",
               scheduler: str | None = None) -> dict:
    """``diffdistill export`` from Python: a checkpoint of ``run_dir`` (latest, best or a step) to ``out``."""
    check_destination(Path(run_dir), Path(out), fmt, overwrite)  # fail before loading anything
    student = load_student(run_dir, ema=ema, teacher=teacher, checkpoint=checkpoint)
    return export_student(student, out, fmt, steps, overwrite, rank, lora_layout, scheduler)


__all__ = ["EXPORT_MARKER", "FORMATS", "ExportError", "Student", "export_run", "export_student", "load_student", "load_single_file"]
