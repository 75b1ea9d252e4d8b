"""Atomic, pickle-free checkpoints: safetensors for tensors, JSON for everything else.

A checkpoint is written into a hidden temporary folder and renamed into place; only then is the
``latest`` pointer replaced (also by rename). A crash mid-write leaves at most a stray temporary
folder, never a half checkpoint named as the latest. Optimizer states are flattened to
``"<param index>.<name>"`` tensors plus their JSON ``param_groups``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


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


def save_checkpoint(run_dir: Path, step: int, nets: dict, emas: dict, optimizers: dict, state: dict, keep: int = 2) -> Path:
    """Writes checkpoints/step-XXXXXXXX atomically, points ``latest`` at it, prunes old ones."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for key, module in nets.items():
        _save_tensors(tmp / f"net-{key}.safetensors", module.state_dict())
    for key, ema in emas.items():
        _save_tensors(tmp / f"ema-{key}.safetensors", ema.state_dict())
    for key, optimizer in optimizers.items():
        tensors, meta = optimizer_to_flat(optimizer)
        _save_tensors(tmp / f"optim-{key}.safetensors", tensors)
        _write_json(tmp / f"optim-{key}.json", meta)
    tensors, meta = rng_state()
    _save_tensors(tmp / "rng.safetensors", tensors)
    _write_json(tmp / "state.json", {**state, "step": step, "rng": meta})
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / f".tmp-{LATEST}"
    pointer.write_text(name)
    os.replace(pointer, root / LATEST)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, nets: dict, emas: dict, optimizers: dict) -> dict:
    """Restores modules, EMAs, optimizers and RNG in place; returns the saved ``state.json``."""
    path = Path(path)
    for key, module in nets.items():
        module.load_state_dict(load_file(str(path / f"net-{key}.safetensors")))
    for key, ema in emas.items():
        ema.load_state_dict(load_file(str(path / f"ema-{key}.safetensors")))
    for key, optimizer in optimizers.items():
        meta = json.loads((path / f"optim-{key}.json").read_text())
        optimizer_from_flat(optimizer, load_file(str(path / f"optim-{key}.safetensors")), meta)
    state = json.loads((path / "state.json").read_text())
    restore_rng(load_file(str(path / "rng.safetensors")), state["rng"])
    return state
