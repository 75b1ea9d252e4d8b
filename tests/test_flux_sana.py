"""Flow-matching transformer teachers: Flux (packed latents, guidance-distilled), Sana, and SD3.5's shape.

Each adapter is held against its own pipeline's conventions, written out here from diffusers (the
pipeline's own packing and position ids, its timestep scaling, the flow output x0 = x_t - t u), and
each family runs a DMD2 generator and critic step. Flux.1-dev's guidance is one pass with its guidance
input at w: a real score at w is one call of the raw transformer with ``guidance=w``.
"""

import contextlib
import json
import math
import shutil

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline

from diffdistill.backbones.loading import load_teacher
from diffdistill.backbones.tiny import write_tiny_pipeline
from diffdistill.conditioning import encode_prompts
from diffdistill.config import ConfigError, DataConfig, TrainConfig, load_recipe
from diffdistill.engine.broadcast import materialize, tensor_layout
from diffdistill.generator import student_denoiser
from diffdistill.methods.base import build_method
from diffdistill.methods.trigflow import use_jvp_attention
from diffdistill.run import build_trainer, configure_teacher, teacher_networks
from diffdistill.sampling import guided_x0
from diffdistill.schedules import schedule_from_scheduler_config
from diffdistill.scores import ScoreEngine
from diffdistill.teachers import resolve_teacher

T = torch.tensor([0.9, 0.35])


@pytest.fixture(scope="module")
def flux():
    return resolve_teacher("tiny:flux")


def raw_flux(teacher, x, t, cond, guidance):
    """The transformer called as FluxPipeline.__call__ calls it, on its own packed latents and ids."""
    pipe, (b, c, h, w) = teacher.pipe, x.shape
    _, _, text_ids = pipe.encode_prompt(["a cat"], max_sequence_length=pipe.tokenizer_2.model_max_length)
    out = teacher.backbone(
        FluxPipeline._pack_latents(x, b, c, h, w), timestep=t, guidance=torch.full((b,), float(guidance)),
        pooled_projections=cond["pooled_projections"], encoder_hidden_states=cond["encoder_hidden_states"],
        txt_ids=text_ids, img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32), return_dict=False,
    )[0]
    return FluxPipeline._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)


def test_flux_real_score_at_w_is_one_pass_with_its_guidance_input(flux):
    """x0 = x_t - t u with u the transformer at (pipeline timestep t = sigma, guidance w), called once per real score."""
    cond, uncond = encode_prompts(flux.pipe, ["a cat", "7"]), encode_prompts(flux.pipe, ["", ""])
    x_t = torch.randn(2, *flux.latent_shape)
    engine = ScoreEngine(flux, {})
    with transformer_calls(flux.backbone) as calls:
        for w in (1.0, 3.5, torch.tensor([2.0, 5.0])):
            calls.clear()
            x0 = engine.real(x_t, T, cond, uncond, w)
            assert [len(c["x"]) for c in calls] == [2]  # one pass over the two samples: never a conditional / unconditional pair
            for i in range(2):
                scale = w[i] if torch.is_tensor(w) else w
                by_hand = x_t[i : i + 1] - T[i] * raw_flux(flux, x_t[i : i + 1], T[i : i + 1], {k: v[i : i + 1] for k, v in cond.items()}, scale)
                torch.testing.assert_close(x0[i : i + 1], by_hand, rtol=1e-4, atol=1e-5)
            if not torch.is_tensor(w):  # the teacher ODE's samplers (DMD's regression pairs) guide the same way
                calls.clear()
                torch.testing.assert_close(guided_x0(flux.denoiser(), x_t, T, cond, uncond, w), x0)
                assert [len(c["x"]) for c in calls] == [2]
    assert not torch.allclose(engine.real(x_t, T, cond, uncond, 1.0), engine.real(x_t, T, cond, uncond, 4.0))  # the input matters


@contextlib.contextmanager
def transformer_calls(backbone):
    """The inputs of each call of ``backbone`` (its first positional one as "x"), while in the block."""
    calls = []
    handle = backbone.register_forward_pre_hook(lambda module, args, kwargs: calls.append({"x": (args or [None])[0], **kwargs}), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def test_flux_student_drops_its_guidance_input_as_the_teacher_at_that_scale(flux):
    """drop: the guidance embedding at w folds into the time embedding's bias, exactly (a FLUX.1-schnell-shaped net);
    keep: the student keeps the input and always sees w."""
    cond = encode_prompts(flux.pipe, ["a cat", "7"])
    x_t = torch.randn(2, *flux.latent_shape)
    teacher_at = {w: ScoreEngine(flux, {}).real(x_t, T, cond, None, w) for w in (3.5, 2.0)}
    dropped = student_denoiser(flux)
    assert not dropped.backbone.config.guidance_embeds and not dropped.embeds_guidance
    assert not any("guidance" in k for k in dropped.backbone.state_dict())
    torch.testing.assert_close(dropped(x_t, T, cond), teacher_at[3.5], rtol=1e-4, atol=1e-5)
    flux.student_guidance_embed, flux.student_guidance = "keep", 2.0
    try:
        kept = student_denoiser(flux)
    finally:
        flux.student_guidance_embed, flux.student_guidance = "drop", 3.5
    assert kept.backbone.config.guidance_embeds
    torch.testing.assert_close(kept(x_t, T, cond), teacher_at[2.0], rtol=1e-4, atol=1e-5)


def test_flux_denoiser_is_one_step_of_the_plain_pipeline(flux):
    """FluxPipeline's one Euler step from sigma = 1 to 0 is x0 = x - u: the real score at w with the pipeline's guidance_scale w."""
    x = torch.randn(1, *flux.latent_shape)
    latents = FluxPipeline._pack_latents(x, 1, *flux.latent_shape)
    side = flux.latent_shape[-1] * flux.pipe.vae_scale_factor
    out = flux.pipe("A Cat", guidance_scale=3.5, num_inference_steps=1, latents=latents, max_sequence_length=flux.pipe.tokenizer_2.model_max_length,
                    height=side, width=side, output_type="latent").images
    ours = ScoreEngine(flux, {}).real(x, torch.ones(1), encode_prompts(flux.pipe, ["A Cat"]), None, 3.5)
    torch.testing.assert_close(FluxPipeline._unpack_latents(out, side, side, flux.pipe.vae_scale_factor), ours)


def test_sana_conditioning_and_denoiser_are_the_pipelines(tmp_path):
    """Sana (written and re-loaded): our prompt and empty-prompt encodings are what SanaPipeline feeds its transformer under
    CFG (the prompt behind its default complex human instruction); the transformer sees the scheduler's 1000 sigma and
    predicts u, x0 = x_t - sigma u, as DPMSolverMultistepScheduler's flow_prediction converts it."""
    teacher = load_teacher(write_tiny_pipeline(tmp_path / "sana", "sana"))
    assert (teacher.kind, teacher.prediction_type, teacher.schedule.shift_factor) == ("sana", "flow", 3.0)
    with transformer_calls(teacher.backbone) as calls:
        teacher.pipe("A Cat", guidance_scale=4.5, num_inference_steps=1, output_type="latent", use_resolution_binning=False)
    cond = encode_prompts(teacher.pipe, ["", "A Cat"])  # the pipeline's CFG batch: (negative, prompt)
    for key in cond:
        assert torch.equal(calls[0][key], cond[key]), key
    x_t = torch.randn(2, *teacher.latent_shape)
    raw = teacher.backbone(x_t, encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"],
                           timestep=1000 * T, return_dict=False)[0]
    torch.testing.assert_close(teacher.denoiser()(x_t, T, cond), x_t - T.view(-1, 1, 1, 1) * raw)


def test_flow_shifts_match_the_schedulers():
    """Flux's resolution shift (mu from the token count, exponential) and Sana's DPM-Solver flow_shift are our t' = s t / (1 + (s-1) t)."""
    flux = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    tokens, sigmas = 1024, torch.linspace(1.0, 0.25, 4)
    ours = schedule_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **flux.config}, image_tokens=tokens)
    flux.set_timesteps(sigmas=sigmas.tolist(), mu=0.5 + 0.65 * (tokens - 256) / 3840)
    torch.testing.assert_close(ours.shift(sigmas.double()).float(), flux.sigmas[:-1])
    sana = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    sana.set_timesteps(4)
    ours = schedule_from_scheduler_config({"_class_name": "DPMSolverMultistepScheduler", **sana.config})
    plain = (1 - torch.linspace(1, 1 / 1000, 5, dtype=torch.float64)).flip(0)[:-1]  # its unshifted flow sigmas, 0.999 first
    torch.testing.assert_close(ours.shift(plain).float(), sana.sigmas[:-1].float())


def test_sd35_loads_through_the_sd3_adapter(tmp_path):
    teacher = load_teacher(write_tiny_pipeline(tmp_path / "sd35", "sd35"))
    config = teacher.backbone.config
    assert (teacher.kind, config.qk_norm, tuple(config.dual_attention_layers)) == ("sd3", "rms_norm", (0,))
    cond = encode_prompts(teacher.pipe, ["a cat", "7"])
    x_t = torch.randn(2, *teacher.latent_shape)
    raw = teacher.backbone(x_t, encoder_hidden_states=cond["encoder_hidden_states"], pooled_projections=cond["pooled_projections"],
                           timestep=1000 * T, return_dict=False)[0]
    torch.testing.assert_close(teacher.denoiser()(x_t, T, cond), x_t - T.view(-1, 1, 1, 1) * raw)


@pytest.mark.parametrize("arch", ["flux", "sana", "sd35"])
def test_dmd2_generator_and_critic_steps_run(arch, tmp_path):
    """One critic and one generator step of DMD2 with its GAN head (pooled on tokens) and real digits."""
    overrides = [f"teacher=tiny:{arch}", "method.ratio=1", "batch_size=2", "max_steps=2", f"out={tmp_path}", "log_every=1"]
    trainer = build_trainer(load_recipe("recipes/tiny/dmd2.yaml", overrides))
    before = {k: v.clone() for k, v in trainer.method.nets["generator"].state_dict().items()}
    trainer.fit()
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all(math.isfinite(v) for v in map(float, _losses(rows)))
    after = trainer.method.nets["generator"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the generator step moved it


def _losses(rows):
    return [v for row in map(json.loads, rows) for k, v in row.items() if k.startswith("loss_")]


@pytest.mark.parametrize("method, fix", [
    ({"name": "sid", "guidance_style": "lsg", "guidance": 2.0, "fake_guidance": 2.0, "fake_train_guidance": 2.0}, "use guidance_style=cfg"),
    ({"name": "sim", "guidance_style": "zero_cfg"}, "use guidance_style=cfg"),
    ({"name": "dmd2", "gan_weight": 1e-3, "gan_head": "patch"}, "use gan_head=pooled"),
    ({"name": "cd"}, "set method.guidance_embedding_dim=0"),
    ({"name": "dmd2", "student_lora_rank": 4}, "set student_guidance_embed=keep"),
])
def test_options_a_guidance_distilled_transformer_cannot_take_are_refused(flux, method, fix):
    with pytest.raises(ConfigError, match=fix):
        build_method(method, flux, TrainConfig())


def test_student_guidance_keys_need_a_guidance_distilled_teacher(flux):
    with pytest.raises(ConfigError, match="no guidance input: drop them"):
        configure_teacher(resolve_teacher("tiny:sd3"), TrainConfig(student_guidance_embed="keep"))
    configure_teacher(flux, TrainConfig(student_guidance=2.0))
    assert flux.student_guidance == 2.0
    flux.student_guidance = 3.5


def test_a_flux_folder_samples_at_data_resolution(tmp_path, flux):
    """Flux has no sample_size: a folder's teacher takes FluxPipeline's 128 x 128 latents, or data.resolution, and its
    resolution-dependent shift follows (the in-memory tiny:flux is at 8 x 8)."""
    teacher = load_teacher(write_tiny_pipeline(tmp_path / "flux", "flux"))
    assert teacher.latent_shape == (4, 128, 128) and teacher.schedule.shift_factor == pytest.approx(math.exp(0.5 + 0.65 * (4096 - 256) / 3840))
    configure_teacher(teacher, TrainConfig(data=DataConfig(resolution=16)))
    assert teacher.latent_shape == flux.latent_shape == (4, 8, 8) and teacher.schedule.shift_factor == pytest.approx(flux.schedule.shift_factor)
    with pytest.raises(ConfigError, match="data.resolution=18 is not a multiple of 4"):
        configure_teacher(teacher, TrainConfig(data=DataConfig(resolution=18)))


@pytest.mark.parametrize("arch", ["flux", "sana"])
def test_a_teacher_built_on_meta_matches_the_loaded_one(arch, tmp_path):
    """What the other processes of a multi-GPU run build (engine/broadcast.py): the same networks from configs alone."""
    folder = write_tiny_pipeline(tmp_path / arch, arch)
    configs_only = shutil.copytree(folder, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    loaded, empty = load_teacher(folder), load_teacher(configs_only, on_meta=True)
    assert (empty.latent_shape, empty.schedule.shift_factor) == (loaded.latent_shape, loaded.schedule.shift_factor)
    loaded, empty = teacher_networks(loaded), teacher_networks(empty)
    assert sorted(empty) == sorted(loaded)
    for name, module in empty.items():
        materialize(name, module, tensor_layout(loaded[name]), "cpu")
        assert tensor_layout(module) == tensor_layout(loaded[name]), name


def test_flux_attention_gets_forward_mode_ad_for_the_jvp_methods(flux):
    """sCM / rCM take a jvp through the student; Flux's attention (dispatched SDPA, no forward AD on CPU) is set to the math
    backend, and the jvp then matches central differences."""
    student = student_denoiser(flux)
    assert use_jvp_attention(student.backbone) == 2  # the joint block's and the single block's attention
    cond, x, t = encode_prompts(flux.pipe, ["a cat"]), torch.randn(1, *flux.latent_shape), torch.tensor([0.5])
    direction, step = torch.randn_like(x), 1e-3
    with torch.no_grad():
        _, tangent = torch.func.jvp(lambda x: student(x, t, cond), (x,), (direction,))
        central = (student(x + step * direction, t, cond) - student(x - step * direction, t, cond)) / (2 * step)
    torch.testing.assert_close(tangent, central, rtol=1e-2, atol=2e-3)
