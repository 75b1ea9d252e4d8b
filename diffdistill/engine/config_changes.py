"""What a resume may change: the saved config against the new one, key by key (dotted keys).

Keys that define the run (FIXED: the teacher, the method and its options, batch and accumulation,
seed, data, EMA decay, optimizer kind, precision) cannot change mid-run: a resume that changes them
is refused with every difference listed. Everything else (learning rates, max_steps upwards,
cadences, time limit, memory and parallel layout, which resume on any process count) is applied,
printed once per change and appended to ``config-history.jsonl`` in the run folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from diffdistill.config import ConfigError

# mixed_precision: fp16's loss-scaler state is not saved, and a run whose numerics change midway is
# not the run its metrics describe; start a new run (resume=false or another out=) instead.
FIXED = ("teacher", "teacher_config", "teacher_dtype", "method", "data", "batch_size", "grad_accum", "seed",
         "ema_decay", "optimizer", "mixed_precision")
HISTORY = "config-history.jsonl"
_UNSET = "(unset)"


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``; lists stay values."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def differences(saved: dict, new: dict) -> dict:
    """``{dotted key: (old, new)}`` for every key whose value differs (a key absent on one side: ``(unset)``)."""
    old, now = flatten(saved), flatten(new)
    keys = sorted(set(old) | set(now))
    return {k: (old.get(k, _UNSET), now.get(k, _UNSET)) for k in keys if old.get(k, _UNSET) != now.get(k, _UNSET)}


def _is_fixed(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FIXED)


def check_resume(saved: dict, new: dict, step: int, checkpoint: Path) -> dict:
    """The changes a resume from ``checkpoint`` (at ``step``) applies; raises ConfigError listing
    every change it cannot apply."""
    changes = differences(saved, new)
    refused = [f"{k}: {old!r} -> {now!r}" for k, (old, now) in changes.items() if _is_fixed(k)]
    if refused:
        raise ConfigError(f"cannot resume {checkpoint} with a different run: {'; '.join(refused)}. "
                          "Set these back, or start a new run with resume=false (the old checkpoints are moved aside) or another out=")
    if new["max_steps"] < step:
        raise ConfigError(f"max_steps={new['max_steps']} is below step {step} of the checkpoint {checkpoint}; "
                          f"set max_steps >= {step}, or start a new run with resume=false or another out=")
    return changes


def record_changes(run_dir: Path, step: int, changes: dict) -> None:
    """Prints each applied change once and appends them to the run folder's history."""
    if not changes:
        return
    for key, (old, now) in changes.items():
        print(f"{key} changed: {old} -> {now}")
    row = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": {k: [o, n] for k, (o, n) in changes.items()}}
    with open(Path(run_dir) / HISTORY, "a") as f:
        f.write(json.dumps(row) + "\n")


__all__ = ["FIXED", "HISTORY", "check_resume", "differences", "flatten", "record_changes"]
