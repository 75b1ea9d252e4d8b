import subprocess
import sys

import pytest

from diffdistill.cli import build_parser, main


@pytest.mark.parametrize("verb", ["train", "tiny-sd", "quickstart", "eval"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([verb, "--help"])
    assert exit_.value.code == 0
    assert len(capsys.readouterr().out) > 100


def test_quickstart_defaults_to_the_zoos_quickstart_recipe():
    """The CLI names the default without importing the zoo (start-up time); both must name one shipped recipe."""
    from diffdistill.zoo.quickstart import QUICKSTART_METHOD, recipe_path

    assert build_parser().parse_args(["quickstart"]).method == QUICKSTART_METHOD
    assert recipe_path(QUICKSTART_METHOD).is_file()


def test_top_level_help_runs_as_a_program():
    out = subprocess.run([sys.executable, "-m", "diffdistill", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "train" in out.stdout and "tiny-sd" in out.stdout


def test_tiny_sd_writes_a_pipeline_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["tiny-sd", str(out), "--arch", "dit"]) == 0
    assert (out / "model_index.json").is_file() and (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    with pytest.raises(SystemExit, match="exists"):
        main(["tiny-sd", str(out)])


def test_train_errors_are_one_clear_line(capsys):
    assert main(["train", "recipes/tiny/sft.yaml", "max_stepz=3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
    assert main(["train", "recipes/tiny/sft.yaml", "teacher=/nonexistent/sd15"]) == 2
    assert "'/nonexistent/sd15' does not exist" in capsys.readouterr().err
