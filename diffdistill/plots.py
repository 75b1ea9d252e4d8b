"""Figures people read without the code beside them, drawn with matplotlib (Agg: files only, no display).

* :func:`loss_figure`: each logged loss on its own panel, raw values faint and a moving average
  over them, with axes, units and a legend;
* :func:`quality_figure`: in-training quality metrics against step and against wall time, the
  teacher's value as a dashed line;
* :func:`labelled_grid`: image rows with their labels (e.g. teacher / start / student, with steps
  and latency) and columns headed by their prompts.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: render to files on machines without a display
import matplotlib.pyplot as plt
import torch


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and up to ``window - 1`` before it (same length as ``values``)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def loss_figure(rows: list[dict], path: Path, keys: tuple[str, ...] | None = None) -> Path | None:
    """One panel per loss (``loss_*`` keys of metrics.jsonl rows, or ``keys``) against the step."""
    keys = keys or tuple(sorted({k for row in rows for k in row if k.startswith("loss_")}))
    series = {k: [(row["step"], row[k]) for row in rows if isinstance(row.get(k), (int, float))] for k in keys}
    series = {k: v for k, v in series.items() if len(v) > 1}
    if not series:
        return None
    figure, axes = plt.subplots(len(series), 1, figsize=(7, 2.6 * len(series)), sharex=True, squeeze=False)
    for ax, (name, points) in zip(axes[:, 0], series.items()):
        steps, values = zip(*points)
        window = max(1, len(values) // 25)
        if window == 1:  # too few points to smooth
            ax.plot(steps, values, color="tab:blue", linewidth=1.5, label="logged")
        else:
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="logged")
            ax.plot(steps, moving_average(list(values), window), color="tab:blue", linewidth=1.8, label=f"mean of {window} logs")
        ax.set_ylabel(name.removeprefix("loss_") + " loss")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("training step")
    figure.suptitle("training losses")
    return _save(figure, path)


def quality_figure(rows: list[dict], path: Path, metric: str, reference: dict[str, float]) -> Path | None:
    """A row of two panels per metric (``metric`` first): against the step and against wall minutes
    (``train_seconds``), with the teacher's value (``reference``) as a dashed line."""
    keys = [metric] + sorted({k for row in rows for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                             - {metric, "step", "train_seconds"})
    keys = [k for k in keys if any(isinstance(row.get(k), (int, float)) for row in rows)]
    if not rows or not keys:
        return None
    figure, axes = plt.subplots(len(keys), 2, figsize=(9, 2.6 * len(keys)), squeeze=False)
    for r, key in enumerate(keys):
        points = [(row["step"], row.get("train_seconds", float("nan")) / 60, row[key]) for row in rows if isinstance(row.get(key), (int, float))]
        steps, minutes, values = zip(*points)
        for ax, xs, label in ((axes[r, 0], steps, "training step"), (axes[r, 1], minutes, "wall time (minutes)")):
            ax.plot(xs, values, marker="o", markersize=3, color="tab:blue", label="student")
            if key in reference:
                ax.axhline(reference[key], color="tab:red", linestyle="--", linewidth=1.2, label=f"teacher {reference[key]:.4g}")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize="small")
            if r == len(keys) - 1:
                ax.set_xlabel(label)
    figure.suptitle(f"quality during training ({metric})")
    return _save(figure, path)


def labelled_grid(rows: dict[str, torch.Tensor], columns: list[str], path: Path) -> Path:
    """``rows``: label -> images in [0, 1], (N, 3, H, W), one per column; ``columns``: their headings."""
    count = len(columns)
    figure, axes = plt.subplots(len(rows), count, figsize=(1.3 * count + 1.2, 1.45 * len(rows) + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(count):
            ax = axes[r, c]
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["labelled_grid", "loss_figure", "moving_average", "quality_figure"]
