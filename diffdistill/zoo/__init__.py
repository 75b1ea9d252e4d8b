"""Teachers shipped inside the package, loaded as ``teacher: zoo:NAME`` (resolved by :mod:`diffdistill.teachers`)."""

from __future__ import annotations

from pathlib import Path

from diffdistill.teachers import ZOO_ROOT, zoo_path

# The zoo's recipes are data in the repository's recipes/ folder (a clone or an editable install).
ZOO_RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "zoo"


def digits_methods() -> list[str]:
    """The methods with a one-step recipe on zoo:digits (``recipes/zoo/digits_METHOD.yaml``)."""
    return sorted(p.stem.removeprefix("digits_") for p in ZOO_RECIPES.glob("digits_*.yaml") if p.stem != "digits_teacher")


__all__ = ["ZOO_RECIPES", "ZOO_ROOT", "digits_methods", "zoo_path"]
