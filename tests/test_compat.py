"""The README's compatibility matrix, held for one family: every method on tiny:sd3 (a flow transformer, where
regressions of the flow export and the transformer adapters show) trains through its phases and exports to a
diffusers folder that reproduces its sampler, or is refused with the one-line reason the matrix shows."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("compat", ROOT / "benchmarks" / "compat.py")
compat = sys.modules.setdefault("compat", importlib.util.module_from_spec(_spec))  # benchmarks/ is no package
_spec.loader.exec_module(compat)

# method -> (runs, exports) on tiny:sd3, as the README's matrix shows: "yes", or a piece of the refusal.
EXPECTED = {
    "cd": ("yes", "LCM's boundary condition"),
    "diff_instruct": ("yes", "yes"),
    "dmd": ("yes", "yes"),
    "dmd2": ("yes", "yes"),
    "fdistill": ("yes", "yes"),
    "kd": ("yes", "yes"),
    "ladd": ("yes", "yes"),
    "meanflow": ("yes", "yes"),
    "phased_dmd": ("yes", "yes"),
    "rcm": ("yes", "yes"),
    "scm": ("yes", "yes"),
    "sft": ("yes", "trains no few-step student"),
    "sid": ("yes", "scale_input"),
    "sim": ("yes", "yes"),
}


def outcome(text: str, expected: str) -> bool:
    return text == expected if expected in ("yes", "") else text.startswith("refused: ") and expected in text


@pytest.mark.parametrize("arch", compat.CI_ARCHS)
@pytest.mark.parametrize("method", compat.methods())
def test_every_method_runs_and_exports_as_the_matrix_says(method, arch, tmp_path):
    cell = compat.cell(method, arch, tmp_path)
    assert "bug" not in (cell.runs + cell.exports)[:4] and not cell.traceback, cell.traceback  # never a bare traceback
    if method not in EXPECTED:  # a method added since: clean outcomes are enough here; add its row with the README's
        return
    runs, exports = EXPECTED[method]
    assert outcome(cell.runs, runs), cell.runs
    assert outcome(cell.exports, exports), cell.exports


@pytest.mark.parametrize("method, expected", [("sft", "class ids or label names"), ("sim", "yes")])
def test_a_class_conditional_dit_takes_class_ids_and_refuses_captions(method, expected, tmp_path):
    """DiT: sft's captioned digits (its VAE has no vae_scale_factor to size them: an AttributeError before) are refused
    naming the fix; sim's prompts, as class ids, train and export."""
    cell = compat.cell(method, "dit", tmp_path)
    assert outcome(cell.runs, expected) and not cell.traceback, (cell.runs, cell.traceback)
    assert cell.exports == ("yes" if expected == "yes" else "")


def test_every_test_the_matrix_names_exists():
    """A renamed or deleted test must take its "tested" out of the README's matrix."""
    named = [name for tests in compat.TESTED.values() for name in tests.values()] + [compat.RECIPES_RUN]
    for name in named:
        file, _, function = name.partition("::")
        text = (ROOT / "tests" / file).read_text()
        assert not function or f"def {function}(" in text, name


def test_matrix_marks_only_what_a_test_backs():
    assert compat.covered("dmd", "flux") == {}  # nothing tests it: the matrix must not say so
    assert compat.covered("kd", "unet") == {"run": compat.RECIPES_RUN}
    assert set(compat.covered("sim", "sd3")) == {"run", "export", "refused"}  # this file
    assert compat.label(compat.Cell("kd", "unet", runs="yes", exports="yes"), []) == "run+export, run tested"  # its export: untested
    assert compat.label(compat.Cell("sft", "sd3", runs="yes", exports="refused: no"), []) == "run, export refused [1], tested"
    cells = [compat.Cell("kd", "flux", runs="yes", exports="yes"), compat.Cell("kd", "sd3", runs="yes", exports="yes"),
             compat.Cell("dmd2", "flux", runs="yes", exports="refused: no flux"), compat.Cell("dmd2", "sd3", runs="refused: no sd3")]
    assert compat.markdown(cells, ["flux", "sd3"]).splitlines()[2:] == [
        "| `kd` | run+export | run+export, tested |",
        "| `dmd2` | run, export refused [1], run tested | refused [2], tested |", "", "[1] no flux  ", "[2] no sd3  "]
