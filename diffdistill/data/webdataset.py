"""Image-caption pairs from WebDataset tar shards, read with the standard library's ``tarfile``.

A WebDataset shard is a plain tar whose files are grouped by key, the name up to its first dot:
``000123.jpg`` (or .png, .jpeg, .webp) and ``000123.txt`` (the caption; or ``.json`` with a
``"caption"`` or ``"text"`` field) are one sample. ``data.path`` names the shards: one file, a
folder, or a glob (``/data/laion/{00000..00099}.tar`` style brace ranges are not expanded: use
``/data/laion/*.tar``). Samples keep shard order (sorted paths), then tar order; the data source
shuffles per epoch from there, so the order is still a function of (seed, step). The headers are
scanned once; an image is read from its byte offset when asked for.
"""

from __future__ import annotations

import glob
import io
import json
import tarfile
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def shard_paths(spec: str | None) -> list[Path]:
    if not spec:
        raise FileNotFoundError("data.source=webdataset needs data.path: a .tar shard, a folder of them, or a glob such as /data/shards/*.tar")
    path = Path(spec)
    paths = sorted(path.glob("*.tar")) if path.is_dir() else sorted(Path(p) for p in glob.glob(spec))
    if not paths:
        raise FileNotFoundError(f"data.path={spec!r} matches no .tar shard; give a shard, a folder of them, or a glob such as /data/shards/*.tar")
    return paths


def _caption(data: bytes, suffix: str) -> str:
    text = data.decode("utf-8")
    if suffix == ".json":
        record = json.loads(text)
        return str(record.get("caption", record.get("text", "")))
    return text.strip()


class WebDatasetShards:
    """Every (image, caption) sample of the shards: ``captions`` in order, ``image(i)`` on demand."""

    def __init__(self, spec: str | None):
        self.samples, self.captions = [], []  # (shard path, offset, size) of each sample's image
        for path in shard_paths(spec):
            images, captions = {}, {}
            with tarfile.open(path) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, dot, suffix = member.name.partition(".")
                    suffix = dot + suffix.lower()
                    if suffix in IMAGE_SUFFIXES:
                        images[key] = (path, member.offset_data, member.size)
                    elif suffix in (".txt", ".json"):
                        captions[key] = _caption(tar.extractfile(member).read(), suffix)
            missing = [key for key in images if key not in captions]
            if missing:
                raise ValueError(f"{path}: {len(missing)} images have no caption (.txt or .json beside them), e.g. {missing[0]!r}")
            for key, image in images.items():  # tar order
                self.samples.append(image)
                self.captions.append(captions[key])
        if not self.samples:
            raise ValueError(f"data.path={spec!r}: the shards hold no images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, i: int) -> Image.Image:
        path, offset, size = self.samples[i]
        with open(path, "rb") as f:
            f.seek(offset)
            return Image.open(io.BytesIO(f.read(size)))


__all__ = ["WebDatasetShards", "shard_paths"]
