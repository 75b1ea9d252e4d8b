"""The compatibility matrix: every registered method on every tiny backbone family, trained and exported.

For each method (the registry in ``diffdistill.methods.base``, so a new method appears by itself) and
each family of ``diffdistill.backbones.tiny.TINY_ARCHS``, a cell builds ``recipes/tiny/<method>.yaml``
with ``teacher=tiny:<arch>``, trains until every phase of the method has run once (one generator and one
critic step), and exports the run to a diffusers folder with ``diffdistill.export.export_run``. Each
cell records whether it runs, whether it exports (or the one-line ConfigError / ExportError that refuses
it), and which tests in ``tests/`` cover that combination (the table ``TESTED`` below, kept by reading
the tests). Any other exception is a bug and is printed with its traceback's last line.

    OMP_NUM_THREADS=1 python benchmarks/compat.py                    # the whole matrix, markdown
    OMP_NUM_THREADS=1 python benchmarks/compat.py --methods dmd2 --archs sd3 flux --json compat.json

The only changes to a recipe are the ones that make a tiny run short (as tests/test_recipes_run.py
does) and the documented adjustments a family needs (:func:`family_overrides`); everything else is
the recipe as shipped.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

try:
    import diffdistill  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from diffdistill.backbones.tiny import TINY_ARCHS
from diffdistill.config import ConfigError, load_recipe
from diffdistill.export import ExportError, export_run
from diffdistill.methods.base import METHODS, _load_all
from diffdistill.run import build_trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "tiny"
FLOW_ARCHS = ("sd3", "sd35", "flux", "sana")       # rectified-flow teachers: timesteps in [0, 1]
TRANSFORMER_ARCHS = ("dit", *FLOW_ARCHS)           # no UNet time_cond_proj (cd's guidance input)
DIT_PROMPTS = ["1", "3", "7"]                      # DiT is class-conditional: its prompts are class ids
GUIDANCE_DISTILLED = ("flux",)                      # tiny:flux is FLUX.1-dev-shaped: one guidance input, no CFG pair
MATCH = 1e-4                                       # an export counts when plain diffusers reproduces the sampler to this
# What makes any tiny run short (as tests/test_recipes_run.py); the steps are set to reach every phase once.
SHORT = ["batch_size=2", "checkpoint_every=1000", "sample_every=0", "mixed_precision=no", "log_every=1", "resume=false",
         "optim.warmup_steps=0"]

RECIPES_RUN = "test_recipes_run.py::test_recipe_runs_every_phase_on_a_tiny_model"  # every recipe, its phases, tiny:unet or its family
# Which tests cover a cell, read from tests/ by hand: {(method, arch): {"run"|"export"|"refused": "test"}}.
# A "run" entry trains the method on that family; "export" writes its diffusers folder and checks it; "refused"
# checks the one-line refusal. The CI subset (tests/test_compat.py) is added by covered().
TESTED: dict[tuple[str, str], dict[str, str]] = {
    ("dmd2", "unet"): {"export": "test_export.py::test_plain_diffusers_samples_like_diffdistill"},
    ("cd", "unet"): {"export": "test_export_students.py::test_plain_diffusers_reproduces_flow_cd_and_phased_students"},
    ("phased_dmd", "unet"): {"export": "test_export_students.py::test_plain_diffusers_reproduces_flow_cd_and_phased_students"},
    ("dmd2", "dit"): {"run": "test_export.py::runs", "export": "test_export.py::test_plain_diffusers_samples_like_diffdistill"},
    ("dmd2", "sdxl"): {"run": "test_export.py::original_read_back", "export": "test_export.py::original_read_back"},
    ("dmd2", "sd3"): {"run": "test_export_students.py::runs",
                      "export": "test_export_students.py::test_plain_diffusers_reproduces_flow_cd_and_phased_students"},
    ("dmd2", "sd35"): {"run": "test_flux_sana.py::test_dmd2_generator_and_critic_steps_run"},
    ("dmd2", "flux"): {"run": "test_flux_sana.py::test_dmd2_generator_and_critic_steps_run",
                       "export": "test_export_students.py::test_plain_diffusers_reproduces_flow_cd_and_phased_students"},
    ("dmd2", "sana"): {"run": "test_flux_sana.py::test_dmd2_generator_and_critic_steps_run",
                       "export": "test_export_students.py::test_plain_diffusers_reproduces_flow_cd_and_phased_students"},
    ("rcm", "flux"): {"run": RECIPES_RUN},  # recipes/flux/rcm.yaml, on tiny:flux
    ("ladd", "flux"): {"run": RECIPES_RUN},  # recipes/flux/ladd.yaml, on tiny:flux
    ("meanflow", "unet"): {"export": "test_export_students.py::test_plain_diffusers_reproduces_flow_cd_and_phased_students"},
    ("meanflow", "sd3"): {"run": "test_export_students.py::runs",
                          "export": "test_export_students.py::test_plain_diffusers_reproduces_flow_cd_and_phased_students"},
    ("meanflow", "dit"): {"refused": "test_meanflow.py::test_a_transformer_without_one_timestep_embedder_is_a_config_error"},
}
# The cells tests/test_compat.py runs through cell() and checks against this matrix (every method on tiny:sd3).
CI_ARCHS = ("sd3",)


@dataclasses.dataclass
class Cell:
    method: str
    arch: str
    runs: str = ""                 # "yes", "refused: <ConfigError>", "bug: <last traceback line>", "no tiny recipe"
    exports: str = ""              # "yes" (the pipeline reproduces the sampler to MATCH), "refused: <ExportError>", "bug: ...",
                                   # "" when it did not run
    seconds: float = 0.0
    traceback: str = ""


def methods() -> list[str]:
    _load_all()
    return sorted(METHODS)


def flow_timesteps(timesteps: list[float]) -> list[float]:
    """A VP recipe's integer timesteps (999, 749, ...) as the same points of a flow schedule (1.0, 0.75, ...)."""
    return [round(t / 1000, 2) for t in timesteps]


def family_overrides(recipe, arch: str) -> list[str]:
    """The documented adjustments a family needs (the README's compatibility notes), nothing else."""
    method, extra = recipe.method, []
    if arch in FLOW_ARCHS and method.get("timesteps"):
        extra.append(f"method.timesteps={flow_timesteps(method['timesteps'])}")
    if method["name"] == "cd" and arch in TRANSFORMER_ARCHS:  # the LCM guidance input is a UNet's time_cond_proj:
        extra += ["method.guidance_embedding_dim=0", f"method.guidance=[{recipe.sample_guidance}]"]  # one w, baked in
    if arch == "dit" and recipe.data.source == "prompts":  # captioned data (digits) stays: DiT refuses it, with the fix
        extra.append(f"data.prompts={json.dumps(DIT_PROMPTS)}")
    if arch in GUIDANCE_DISTILLED and method.get("guidance_style", "cfg") != "cfg":  # no CFG pair to guide the fake score
        options_cls = METHODS[method["name"]][0]
        defaults = {f.name: f.default for f in dataclasses.fields(options_cls)}
        extra.append("method.guidance_style=cfg")
        extra += [f"method.{k}={json.dumps(defaults[k])}" for k in ("fake_guidance", "fake_train_guidance") if k in method]
    return extra


def short_overrides(method: dict) -> list[str]:
    """As tests/test_recipes_run.py: few regression pairs, one critic step per generator step, no warm-up phase."""
    extra = []
    if "regression_pairs" in method:
        extra += ["method.regression_pairs=4", "method.regression_steps=2"]
    if "pairs" in method:
        extra += ["method.pairs=4", "method.ode_steps=2"]
    extra += ["method.ratio=1"] * ("ratio" in method) + ["method.dmd_warmup=1"] * ("dmd_warmup" in method)
    return extra


def overrides(method_name: str, arch: str, out: Path) -> list[str]:
    recipe = load_recipe(RECIPES / f"{method_name}.yaml")
    return [f"teacher=tiny:{arch}", *SHORT, *short_overrides(recipe.method), *family_overrides(recipe, arch), f"out={out}"]


def steps_for_every_phase(method, limit: int = 16) -> int:
    for steps in range(1, limit):
        if {method.phase(s) for s in range(steps)} >= set(method.phases):
            return steps
    raise AssertionError(f"phases {method.phases} not all reached in {limit} steps")


def one_line(error: BaseException, workdir: Path | None = None) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if workdir:  # the same reason reads the same in every cell
        text = re.sub(r"step-\d+", "step-N", text.replace(str(workdir), "RUN_DIR"))
    return text


def bug(error: BaseException) -> str:
    return f"bug: {type(error).__name__}: {one_line(error)}"


def cell(method: str, arch: str, workdir: Path) -> Cell:
    """Trains ``method`` on ``tiny:<arch>`` through each of its phases, then exports it to a diffusers folder."""
    result, start = Cell(method, arch), time.perf_counter()
    if not (RECIPES / f"{method}.yaml").is_file():
        result.runs = "no tiny recipe"
        return result
    try:
        trainer = build_trainer(load_recipe(RECIPES / f"{method}.yaml", overrides(method, arch, workdir / "run")))
        trainer.cfg.max_steps = steps_for_every_phase(trainer.method)
        run = trainer.fit()
        result.runs = "yes"
    except ConfigError as e:
        result.runs = f"refused: {one_line(e, workdir)}"
    except Exception as e:  # noqa: BLE001 -- any other error is a bug, recorded in its cell so the table goes on
        result.runs, result.traceback = bug(e), traceback.format_exc()
    if result.runs == "yes":
        try:
            gap = export_run(run, workdir / "export")["max_abs_diff_vs_sampler"]  # the exported pipeline against our sampler
            result.exports = "yes" if gap <= MATCH else f"bug: the exported pipeline differs from the method's sampler by {gap:.1e}"
        except ExportError as e:
            result.exports = f"refused: {one_line(e, workdir / 'run')}"
        except Exception as e:  # noqa: BLE001
            result.exports, result.traceback = bug(e), traceback.format_exc()
    result.seconds = time.perf_counter() - start
    return result


def covered(method: str, arch: str) -> dict[str, str]:
    """The tests behind a cell: the hand-kept table, every tiny recipe on tiny:unet, and the CI subset."""
    tests = dict(TESTED.get((method, arch), {}))
    if arch == "unet" and (RECIPES / f"{method}.yaml").is_file():
        tests.setdefault("run", RECIPES_RUN)
    if arch in CI_ARCHS:
        tests.setdefault("run", "test_compat.py")
        tests.setdefault("export", "test_compat.py")
        tests.setdefault("refused", "test_compat.py")
    return tests


def label(result: Cell, notes: list[str]) -> str:
    """The markdown cell: what works, then what of that the tests back; a reason as a numbered note."""
    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    tests = covered(result.method, result.arch)
    if result.runs != "yes":
        kind = "BUG" if result.runs.startswith("bug") else "refused" if result.runs.startswith("refused") else result.runs
        tested = ", tested" if kind == "refused" and "refused" in tests else ""
        return f"{kind} {note(result.runs)}{tested}" if kind in ("BUG", "refused") else kind
    if result.exports == "yes":
        parts = [p for p in ("run", "export") if p in tests]
        tested = ", tested" if len(parts) == 2 else f", {parts[0]} tested" if parts else ""
        return f"run+export{tested}"
    kind = "BUG" if result.exports.startswith("bug") else "refused"
    tested = ", tested" if {"run", "refused"} <= set(tests) else ", run tested" if "run" in tests else ""
    return f"run, export {kind} {note(result.exports)}{tested}"


def markdown(results: list[Cell], archs: list[str]) -> str:
    notes: list[str] = []
    by_cell = {(r.method, r.arch): r for r in results}
    rows = ["| method | " + " | ".join(f"`tiny:{a}`" for a in archs) + " |", "|---" * (len(archs) + 1) + "|"]
    for method in dict.fromkeys(r.method for r in results):
        rows.append(f"| `{method}` | " + " | ".join(label(by_cell[method, a], notes) for a in archs) + " |")
    return "\n".join(rows + [""] + [f"[{i}] {text.removeprefix('refused: ')}  " for i, text in enumerate(notes, 1)])


def quiet() -> None:
    """No diffusers or transformers warnings about the tiny models."""
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    parser.add_argument("--archs", nargs="+", default=list(TINY_ARCHS), choices=TINY_ARCHS)
    parser.add_argument("--json", type=Path, default=None, help="also write every cell (with tracebacks) here")
    args = parser.parse_args(argv)
    quiet()
    start, results = time.perf_counter(), []
    for method in args.methods or methods():
        for arch in args.archs:
            with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stderr(io.StringIO()):  # the trainer's bar
                results.append(cell(method, arch, Path(workdir)))
            r = results[-1]
            print(f"{method:>14} {arch:>5} {r.seconds:5.1f}s  runs: {r.runs[:90]}  exports: {r.exports[:90]}", file=sys.stderr, flush=True)
    print(markdown(results, args.archs))
    for r in results:
        if r.traceback:
            print(f"\n{r.method} on tiny:{r.arch}: {r.traceback.strip().splitlines()[-1]}", file=sys.stderr)
    print(f"\n{len(results)} cells in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
