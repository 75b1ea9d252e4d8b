"""The model card (``README.md``) every export carries: what the student is, how it was made, how
well it did so far, and the exact lines that load it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from diffdistill.config import to_dict


def _metrics(run_dir: Path) -> tuple[dict | None, list[tuple[str, dict]]]:
    """The last logged training metrics, and numbers from any evaluation ``results.json`` in the run."""
    last = None
    log = run_dir / "metrics.jsonl"
    if log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else None
    results = []
    for path in sorted(run_dir.rglob("results.json"))[:5]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        numbers = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            results.append((str(path.relative_to(run_dir)), numbers))
    return last, results


def _cost(student, last: dict | None) -> str:
    cfg = student.config
    text = f"{student.step} optimizer steps of batch {cfg.batch_size} (checkpoint `{student.checkpoint.name}`)"
    if last and last.get("it_per_s"):
        # it_per_s is measured from the start of the (last resumed) process, so this is an estimate.
        text += f", about {student.step / last['it_per_s']:.0f} s of training at {last['it_per_s']:.3g} it/s"
    return text


def model_card(student, fmt: str, usage: str, notes: list[str] = (), extra: dict | None = None) -> str:
    """Markdown with a YAML header; ``usage`` is a ready-to-run Python snippet."""
    cfg = student.config
    last, results = _metrics(student.run_dir)
    header = {"library_name": "diffusers", "tags": ["diffdistill", student.method, "distillation", f"{len(student.timesteps)}-step"],
              "base_model": str(cfg.teacher)}
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {len(student.timesteps)}-step {student.method} student of `{cfg.teacher}`", "",
        f"Distilled with diffdistill ({fmt} export).", "",
        f"- **Teacher**: `{cfg.teacher}` ({type(student.teacher.backbone).__name__}, {student.teacher.prediction_type} prediction)",
        f"- **Method**: `{student.method}` with options `{json.dumps({k: v for k, v in cfg.method.items() if k != 'name'})}`",
        f"- **Student timesteps**: {[int(t) if float(t).is_integer() else t for t in student.timesteps]} ({_sampler(student)})",
        f"- **Weights**: {'EMA of the generator' if student.ema else 'the generator (no EMA)'}",
        f"- **Training cost**: {_cost(student, last)}",
        f"- **Run**: `{student.run_dir.resolve()}`; the resolved recipe is below.",
    ]
    for key, value in (extra or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", "## Use", "", "```python", usage.strip(), "```", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Metrics so far", ""]
    if last:
        lines.append(f"Last logged training step ({last.get('step')}): " + ", ".join(
            f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float)))
    for name, numbers in results:
        lines.append(f"- `{name}`: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()))
    if not last and not results:
        lines.append("None recorded yet (no metrics.jsonl or results.json in the run folder).")
    lines += ["", "## Recipe (resolved)", "", "```yaml", yaml.safe_dump(_plain(cfg), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _sampler(student) -> str:
    if getattr(student, "experts", None):
        return "expert k takes step k: it predicts x0 and steps deterministically (DDIM) to the next timestep, the last to x0"
    if getattr(student, "deterministic", False):
        return ("meanflow: each step moves z by (t - r) times the average velocity over [r, t] (a deterministic Euler/DDIM step), "
                "with h = t - r of the trained K-step sampler folded into the weights: exact for that K only")
    if getattr(student, "consistency", None):
        return "each step applies LCM's boundary condition to the predicted x0, then re-noises it with fresh noise to the next timestep"
    return "each step predicts x0, then re-noises it with fresh noise to the next timestep"


def _plain(cfg) -> dict:
    return to_dict(cfg)
