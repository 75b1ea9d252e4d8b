"""Teachers shipped inside the package, loaded as ``teacher: zoo:NAME``."""

from __future__ import annotations

from pathlib import Path

ZOO_ROOT = Path(__file__).parent / "weights"
# The zoo's recipes are data in the repository's recipes/ folder (a clone or an editable install).
ZOO_RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "zoo"


def digits_methods() -> list[str]:
    """The methods with a one-step recipe on zoo:digits (``recipes/zoo/digits_METHOD.yaml``)."""
    return sorted(p.stem.removeprefix("digits_") for p in ZOO_RECIPES.glob("digits_*.yaml") if p.stem != "digits_teacher")


def zoo_path(name: str) -> Path:
    path = ZOO_ROOT / name
    if not (path / "model_index.json").is_file():
        available = sorted(p.name for p in ZOO_ROOT.iterdir() if p.is_dir()) if ZOO_ROOT.is_dir() else []
        raise FileNotFoundError(
            f"zoo teacher {name!r} is not shipped in this install (available: {', '.join(available) or 'none'}); "
            f"`diffdistill zoo train-{name}` builds it"
        )
    return path
