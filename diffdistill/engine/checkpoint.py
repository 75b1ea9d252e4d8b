"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is written into a hidden temporary folder, its files fsynced and listed with their
sizes and sha256 in a manifest written last (:mod:`.manifest`), then the folder is renamed into
place and the parent fsynced; only then is the ``latest`` pointer replaced (also by rename). A
crash mid-write leaves at most a stray temporary folder. ``latest`` is a hint for readers; resume
trusts only complete checkpoints (a manifest) that verify, newest step first (:func:`resume_checkpoint`). Optimizer states are flattened to
``"<param index>.<name>"`` tensors plus their JSON ``param_groups``.

Two layouts of the same keys. Unsharded (one process, DDP): the main process writes each state
dict as one file, ``net-generator.safetensors``. Sharded (``parallel: fsdp``): every process writes
its own shards into a folder, ``net-generator/`` (see :mod:`.sharded_checkpoint`), and the main
process renames the checkpoint into place once all have finished. Either layout loads onto any
number of processes, sharded or not; :func:`read_state` reads either whole on one process.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffdistill.engine.manifest import MANIFEST, fsync_dir, verify, write_manifest
from diffdistill.engine.sharded_checkpoint import (
    barrier,
    hash_shards_together,
    is_main_process,
    optimizer_params,
    optimizer_targets,
    read_shards,
    read_whole,
    saved_layout,
    write_shards,
)
from diffdistill.engine.sharding import shard_like

LATEST = "latest"
BEST = "best"  # the checkpoint of the best in-training quality metric (eval_every)
_STEP_NAME = re.compile(r"step-(\d+)")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _save_tensors(path: Path, tensors: dict) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict, dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    return tensors, {"python": [version, list(state), gauss]}


def restore_rng(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))


def save_checkpoint(run_dir: Path, step: int, nets: dict, emas: dict, optimizers: dict, state: dict, keep: int = 2,
                    sharded: bool = False, best: bool = False) -> Path:
    """Writes checkpoints/step-XXXXXXXX atomically, points ``latest`` (and, if ``best``, ``best``) at
    it, prunes old ones. Unsharded, the main process alone calls it; ``sharded``, every process does (a collective)."""
    root = Path(run_dir) / "checkpoints"
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}"
    main = is_main_process() if sharded else True
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier write of this step
        tmp.mkdir()
    if sharded:
        barrier()  # the fresh folder exists before any process writes into it
        for stem, tensors in _state_dicts(nets, emas, optimizers):  # each process its shards: a folder each, a file per process
            write_shards(tmp / stem, tensors)
    else:
        for stem, tensors in _state_dicts(nets, emas, optimizers):
            _save_tensors(tmp / f"{stem}.safetensors", tensors)
    if main:
        for key, optimizer in optimizers.items():
            _write_json(tmp / f"optim-{key}.json", optimizer_to_flat(optimizer)[1])
        tensors, meta = rng_state()
        _save_tensors(tmp / "rng.safetensors", tensors)
        _write_json(tmp / "state.json", {**state, "step": step, "rng": meta})
    hashed = None
    if sharded:
        barrier()  # every process's shards are on disk before the manifest lists them
        hashed = hash_shards_together(tmp)
    if main:
        write_manifest(tmp, hashed)  # last: its presence is what makes the checkpoint complete
        _publish(root, tmp, name, keep, best)
    if sharded:
        barrier()  # no process goes on (or resumes) before ``latest`` names the new checkpoint
    return root / name


def _state_dicts(nets: dict, emas: dict, optimizers: dict):
    """(file stem, tensors) of every state dict a checkpoint holds: each net, EMA and optimizer."""
    yield from ((f"net-{key}", module.state_dict()) for key, module in nets.items())
    yield from ((f"ema-{key}", ema.state_dict()) for key, ema in emas.items())
    yield from ((f"optim-{key}", optimizer_to_flat(optimizer)[0]) for key, optimizer in optimizers.items())


def _publish(root: Path, tmp: Path, name: str, keep: int, best: bool = False) -> None:
    """Renames the finished folder into place, then points ``latest`` (and ``best``) at it, then prunes."""
    final = root / name
    shutil.rmtree(final, ignore_errors=True)  # only ever an unfinished folder: resume moved later complete ones aside
    os.replace(tmp, final)
    fsync_dir(root)
    for pointer in (LATEST, BEST) if best else (LATEST,):
        _point(root, pointer, name)
    prune(root, keep, written=name)


def _point(root: Path, pointer: str, name: str) -> None:
    """``root/pointer`` names ``name``, replaced atomically (written beside it, fsynced, renamed)."""
    tmp = root / f".tmp-{pointer}"
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / pointer)
    fsync_dir(root)


def checkpoint_step(path: Path) -> int | None:
    match = _STEP_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: Path) -> list[Path]:
    """``step-*`` folders holding a manifest (or, from before manifests, a state.json), oldest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None
             and ((p / MANIFEST).is_file() or (p / "state.json").is_file())]
    return sorted(found, key=checkpoint_step)


def prune(root: Path, keep: int, written: str) -> None:
    """Keeps the checkpoint just ``written``, the one ``best`` names, and the ``keep - 1`` others of
    highest step; deletes the rest of the complete ones. (A run restarted in an old folder writes
    lower steps than those.)"""
    if keep <= 0:
        return
    best = _pointed(root, BEST)
    others = [p for p in complete_checkpoints(root) if p.name not in (written, best)]
    for old in others[:max(0, len(others) - (keep - 1))]:
        os.replace(old, root / f".pruned-{old.name}")  # first out of sight: a kill mid-delete leaves no half checkpoint named step-*
    for leftover in root.glob(".pruned-step-*"):  # this prune's, and any a killed run left
        shutil.rmtree(leftover, ignore_errors=True)


def _pointed(root: Path, pointer: str) -> str | None:
    path = root / pointer
    return path.read_text().strip() if path.is_file() else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint ``best`` names (the run's best quality metric, see ``eval_every``), else None."""
    root = Path(run_dir) / "checkpoints"
    name = _pointed(root, BEST)
    named = root / name if name else None
    return named if named in complete_checkpoints(root) else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the complete one of highest step."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in complete_checkpoints(root):
            return named
    complete = complete_checkpoints(root)
    return complete[-1] if complete else None


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of highest step whose files match its manifest. A damaged one is
    reported in one line and renamed aside (``damaged-step-*``, never deleted); the next is tried."""
    for path in reversed(complete_checkpoints(Path(run_dir) / "checkpoints")):
        problem = verify(path)
        if problem is None:
            return path
        aside = _free_name(path.parent / f"damaged-{path.name}")
        os.replace(path, aside)
        print(f"warning: checkpoint {path} is damaged ({problem}); moved it to {aside.name} and trying the previous one", file=sys.stderr)
    return None


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate


def saved_state(checkpoint: Path, name: str) -> Path | None:
    """Where state dict ``name`` (``net-generator``, ``ema-generator``, ...) lies in a checkpoint:
    its file (unsharded) or its folder of shards (sharded); None if the checkpoint has neither."""
    for path in (checkpoint / f"{name}.safetensors", checkpoint / name):
        if path.exists():
            return path
    return None


def read_state(path: Path) -> dict:
    """A saved state dict (a :func:`saved_state` path of either layout) as whole tensors, on one process."""
    return read_whole(path) if path.is_dir() else load_file(str(path))


def _read_into(checkpoint: Path, name: str, live: dict) -> dict:
    """State dict ``name`` laid out as ``live`` is: a sharded checkpoint is read straight into
    ``live``'s tensors (each process reads only its shards); an unsharded one is read whole by
    every process, and under FSDP split as ``live`` is."""
    folder = checkpoint / name
    if folder.is_dir():
        return read_shards(folder, live)
    return {k: shard_like(v, live.get(k)) for k, v in load_file(str(checkpoint / f"{name}.safetensors")).items()}


def _read_optimizer(checkpoint: Path, name: str, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer's saved ``"<param index>.<name>"`` tensors, laid out as its parameters are."""
    folder = checkpoint / name
    if folder.is_dir():
        return read_shards(folder, optimizer_targets(optimizer, saved_layout(folder)))
    whole = load_file(str(checkpoint / f"{name}.safetensors"))
    params = optimizer_params(optimizer, whole)
    return {k: shard_like(v, params[k]) if v.shape == params[k].shape else v for k, v in whole.items()}


def load_checkpoint(path: Path, nets: dict, emas: dict, optimizers: dict) -> dict:
    """Restores modules, EMAs, optimizers and RNG in place; returns the saved ``state.json``.
    Every process calls it; it reads either layout, written by any number of processes."""
    path = Path(path)
    for key, module in nets.items():
        module.load_state_dict(_read_into(path, f"net-{key}", module.state_dict()))
    for key, ema in emas.items():
        ema.load_state_dict(_read_into(path, f"ema-{key}", ema.state_dict()))
    for key, optimizer in optimizers.items():
        meta = json.loads((path / f"optim-{key}.json").read_text())
        optimizer_from_flat(optimizer, _read_optimizer(path, f"optim-{key}", optimizer), meta)
    state = json.loads((path / "state.json").read_text())
    restore_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    return state
