"""Latents encoded once, read many times: ``diffdistill encode-latents`` and ``data.source: latents``.

A recipe with real images (a GAN term on real data, sft) otherwise decodes and VAE-encodes its
whole image set when a run starts. ``encode-latents`` runs the teacher's VAE over it once, a
chunk at a time, and writes shards: ``shard-NNNNN.safetensors`` holding ``latents`` (N, C, h, w)
with the chunk's captions in the file's metadata, and ``index.json`` (shard files and counts,
latent shape, the teacher and resolution they were encoded with), written last. Training then
reads the latents of each batch from the shards (memory-mapped by safetensors), so memory holds
the captions, not the image set. The order of items is the data source's, a function of
(seed, step), so resume and any number of processes see the same items as with the images.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "index.json"
FORMAT = "diffdistill-latents/1"


def write_latent_shards(out: Path, prompts: list[str], chunks, info: dict, shard_size: int) -> Path:
    """Writes ``chunks`` (an iterable of latent batches, in the order of ``prompts``) as shards of
    ``shard_size`` items into ``out``, atomically: a temporary folder renamed into place when complete."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; encode-latents writes a new folder (remove it or choose another --to)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, pending, written = [], [], 0

    def flush(latents: torch.Tensor) -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        captions = prompts[written - len(latents) : written]
        save_file({"latents": latents.contiguous()}, str(tmp / name), metadata={"prompts": json.dumps(captions)})
        shards.append({"file": name, "count": len(latents)})

    for chunk in chunks:
        pending.append(chunk.float().cpu())
        while sum(len(p) for p in pending) >= shard_size:
            joined = torch.cat(pending)
            written += shard_size
            flush(joined[:shard_size])
            pending = [joined[shard_size:]] if len(joined) > shard_size else []
    if pending and (rest := torch.cat(pending)).numel():
        written += len(rest)
        flush(rest)
    if written != len(prompts):
        raise ValueError(f"encoded {written} latents for {len(prompts)} captions")
    first = safe_open(str(tmp / shards[0]["file"]), "pt").get_slice("latents").get_shape()
    (tmp / INDEX).write_text(json.dumps({"format": FORMAT, "count": written, "latent_shape": first[1:], "shards": shards, **info}, indent=1))
    os.replace(tmp, out)
    return out


class LatentShards:
    """The latents of a shard folder, indexed like a tensor (``shards[index]``), read on demand."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index_file = self.folder / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"data.path={str(self.folder)!r} has no {INDEX}: write it with `diffdistill encode-latents RECIPE --to DIR`")
        self.index = json.loads(index_file.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_file} is not a diffdistill latent index ({FORMAT})")
        self.starts = [0]
        for shard in self.index["shards"]:
            self.starts.append(self.starts[-1] + shard["count"])
        self._files = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def prompts(self) -> list[str]:
        prompts = []
        for shard in self.index["shards"]:
            with safe_open(str(self.folder / shard["file"]), "pt") as f:
                prompts += json.loads(f.metadata()["prompts"])
        return prompts

    def _file(self, shard: int):
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.folder / self.index["shards"][shard]["file"]), "pt")
        return self._files[shard]

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in index.tolist():
            shard = bisect.bisect_right(self.starts, i) - 1
            offset = i - self.starts[shard]
            rows.append(self._file(shard).get_slice("latents")[offset : offset + 1])
        return torch.cat(rows)


__all__ = ["LatentShards", "write_latent_shards"]
