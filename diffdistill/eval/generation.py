"""Resumable generation: one PNG per caption from any diffusers pipeline, timed and NFE-counted.

Image ``i`` is drawn from its own generator seeded ``seed + i`` and written as
``image_dir/000123.png`` (atomically), so an interrupted evaluation resumes where
it stopped and an image does not depend on its batch.  Each finished image is
recorded, with its size and SHA-256, in ``image_dir/manifest.jsonl``; on resume an
image counts as done only if it matches its record, so a truncated, unreadable or
swapped file is generated again.  :func:`count_denoiser_rows` counts the
denoiser's sample rows, from which the NFE per image is reported.
"""

import hashlib
import inspect
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

MANIFEST = "manifest.jsonl"  # one record per finished image, appended: a crash loses at most the last line


def image_path(image_dir: Path, index: int) -> Path:
    return Path(image_dir) / f"{index:06d}.png"


def image_record(path: Path) -> dict:
    data = path.read_bytes()
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_records(image_dir: Path) -> dict[str, dict]:
    """File name -> its latest record; a line cut short by a crash is ignored (that image is redone)."""
    records = {}
    path = Path(image_dir) / MANIFEST
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
                records[record["file"]] = record
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return records


def _record_images(image_dir: Path, paths: list[Path]) -> None:
    with open(Path(image_dir) / MANIFEST, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(image_record(path)) + "\n" for path in paths)


def verified_images(image_dir: Path, count: int) -> set[int]:
    """Indices whose file is on disk and matches its record, byte for byte (size, then SHA-256)."""
    records = read_records(image_dir)
    done = set()
    for i in range(count):
        path = image_path(image_dir, i)
        record = records.get(path.name)
        if record and path.is_file() and path.stat().st_size == record.get("bytes") and image_record(path) == record:
            done.add(i)
    return done


def pipeline_call_kwargs(pipeline, steps=None, guidance=None, resolution=None) -> dict:
    """The keyword arguments for ``pipeline(...)``, refusing settings the pipeline does not take."""
    accepted = inspect.signature(pipeline.__call__).parameters
    wanted = {"num_inference_steps": steps, "guidance_scale": guidance, "height": resolution, "width": resolution}
    kwargs = {}
    for name, value in wanted.items():
        if value is None:
            continue
        if name not in accepted:
            raise ValueError(f"{type(pipeline).__name__} takes no '{name}' argument")
        kwargs[name] = value
    return kwargs


def _denoiser(pipeline):
    for name in ("unet", "transformer", "prior"):
        module = getattr(pipeline, name, None)
        if module is not None and hasattr(module, "register_forward_pre_hook"):
            return module
    return None


@contextmanager
def count_denoiser_rows(pipeline):
    """Counts the sample rows the denoiser processes: a classifier-free-guided step on B
    images runs 2B rows, so rows / images is the NFE with guidance counted twice."""
    counter = {"rows": 0}
    denoiser = _denoiser(pipeline)
    if denoiser is None:
        counter["rows"] = None
        yield counter
        return

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        if sample is not None:
            counter["rows"] += int(sample.shape[0])

    handle = denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def _to_uint8(images) -> list[np.ndarray]:
    """Pipeline output -> uint8 HxWx3, rounding as diffusers' own ``numpy_to_pil`` does."""
    if isinstance(images, np.ndarray):
        return list((images * 255).round().clip(0, 255).astype(np.uint8))
    return [np.asarray(im.convert("RGB")) for im in images]


def _save_png(array: np.ndarray, path: Path) -> None:
    partial = path.with_name(path.stem + ".partial.png")  # an interrupted write never looks finished
    Image.fromarray(array).save(partial)
    os.replace(partial, path)


@dataclass
class GenerationReport:
    total: int
    found_on_disk: int  # images on disk that match their records
    generated: int
    rejected: int = 0  # files on disk that did not match their records (truncated, unreadable, swapped), generated again
    seconds: float = 0.0  # pipeline time over the batches timed (the first is warm-up when there are others)
    timed_images: int = 0
    nfe: float | None = None  # denoiser rows per image, guidance counted twice

    @property
    def images_per_second(self) -> float | None:
        return self.timed_images / self.seconds if self.seconds > 0 else None

    @property
    def seconds_per_image(self) -> float | None:
        return self.seconds / self.timed_images if self.timed_images else None


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def generate_images(
    pipeline,
    captions: list[str],
    image_dir: str | Path,
    *,
    batch_size: int = 16,
    seed: int = 0,
    call_kwargs: dict | None = None,
) -> GenerationReport:
    """One PNG per caption, ``image_dir/000123.png``, skipping the ones already there and recorded.

    Image ``i`` is drawn from its own CPU ``torch.Generator`` seeded ``seed + i``,
    so it does not depend on the batch it falls in, the device, or where a
    previous run stopped: an interrupted evaluation resumes where it stopped.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    done = verified_images(image_dir, len(captions))
    pending = [i for i in range(len(captions)) if i not in done]
    rejected = sum(image_path(image_dir, i).exists() for i in pending)
    report = GenerationReport(len(captions), len(done), 0, rejected)
    batches = [pending[k : k + batch_size] for k in range(0, len(pending), batch_size)]
    rows = 0
    with count_denoiser_rows(pipeline) as counter, tqdm(total=len(pending), desc="generate", unit="img") as bar:
        for number, batch in enumerate(batches):
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in batch]
            _synchronize()
            started = time.perf_counter()
            output = pipeline(
                prompt=[captions[i] for i in batch], generator=generators, output_type="np", **(call_kwargs or {})
            )
            _synchronize()
            elapsed = time.perf_counter() - started
            if number > 0 or len(batches) == 1:  # the first of several batches pays warm-up costs
                report.seconds += elapsed
                report.timed_images += len(batch)
            for i, array in zip(batch, _to_uint8(output.images)):
                _save_png(array, image_path(image_dir, i))
            _record_images(image_dir, [image_path(image_dir, i) for i in batch])  # after the files: a record vouches for one
            report.generated += len(batch)
            bar.update(len(batch))
        rows = counter["rows"]
    if rows is not None and report.generated:
        report.nfe = rows / report.generated
    return report
