"""DMD2's regression warm-up (its one-step SDXL start): generator-only steps regressing on teacher ODE pairs, then TTUR."""

import json
from pathlib import Path

import pytest
import torch

from diffdistill.config import load_recipe
from diffdistill.methods.dmd import regression_loss
from diffdistill.run import build_trainer

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "dmd2.yaml"


def test_warmup_steps_regress_only_then_the_two_time_scale_rule_takes_over(tmp_path):
    settings = [f"out={tmp_path}", "method.ratio=2", "method.regression_warmup=3", "method.regression_pairs=16", "method.regression_steps=4",
                "optim.lr=1e-4", "optim.warmup_steps=0", "sample_every=0", "log_every=1"]
    trainer = build_trainer(load_recipe(RECIPE, [*settings, "max_steps=3"]))
    method = trainer.method
    assert [method.phase(s) for s in range(9)] == ["generator"] * 3 + ["critic", "critic", "generator"] * 2
    rng = torch.Generator().manual_seed(0)
    noise_rng = type("R", (), {"randint": lambda self, lo, hi, size: torch.randint(lo, hi, size, generator=rng), "device": "cpu"})()
    def pair_error():
        with torch.no_grad():
            return float(regression_loss(method.nets["generator"], method.pairs, method.timesteps[0], noise_rng, 16).mean())
    before = pair_error()
    trainer.fit()
    assert pair_error() < 0.85 * before  # the warm-up moved the student toward the teacher's ODE endpoints
    build_trainer(load_recipe(RECIPE, [*settings, "max_steps=9"])).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_reg" in r and "loss_dm" not in r for r in rows[:3])
    assert all("loss_dm" in r for r in rows[3:] if r["phase"] == "generator") and rows[5]["phase"] == "generator"


def test_warmup_of_a_few_step_student_is_refused(tmp_path):
    with pytest.raises(ValueError, match="regression_warmup regresses a one-step student"):
        build_trainer(load_recipe(RECIPE, [f"out={tmp_path}", "method.regression_warmup=2", "method.timesteps=[999,499]"]))
