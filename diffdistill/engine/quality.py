"""Quality during training (``eval_every``): what the trainer asks of an evaluator, and what it keeps.

The trainer samples the generator (its EMA when the run keeps one) on the evaluator's fixed prompts
from fixed noise; the evaluator scores the samples. Which metric depends on the data, so evaluators
live with their data, above the engine: the digit judge (:mod:`diffdistill.zoo.quality`), FID and
CLIP score on a caption subset (:mod:`diffdistill.eval.in_training`), energy distance on the 2-D
toy (:mod:`diffdistill.toy`). :func:`diffdistill.quality.evaluator_for` picks one for a recipe.

The run folder keeps the rows in ``metrics.jsonl`` (``"phase": "eval"``), the teacher's values in
``quality-reference.json`` (computed once a run), the curve ``quality.png``, and ``checkpoints/best``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol

import torch

from diffdistill.plots import quality_figure

REFERENCE = "quality-reference.json"
CURVE = "quality.png"


class Evaluator(Protocol):
    metric: str                  # the key of the returned metrics that ranks checkpoints (``best``)
    lower_is_better: bool
    prompts: list[str]           # sampled each evaluation from the same noise

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        """Metrics of ``samples``: images in [-1, 1] (N, C, H, W), or data points for a pipeline-less teacher."""

    def reference(self) -> dict[str, float]:
        """The teacher's values of the same metrics, drawn as lines on the curve ({} when there are none)."""


def improves(value: float, best: float | None, lower_is_better: bool) -> bool:
    if best is None:
        return True
    return value < best if lower_is_better else value > best


def teacher_reference(run_dir: Path, evaluator: Evaluator) -> dict[str, float]:
    """The evaluator's teacher values, computed once and kept in the run folder (a resume reads them)."""
    path = Path(run_dir) / REFERENCE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("metric") == evaluator.metric and saved.get("num_prompts") == len(evaluator.prompts):
            return saved["values"]
    values = evaluator.reference()
    tmp = path.with_name(f".{REFERENCE}.tmp")
    tmp.write_text(json.dumps({"metric": evaluator.metric, "num_prompts": len(evaluator.prompts), "values": values}, indent=2))
    os.replace(tmp, path)
    return values


def eval_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("phase") == "eval"]


def save_quality_curve(run_dir: Path, evaluator: Evaluator, reference: dict) -> Path | None:
    """``quality.png``: the ranking metric (and the others logged) against step and against wall time."""
    return quality_figure(eval_rows(run_dir), Path(run_dir) / CURVE, evaluator.metric, reference)


def summary(step: int, metrics: dict, metric: str, best: tuple[int, float] | None, reference: dict) -> str:
    """One line for the progress bar's log: the metric now, the best so far, the teacher's."""
    line = f"eval at step {step}: {metric} {metrics[metric]:.4g}"
    if best is not None:
        line += f" (best {best[1]:.4g} at step {best[0]})"
    if metric in reference:
        line += f"; teacher {reference[metric]:.4g}"
    return line


__all__ = ["CURVE", "REFERENCE", "Evaluator", "eval_rows", "improves", "save_quality_curve", "summary", "teacher_reference"]
