"""Export a finished run's student where people already work:

* ``diffusers``   -- a pipeline folder plain ``DiffusionPipeline.from_pretrained`` loads and samples
  in K steps exactly as diffdistill does (:mod:`.diffusers_folder`);
* ``single-file`` -- one ``.safetensors`` with the weights and the metadata to rebuild it (:mod:`.single_file`);
* ``lora``        -- adapters for ``pipe.load_lora_weights`` on the teacher (:mod:`.lora`);
* ``original``    -- one ``.safetensors`` in the original SD layout (UNet, VAE, text encoder) that
  ComfyUI and A1111/Forge load (:mod:`.original`; SD1.5/2.x).

Every format is written beside ``OUT`` under a hidden temporary name and renamed into place when
complete, so ``OUT`` is never a half-written export; an existing ``OUT`` is replaced only with
``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from diffdistill.export.diffusers_folder import write_diffusers
from diffdistill.export.lora import write_lora
from diffdistill.export.original import write_original
from diffdistill.export.single_file import load_single_file, write_single_file
from diffdistill.export.student import ExportError, Student, inference_timesteps, load_student

FORMATS = ("diffusers", "single-file", "lora", "original")
FILE_FORMATS = ("single-file", "original")  # one .safetensors; the others write folders


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


@contextlib.contextmanager
def staged(out: Path):
    """Yields a temporary path beside ``out``; on success moves it into place, on failure removes it."""
    out.parent.mkdir(parents=True, exist_ok=True)
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
                   rank: int = 64, lora_layout: str = "diffusers") -> dict:
    """Writes ``student`` to ``out`` in ``fmt``; returns what was written and checked."""
    out = Path(out)
    check_destination(student.run_dir, out, fmt, overwrite)
    steps = len(student.timesteps) if steps is None else steps
    inference_timesteps(student.timesteps, steps)  # validates steps
    with staged(out) as tmp:
        if fmt == "diffusers":
            info = write_diffusers(student, tmp, steps, str(out))
        elif fmt == "single-file":
            info = write_single_file(student, tmp, steps)
        elif fmt == "original":
            info = write_original(student, tmp, steps)
        else:
            info = write_lora(student, tmp, steps, rank, str(out), lora_layout)
    return {**info, "out": str(out), "checkpoint": str(student.checkpoint), "ema": student.ema}


def export_run(run_dir, out, fmt: str = "diffusers", steps: int | None = None, ema: bool | None = None, overwrite: bool = False,
               rank: int = 64, teacher: str | None = None, lora_layout: str = "diffusers") -> dict:
    """``diffdistill export`` from Python: the latest checkpoint of ``run_dir`` to ``out``."""
    check_destination(Path(run_dir), Path(out), fmt, overwrite)  # fail before loading anything
    student = load_student(run_dir, ema=ema, teacher=teacher)
    return export_student(student, out, fmt, steps, overwrite, rank, lora_layout)


__all__ = ["FORMATS", "ExportError", "Student", "export_run", "export_student", "load_student", "load_single_file"]
