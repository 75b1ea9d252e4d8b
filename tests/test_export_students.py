"""Exports of the students that are not one VP generator: flow-matching (tiny SD3), consistency (cd,
with its trained guidance input) and phased (one backbone per expert). Plain diffusers, in a process
that cannot import diffdistill, reproduces each method's own sampler to 1e-4; the phased lines are
taken from the exported model card, so the card cannot drift from what works."""

from pathlib import Path

import pytest
import torch
from plain_diffusers import run_plain

from diffdistill.conditioning import encode_prompts
from diffdistill.config import load_recipe
from diffdistill.engine.checkpoint import read_state, saved_state
from diffdistill.export import ExportError, export_run, export_student, load_student
from diffdistill.export.diffusers_folder import reference_output
from diffdistill.methods.base import build_method
from diffdistill.run import train

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "tiny"
SEED = 3
PROMPTS = ["a handwritten digit 1", "a handwritten digit 7"]
# lr 1e-3 moves the students visibly away from their teachers, so no comparison below is vacuous.
SD3 = ["teacher=tiny:sd3", "data.source=prompts", f"data.prompts={PROMPTS}", "method.gan_weight=0", "method.timesteps=[1.0,0.75,0.5,0.25]",
       "max_steps=2", "method.ratio=1", "optim.lr=1e-3", "optim.warmup_steps=0"]
# What the SD3 card says to call (checked against the export below): guidance off; T5 at the tiny tokenizer's 32 tokens;
# K = 1 is FlowMatchEuler's own spacing, K = 4 needs the student's sigmas.
SD3_CALLS = {"k1": {"num_inference_steps": 1, "guidance_scale": 1.0, "max_sequence_length": 32},
             "k4": {"sigmas": [1.0, 0.75, 0.5, 0.25], "guidance_scale": 1.0, "max_sequence_length": 32}}
CD_W = 2.0  # recipes/tiny/cd.yaml's sample_guidance, inside its trained range [1.5, 3]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("student-runs")
    return {
        "sd3": train(load_recipe(RECIPES / "dmd2.yaml", [f"out={root / 'sd3'}", "resume=false", *SD3])),
        "cd": train(load_recipe(RECIPES / "cd.yaml", [f"out={root / 'cd'}", "resume=false", "max_steps=2", "optim.lr=1e-3"])),
        # expert_ema: sampling deploys each expert's EMA, so the export must too
        "phased": train(load_recipe(RECIPES / "phased_dmd.yaml", [f"out={root / 'phased'}", "resume=false", "max_steps=4", "optim.lr=1e-3",
                                                                   "method.expert_ema=0.5"])),
    }


@torch.no_grad()
def method_sample(run, steps: int, global_rng: bool = False) -> torch.Tensor:
    """diffdistill's own sampler: the run's method rebuilt, its nets loaded from the checkpoint, ``method.sample``."""
    student = load_student(run)
    cfg, teacher = student.config, student.teacher
    method = build_method(cfg.method, teacher, cfg)
    for name, net in method.nets.items():
        if (path := saved_state(student.checkpoint, f"net-{name}") or saved_state(student.checkpoint, f"ema-{name}")) is not None:
            net.load_state_dict(read_state(path))
    cond = encode_prompts(teacher.pipe, PROMPTS)
    with torch.random.fork_rng(devices=[]):
        generator = torch.manual_seed(SEED) if global_rng else torch.Generator().manual_seed(SEED)
        noise = torch.randn((len(PROMPTS), *teacher.latent_shape), generator=generator)
        return method.sample(noise, cond, None, steps, cfg.sample_guidance, generator)


def test_plain_diffusers_reproduces_sd3_cd_and_phased_students(runs, tmp_path):
    sd3 = {k: export_run(runs["sd3"], tmp_path / f"sd3-{k}", steps=k) for k in (1, 4)}
    assert sd3[1]["call"] == SD3_CALLS["k1"] and sd3[4]["call"] == SD3_CALLS["k4"]  # the card shows the calls run below
    cd = export_run(runs["cd"], tmp_path / "cd")
    assert cd["call"] == {"num_inference_steps": 2, "guidance_scale": CD_W}  # sample_steps 2 of its 10-point grid
    phased = export_run(runs["phased"], tmp_path / "phased")
    assert phased["experts"] == ["unet", "unet_expert_1"] and phased["call"] == {"timesteps": [999, 499]}

    common = {"prompts": PROMPTS, "seed": SEED, "output_type": "latent"}
    cd_calls = {f"k{k}": {"num_inference_steps": k, "guidance_scale": CD_W} for k in (1, 4)}
    sd3_out, cd_out, card_out, bare_out = run_plain([
        {"folder": str(tmp_path / "sd3-4"), "calls": SD3_CALLS, "global_rng": True, "scheduler": "FlowMatchEulerDiscreteScheduler", **common},
        {"folder": str(tmp_path / "cd"), "calls": {**cd_calls, "k1_w3": {"num_inference_steps": 1, "guidance_scale": 3.0}},
         "global_rng": False, "scheduler": "LCMScheduler", **common},
        {"folder": str(tmp_path / "phased"), "card": True, "calls": {"k2": {}}, "global_rng": False, "scheduler": "EulerDiscreteScheduler", **common},
        {"folder": str(tmp_path / "phased"), "calls": {"k2": {"timesteps": [999, 499]}}, "global_rng": False,
         "scheduler": "EulerDiscreteScheduler", **common},  # the bare pipeline: expert 0 at both steps
    ], tmp_path)
    assert all(out["scheduler"].item() for out in (sd3_out, cd_out, card_out))

    def gap(a, b):
        return (a - b).abs().max().item()

    assert gap(sd3_out["k1"], reference_output(load_student(runs["sd3"]), "latent", PROMPTS, 1, SEED)) <= 1e-4
    assert gap(sd3_out["k4"], method_sample(runs["sd3"], 4, global_rng=True)) <= 1e-4  # DMD2.sample runs all four timesteps
    for k in (1, 4):
        assert gap(cd_out[f"k{k}"], method_sample(runs["cd"], k)) <= 1e-4, f"cd K={k}"
    assert gap(card_out["k2"], method_sample(runs["phased"], 2)) <= 1e-4
    # not vacuous: K matters, w matters, and switching experts matters
    assert gap(sd3_out["k1"], sd3_out["k4"]) > 1e-3 and gap(cd_out["k1"], cd_out["k4"]) > 1e-3
    assert gap(cd_out["k1"], cd_out["k1_w3"]) > 1e-4
    assert gap(card_out["k2"], bare_out["k2"]) > 1e-3


def test_exported_phased_experts_are_the_deployed_emas(runs):
    student = load_student(runs["phased"])
    for k, backbone in enumerate(student.experts):
        ema = read_state(saved_state(student.checkpoint, f"ema-ema_{k}"))  # the trainer saves EMA targets as ema-<name>
        raw = read_state(saved_state(student.checkpoint, f"net-expert_{k}"))
        mine = {f"backbone.{name}": v for name, v in backbone.state_dict().items()}
        assert all(torch.equal(mine[name], v) for name, v in ema.items())
        assert any(not torch.equal(mine[name], v) for name, v in raw.items())  # the EMA is not the raw expert


def test_sd3_lora_and_single_file(runs, tmp_path):
    from diffdistill.backbones.tiny import tiny_pipeline
    from diffdistill.export.lora import output_difference
    from diffdistill.export.single_file import load_single_file

    student = load_student(runs["sd3"])
    info = export_student(student, tmp_path / "lora", "lora", rank=4)
    pipe = tiny_pipeline("sd3", student.config.seed)  # the run's teacher, tiny:sd3
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert output_difference(student, pipe.transformer) <= info["max_abs_output_diff"] * 1.001 + 1e-5
    assert info["max_abs_output_diff"] < info["max_abs_output_diff_teacher"]
    assert "FlowMatchEulerDiscreteScheduler.from_pretrained" in (tmp_path / "lora" / "README.md").read_text()

    export_student(student, tmp_path / "student.safetensors", "single-file")
    loaded = load_single_file(tmp_path / "student.safetensors")
    assert type(loaded.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and loaded.scheduler.config.shift == 1.0


def test_what_cannot_be_exported_says_how(runs, tmp_path, capsys):
    from diffdistill.cli import main

    sd3, cd, phased = (load_student(runs[k]) for k in ("sd3", "cd", "phased"))
    assert main(["export", str(runs["sd3"]), "--to", str(tmp_path / "a"), "--scheduler", "lcm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LCMScheduler is a VP (DDPM-noise) scheduler" in err and "omit --scheduler" in err
    with pytest.raises(ExportError, match="DDIMScheduler is a VP.*omit --scheduler"):
        export_student(sd3, tmp_path / "b", scheduler="DDIMScheduler")
    with pytest.raises(ExportError, match="is a flow-matching scheduler.*omit --scheduler"):
        export_student(cd, tmp_path / "c", scheduler="flow-match-euler")
    with pytest.raises(ExportError, match="exports with LCMScheduler"):
        export_student(cd, tmp_path / "d", scheduler="ddim")
    with pytest.raises(ExportError, match="one backbone per expert.*--format diffusers"):
        export_student(phased, tmp_path / "e.safetensors", "single-file")
    with pytest.raises(ExportError, match="exactly 2 steps"):
        export_student(phased, tmp_path / "f", steps=1)
    with pytest.raises(ExportError, match="guidance input.*--format diffusers"):
        export_student(cd, tmp_path / "g", "lora")
    with pytest.raises(ExportError, match="cd student.*--format diffusers"):
        export_student(cd, tmp_path / "g.safetensors", "single-file")
    assert not any(tmp_path.iterdir())  # every refusal came before anything was written
