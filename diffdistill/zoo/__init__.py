"""Teachers shipped inside the package, loaded as ``teacher: zoo:NAME``."""

from __future__ import annotations

from pathlib import Path

ZOO_ROOT = Path(__file__).parent / "weights"


def zoo_path(name: str) -> Path:
    path = ZOO_ROOT / name
    if not (path / "model_index.json").is_file():
        available = sorted(p.name for p in ZOO_ROOT.iterdir() if p.is_dir()) if ZOO_ROOT.is_dir() else []
        raise FileNotFoundError(
            f"zoo teacher {name!r} is not shipped in this install (available: {', '.join(available) or 'none'}); "
            f"`diffdistill zoo train-{name}` builds it"
        )
    return path
