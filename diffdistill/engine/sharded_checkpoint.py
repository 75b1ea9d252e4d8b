"""Sharded state on disk for ``parallel: fsdp``: every process writes its own shards; none gathers.

Written with PyTorch's distributed checkpoint (DCP) through its Hugging Face storage: a state dict
(a net's, an EMA's, an optimizer's flattened tensors) becomes a folder with one safetensors file
per process (``shard-00001-model-00001-of-00001.safetensors`` for rank 0, ``shard-00002-...``
for rank 1), each holding that process's slice of every tensor, with the slice's offset in the
whole tensor in the file's JSON header. A tensor every
process holds whole (Adam's ``step``, a buffer) is written once, by one of them.

Nothing is pickled. DCP's default ``FileSystemWriter`` keeps its index in a pickled ``.metadata``
file; ``HuggingFaceStorageReader`` instead rebuilds the index from the safetensors headers, so a
folder reads back onto any number of processes (DCP reslices it for the reader's shards), or
onto one process without a process group, as whole tensors.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter

from diffdistill.engine.manifest import file_entries


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns whenever it runs without a process group; one process reading alone is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def hash_shards_together(folder: Path) -> dict:
    """Every process hashes its share (by sorted position) of the shard files in ``folder``'s
    subfolders; all get the merged manifest entries. A collective: a multi-GB sharded checkpoint is
    read once, spread over the processes, instead of entirely by the main one."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.parent != folder)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = file_entries(folder, files[rank::world])
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: entry for part in parts for name, entry in part.items()}


def write_shards(folder: Path, tensors: dict) -> None:
    """Every process writes its part of ``tensors`` (of a DTensor, its own shard) into ``folder``.
    A collective: every process calls it with the same keys, in the same order."""
    writer = HuggingFaceStorageWriter(str(folder), save_distributed=True)
    with _single_process_is_intended():
        dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())


def saved_layout(folder: Path) -> dict:
    """Each saved tensor's whole size and dtype, ``{key: (torch.Size, dtype)}``, from the headers."""
    saved = HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    return {key: (meta.size, meta.properties.dtype) for key, meta in saved.items()}


def read_shards(folder: Path, targets: dict, collective: bool = True) -> dict:
    """Fills ``targets`` in place and returns it: a DTensor gets the part its process holds, a plain
    tensor the whole tensor, stitched from every process's file. With ``collective`` (and a process
    group) every process must call it in the same order; without, one process reads for itself."""
    saved = set(saved_layout(folder))
    if saved != set(targets):
        raise ValueError(f"{folder} does not match the live state: saved only {sorted(saved - set(targets))[:3]}, "
                         f"missing {sorted(set(targets) - saved)[:3]}")
    reader = HuggingFaceStorageReader(str(folder))
    with _single_process_is_intended():
        dcp.load(targets, storage_reader=reader, no_dist=not (collective and dist.is_initialized()))
    return targets


def read_whole(folder: Path) -> dict:
    """Every tensor in ``folder`` whole, in host memory, read by this process alone (export)."""
    targets = {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in saved_layout(folder).items()}
    return read_shards(folder, targets, collective=False)


def optimizer_params(optimizer: torch.optim.Optimizer, keys) -> dict:
    """For each optimizer state key ``"<param index>.<name>"``, the parameter it belongs to."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {key: params[int(key.split(".", 1)[0])] for key in keys}


def optimizer_targets(optimizer: torch.optim.Optimizer, layout: dict) -> dict:
    """Tensors to read an optimizer's saved state (``layout``: key -> (size, dtype)) into, since a
    fresh optimizer holds none yet: a moment shaped like its parameter is split as the parameter
    is (a DTensor under FSDP, a plain tensor otherwise); anything else (Adam's step) is read whole."""
    targets = {}
    for key, param in optimizer_params(optimizer, layout).items():
        size, dtype = layout[key]
        if tuple(size) == tuple(param.shape):
            targets[key] = torch.zeros_like(param, dtype=dtype, requires_grad=False)
        else:
            targets[key] = torch.empty(size, dtype=dtype)
    return targets


__all__ = ["barrier", "is_main_process", "optimizer_params", "optimizer_targets", "read_shards", "read_whole", "saved_layout", "write_shards"]
