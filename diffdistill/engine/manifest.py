"""What makes a checkpoint complete: a manifest of its files, sizes and sha256, written last.

The manifest is written inside the temporary folder after every other file is on disk (and
fsynced), just before the folder is renamed into place. A ``step-*`` folder without one was never
finished; one whose files do not match it was damaged after it was written. sha256 because it is
the checksum every tool can recompute (``sha256sum``), and at over 1 GB/s it costs a fraction of
the write it checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def _digest_and_sync(path: Path) -> str:
    """sha256 of a file, fsynced on the way (fsync on any descriptor flushes the file's pages)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        os.fsync(f.fileno())
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Makes a folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_entries(folder: Path, files: list[Path]) -> dict:
    """``{relative name: {size, sha256}}`` of ``files`` under ``folder``, each fsynced on the way."""
    return {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _digest_and_sync(p)} for p in files}


def write_manifest(folder: Path, hashed: dict | None = None) -> None:
    """Fsyncs every file under ``folder`` and records it; the manifest itself goes last. ``hashed``:
    entries already computed (and their files fsynced) elsewhere, e.g. by the process that wrote them."""
    hashed = hashed or {}
    entries = {**hashed, **file_entries(folder, [p for p in _files(folder) if str(p.relative_to(folder)) not in hashed])}
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump({"files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for sub in sorted({p.parent for p in _files(folder)} | {folder}):
        fsync_dir(sub)


def verify(folder: Path) -> str | None:
    """None if ``folder`` holds exactly what its manifest lists, else what is wrong (the first problem).
    A folder from before manifests existed passes if its ``state.json`` parses."""
    path = folder / MANIFEST
    if not path.is_file():
        return _check_legacy(folder)
    try:
        entries = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, entry in entries.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry["size"]:
            return f"{name} has {file.stat().st_size} bytes, not {entry['size']}"
        if _digest_and_sync(file) != entry["sha256"]:
            return f"{name} does not match its sha256"
    return None


def _check_legacy(folder: Path) -> str | None:
    try:
        json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"no {MANIFEST} and no readable state.json ({e})"
    return None


__all__ = ["MANIFEST", "file_entries", "fsync_dir", "verify", "write_manifest"]
