"""Exports of the students that are not one VP generator: flow-matching (tiny SD3, Flux, SANA), consistency (cd,
with its trained guidance input), phased (one backbone per expert) and meanflow (its interval input folded). Plain diffusers, in a process
that cannot import diffdistill, reproduces each method's own sampler to 1e-4; the phased lines are
taken from the exported model card, so the card cannot drift from what works."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
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
# Flux: FluxPipeline's own linspace(1, 1/K, K) is the student's schedule, so K = 1 and 4 are plain calls; the trained
# 16 px (FluxPipeline's default is 1024); no guidance input on the default (drop) student, its own scale on a kept one.
FLUX_SIZE = {"height": 16, "width": 16, "max_sequence_length": 32}
FLUX_CALLS = {f"k{k}": {"num_inference_steps": k, **FLUX_SIZE} for k in (1, 4)}
# (2.0, not FluxPipeline's default 3.5, so a call that forgot it would differ)
FLUX_KEEP_CALLS = {"k4": {**FLUX_CALLS["k4"], "guidance_scale": 2.0}, "k4_w1": {**FLUX_CALLS["k4"], "guidance_scale": 1.0}}
# SANA: SD3's spacing, so K = 4 passes sigmas; CFG and resolution binning off at the trained 32 px
SANA_CALL = {"height": 32, "width": 32, "guidance_scale": 1.0, "use_resolution_binning": False}
SANA_CALLS = {"k1": {"num_inference_steps": 1, **SANA_CALL}, "k4": {"sigmas": [1.0, 0.75, 0.5, 0.25], **SANA_CALL}}
CD_W = 2.0  # recipes/tiny/cd.yaml's sample_guidance, inside its trained range [1.5, 3]
# MeanFlow: h = t - r of its K-step sampler folded in; SD3 at K = 2 (deterministic Euler on sigmas 1, 0.5), a UNet at K = 1
MEANFLOW = ["max_steps=2", "optim.lr=1e-2", "batch_size=2"]  # lr 1e-2: folding h = 1 for h = 1/2 moves the sample by 2e-3
MEANFLOW_SD3_CALL = {"sigmas": [1.0, 0.5], "guidance_scale": 1.0, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("student-runs")
    return {
        "sd3": train(load_recipe(RECIPES / "dmd2.yaml", [f"out={root / 'sd3'}", "resume=false", *SD3])),
        "flux": train(load_recipe(RECIPES / "dmd2.yaml", [f"out={root / 'flux'}", "resume=false", *SD3, "teacher=tiny:flux"])),
        "flux_keep": train(load_recipe(RECIPES / "dmd2.yaml", [f"out={root / 'flux_keep'}", "resume=false", *SD3, "teacher=tiny:flux",
                                                               "student_guidance_embed=keep", "student_guidance=2.0"])),
        "sana": train(load_recipe(RECIPES / "dmd2.yaml", [f"out={root / 'sana'}", "resume=false", *SD3, "teacher=tiny:sana"])),
        "cd": train(load_recipe(RECIPES / "cd.yaml", [f"out={root / 'cd'}", "resume=false", "max_steps=2", "optim.lr=1e-3"])),
        # expert_ema: sampling deploys each expert's EMA, so the export must too
        "phased": train(load_recipe(RECIPES / "phased_dmd.yaml", [f"out={root / 'phased'}", "resume=false", "max_steps=4", "optim.lr=1e-3",
                                                                   "method.expert_ema=0.5"])),
        "meanflow_sd3": train(load_recipe(RECIPES / "meanflow.yaml", [f"out={root / 'meanflow_sd3'}", "resume=false", "teacher=tiny:sd3",
                                                                      "method.sample_steps=2", *MEANFLOW])),
        "meanflow_unet": train(load_recipe(RECIPES / "meanflow.yaml", [f"out={root / 'meanflow_unet'}", "resume=false", *MEANFLOW])),
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


def test_plain_diffusers_reproduces_flow_cd_and_phased_students(runs, tmp_path):
    flow_calls = {"sd3": SD3_CALLS, "flux": FLUX_CALLS, "sana": SANA_CALLS}
    for name, calls in flow_calls.items():
        for k in (1, 4):  # the card shows the calls run below
            assert export_run(runs[name], tmp_path / f"{name}-{k}", steps=k)["call"] == calls[f"k{k}"], (name, k)
    assert export_run(runs["flux_keep"], tmp_path / "flux_keep", steps=4)["call"] == FLUX_KEEP_CALLS["k4"]
    guidance_input = {name: json.loads((tmp_path / name / "transformer" / "config.json").read_text())["guidance_embeds"]
                      for name in ("flux-4", "flux_keep")}
    assert guidance_input == {"flux-4": False, "flux_keep": True}  # drop: plain FluxPipeline feeds the student no guidance
    cd = export_run(runs["cd"], tmp_path / "cd")
    assert cd["call"] == {"num_inference_steps": 2, "guidance_scale": CD_W}  # sample_steps 2 of its 10-point grid
    phased = export_run(runs["phased"], tmp_path / "phased")
    assert phased["experts"] == ["unet", "unet_expert_1"] and phased["call"] == {"timesteps": [999, 499]}
    assert export_run(runs["meanflow_sd3"], tmp_path / "meanflow_sd3")["call"] == MEANFLOW_SD3_CALL
    assert export_run(runs["meanflow_unet"], tmp_path / "meanflow_unet")["call"] == {"num_inference_steps": 1}

    common = {"prompts": PROMPTS, "seed": SEED, "output_type": "latent"}
    cd_calls = {f"k{k}": {"num_inference_steps": k, "guidance_scale": CD_W} for k in (1, 4)}
    flow = {"global_rng": True, "scheduler": "FlowMatchEulerDiscreteScheduler", **common}
    sd3_out, flux_out, keep_out, sana_out, cd_out, card_out, bare_out, mf_sd3_out, mf_unet_out = run_plain([
        {"folder": str(tmp_path / "sd3-4"), "calls": SD3_CALLS, **flow},
        {"folder": str(tmp_path / "flux-4"), "calls": FLUX_CALLS, **flow},
        {"folder": str(tmp_path / "flux_keep"), "calls": FLUX_KEEP_CALLS, **flow},
        {"folder": str(tmp_path / "sana-4"), "calls": SANA_CALLS, **flow},
        {"folder": str(tmp_path / "cd"), "calls": {**cd_calls, "k1_w3": {"num_inference_steps": 1, "guidance_scale": 3.0}},
         "global_rng": False, "scheduler": "LCMScheduler", **common},
        {"folder": str(tmp_path / "phased"), "card": True, "calls": {"k2": {}}, "global_rng": False, "scheduler": "EulerDiscreteScheduler", **common},
        {"folder": str(tmp_path / "phased"), "calls": {"k2": {"timesteps": [999, 499]}}, "global_rng": False,
         "scheduler": "EulerDiscreteScheduler", **common},  # the bare pipeline: expert 0 at both steps
        {"folder": str(tmp_path / "meanflow_sd3"), "calls": {"k2": MEANFLOW_SD3_CALL}, **flow},
        {"folder": str(tmp_path / "meanflow_unet"), "calls": {"k1": {"num_inference_steps": 1}}, "global_rng": False, "scheduler": "LCMScheduler",
         **common},
    ], tmp_path)
    assert all(out["scheduler"].item() for out in (sd3_out, flux_out, keep_out, sana_out, cd_out, card_out, mf_sd3_out, mf_unet_out))
    flux_out, keep_out = ({k: unpack_flux(v) for k, v in out.items() if k != "scheduler"} for out in (flux_out, keep_out))

    def gap(a, b):
        return (a - b).abs().max().item()

    assert gap(sd3_out["k1"], reference_output(load_student(runs["sd3"]), "latent", PROMPTS, 1, SEED)) <= 1e-4
    assert gap(sd3_out["k4"], method_sample(runs["sd3"], 4, global_rng=True)) <= 1e-4  # DMD2.sample runs all four timesteps
    for name, out in (("flux", flux_out), ("sana", sana_out)):
        assert gap(out["k1"], reference_output(load_student(runs[name]), "latent", PROMPTS, 1, SEED)) <= 1e-4, f"{name} K=1"
        assert gap(out["k4"], method_sample(runs[name], 4, global_rng=True)) <= 1e-4, f"{name} K=4"
    assert gap(keep_out["k4"], method_sample(runs["flux_keep"], 4, global_rng=True)) <= 1e-4
    for k in (1, 4):
        assert gap(cd_out[f"k{k}"], method_sample(runs["cd"], k)) <= 1e-4, f"cd K={k}"
    assert gap(card_out["k2"], method_sample(runs["phased"], 2)) <= 1e-4
    assert gap(mf_sd3_out["k2"], method_sample(runs["meanflow_sd3"], 2, global_rng=True)) <= 1e-4  # MeanFlow.sample, h = 1/2 unfolded
    assert gap(mf_unet_out["k1"], method_sample(runs["meanflow_unet"], 1)) <= 1e-4
    # not vacuous: K matters, w matters, and switching experts matters
    assert all(gap(out["k1"], out["k4"]) > 1e-3 for out in (sd3_out, flux_out, sana_out, cd_out))
    assert gap(keep_out["k4"], keep_out["k4_w1"]) > 1e-4  # the kept guidance input is live
    assert gap(cd_out["k1"], cd_out["k1_w3"]) > 1e-4
    assert gap(card_out["k2"], bare_out["k2"]) > 1e-3


def unpack_flux(tokens: torch.Tensor) -> torch.Tensor:
    """FluxPipeline's latent output (packed 2x2 tokens) as (B, C, H, W), by diffusers' own unpacking (16 px, VAE factor 2)."""
    return FluxPipeline._unpack_latents(tokens, 16, 16, 2)


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

    sd3, cd, phased, flux = (load_student(runs[k]) for k in ("sd3", "cd", "phased", "flux"))
    assert main(["export", str(runs["sd3"]), "--to", str(tmp_path / "a"), "--scheduler", "lcm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "LCMScheduler is a VP (DDPM-noise) scheduler" in err and "omit --scheduler" in err
    with pytest.raises(ExportError, match="DDIMScheduler is a VP.*omit --scheduler"):
        export_student(sd3, tmp_path / "b", scheduler="DDIMScheduler")
    with pytest.raises(ExportError, match="LCMScheduler is a VP.*FluxPipeline student is flow-matching.*omit --scheduler"):
        export_student(flux, tmp_path / "b", scheduler="lcm")
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
    meanflow = load_student(runs["meanflow_sd3"])
    with pytest.raises(ExportError, match="2-step sampler folded.*drop --steps 1"):
        export_student(meanflow, tmp_path / "h", steps=1)
    with pytest.raises(ExportError, match="folded into its weights, as a diffusers folder"):
        export_student(meanflow, tmp_path / "h.safetensors", "single-file")
    assert not any(tmp_path.iterdir())  # every refusal came before anything was written


def test_flux_single_file_reloads_the_student_that_dropped_or_kept_its_guidance_input(runs, tmp_path):
    from diffdistill.export.single_file import load_single_file

    for name, keeps in (("flux", False), ("flux_keep", True)):
        student = load_student(runs[name])
        export_student(student, tmp_path / f"{name}.safetensors", "single-file")
        loaded = load_single_file(tmp_path / f"{name}.safetensors").transformer
        assert loaded.config.guidance_embeds is keeps, name
        mine = student.backbone.state_dict()
        assert loaded.state_dict().keys() == mine.keys() and all(torch.equal(v, mine[k]) for k, v in loaded.state_dict().items()), name
