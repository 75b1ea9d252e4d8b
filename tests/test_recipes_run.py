"""Every shipped recipe runs each of its phases on a tiny model of its family: the teacher swapped for tiny:flux
(recipes/flux), tiny:sd3 (recipes/sd3: flow-unit timesteps need a flow teacher) or tiny:unet (the rest)."""

import json
import math
from pathlib import Path

import pytest

from diffdistill.config import load_recipe
from diffdistill.run import build_trainer

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)  # recipes/accelerate: launch configs
# Tiny stand-ins for what a real-size recipe points at.
TINY = ["batch_size=2", "max_steps=2", "checkpoint_every=1000", "sample_every=0", "mixed_precision=no", "log_every=1",
        "data.prompts_file=null", "data.prompts=[a digit 1, the number seven]"]
# recipes/<family>/: its tiny teacher, at that teacher's own size (a real-size data.resolution would make it train at 1024 px)
FAMILIES = {"flux": ["teacher=tiny:flux", "data.resolution=16"], "sd3": ["teacher=tiny:sd3", "data.resolution=16"]}


def tiny_overrides(recipe: Path, tmp_path: Path) -> list[str]:
    cfg = load_recipe(recipe)
    extra = []
    if cfg.data.source in ("imagefolder", "webdataset", "hf_dataset", "latents"):
        extra.append("data.source=digits")
    method = cfg.method
    if "regression_pairs" in method:
        extra += ["method.regression_pairs=4", "method.regression_steps=2"]
    if "pairs" in method:
        extra += ["method.pairs=4", "method.ode_steps=2"]
    if "teacher_samples" in method:  # LADD's pool of teacher samples
        extra += ["method.teacher_samples=4", "method.teacher_steps=2"]
    # every phase within a few steps: one critic update per generator update, and no sCM-only warm-up
    extra += ["method.ratio=1"] * ("ratio" in method) + ["method.dmd_warmup=1"] * ("dmd_warmup" in method)
    family = FAMILIES.get(recipe.parent.name, ["teacher=tiny:unet"])
    return [*TINY, *family, *extra, f"out={tmp_path}"]


def steps_for_every_phase(method, limit: int = 16) -> int:
    for steps in range(1, limit):
        if {method.phase(s) for s in range(steps)} >= set(method.phases):
            return steps
    raise AssertionError(f"phases {method.phases} not all reached in {limit} steps")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_recipe_runs_every_phase_on_a_tiny_model(recipe, tmp_path):
    trainer = build_trainer(load_recipe(recipe, tiny_overrides(recipe, tmp_path)))
    trainer.cfg.max_steps = steps_for_every_phase(trainer.method)
    run = trainer.fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for phase in trainer.method.phases:  # each phase ran and logged a finite loss
        losses = [row[f"loss_{phase}"] for row in rows if row["phase"] == phase]
        assert losses and all(math.isfinite(v) for v in losses), (phase, rows)
    assert (run / "checkpoints" / "latest").is_file()
