"""Every shipped recipe runs two steps on a tiny model (the teacher swapped for tiny:unet)."""

from pathlib import Path

import pytest

from diffdistill.config import load_recipe
from diffdistill.run import train

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)  # recipes/accelerate: launch configs
# Tiny stand-ins for what a real-size recipe points at.
TINY = ["teacher=tiny:unet", "batch_size=2", "max_steps=2", "checkpoint_every=1000", "sample_every=0", "mixed_precision=no",
        "data.prompts_file=null", "data.prompts=[a digit 1, the number seven]"]


def tiny_overrides(recipe: Path, tmp_path: Path) -> list[str]:
    cfg = load_recipe(recipe)
    extra = []
    if cfg.data.source == "imagefolder":
        extra.append("data.source=digits")
    method = cfg.method
    if "regression_pairs" in method:
        extra += ["method.regression_pairs=4", "method.regression_steps=2"]
    if "pairs" in method:
        extra += ["method.pairs=4", "method.ode_steps=2"]
    return [*TINY, *extra, f"out={tmp_path}"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_runs_two_steps_on_a_tiny_model(recipe, tmp_path):
    run = train(load_recipe(recipe, tiny_overrides(recipe, tmp_path)))
    metrics = (run / "metrics.jsonl").read_text().splitlines()
    assert metrics, "no step was logged"
    assert (run / "checkpoints" / "latest").is_file()
