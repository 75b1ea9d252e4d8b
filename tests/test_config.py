from pathlib import Path

import pytest

from diffdistill.config import ConfigError, load_recipe
from diffdistill.methods.base import method_options

RECIPES = sorted(p for p in Path(__file__).resolve().parent.parent.joinpath("recipes").rglob("*.yaml") if "accelerate" not in p.parts)
LAUNCH_CONFIGS = {"1gpu": (1, 1), "8gpu_ddp": (8, 1), "8gpu_fsdp": (8, 1), "2x8gpu": (16, 2)}  # recipes/accelerate: processes, machines


def test_overrides_are_typed():
    cfg = load_recipe(None, ["max_steps=20", "optim.lr=1e-4", "data.source=digits", "sample_prompts=[a, b]"])
    assert (cfg.max_steps, cfg.optim.lr, cfg.data.source, cfg.sample_prompts) == (20, 1e-4, "digits", ["a", "b"])


@pytest.mark.parametrize("override, message", [
    ("max_step=3", "did you mean 'max_steps'"),
    ("optim.lrr=1", "did you mean 'optim.lr'"),
    ("max_steps=abc", "max_steps must be an integer"),
    ("mixed_precision=bf61", "did you mean 'bf16'"),
    ("data=3", "data must be a mapping"),
    ("batch_size=5", "multiple of grad_accum"),
    ("resume=maybe", "resume must be true or false"),
])
def test_bad_keys_and_values_are_named(override, message):
    overrides = [override, "grad_accum=2"] if override.startswith("batch_size") else [override]
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, overrides)


def test_unknown_method_and_method_option():
    with pytest.raises(ConfigError, match="unknown method key 'sfx'; did you mean 'sft'"):
        method_options({"name": "sfx"})
    with pytest.raises(ConfigError, match="did you mean 'method.timesteps'"):
        method_options({"name": "sft", "timestep": "uniform"})


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe("recipes/nope.yaml")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_shipped_recipe_loads_and_names_its_command(recipe):
    first = recipe.read_text().splitlines()[0]
    assert first.startswith("# diffdistill ") or first.startswith("# accelerate launch"), "header must give the exact command"
    cfg = load_recipe(recipe)
    method_options(cfg.method)


@pytest.mark.parametrize("name", list(LAUNCH_CONFIGS))
def test_launch_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).resolve().parent.parent / "recipes" / "accelerate" / f"{name}.yaml"))
    assert (config.num_processes, config.num_machines) == LAUNCH_CONFIGS[name]
    command = Path(__file__).resolve().parent.parent.joinpath("recipes", "accelerate", f"{name}.yaml").read_text().splitlines()[0]
    assert f"--config_file recipes/accelerate/{name}.yaml" in command and "diffdistill.cli train" in command
