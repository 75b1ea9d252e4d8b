"""Export: the diffusers folder samples exactly like diffdistill (checked in a process that cannot
import diffdistill), the LoRA loads with load_lora_weights and reproduces the student within its
reported error, the single file round-trips, and bad input fails with errors naming the fix."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from plain_diffusers import run_plain
from safetensors.torch import load_file, save_file

from diffdistill.cli import _summary
from diffdistill.config import load_recipe
from diffdistill.export import ExportError, export_run, export_student, load_student
from diffdistill.export.diffusers_folder import reference_output
from diffdistill.export.original_transformers import transformer_to_original
from diffdistill.run import train

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "dmd2.yaml"
# ratio=1 makes step 1 a generator step, and lr 1e-3 moves it visibly: the student is not the teacher.
FAST = ["max_steps=2", "method.ratio=1", "optim.lr=1e-3", "optim.warmup_steps=0", "method.timesteps=[999,749,499,249]", "resume=false"]
DIT = ["teacher=tiny:dit", "data.source=prompts", 'data.prompts=["1","3","7"]', "method.gan_weight=0"]
SEED = 3

PROMPTS = {"unet": ["a handwritten digit 1", "a handwritten digit 7"], "dit": ["1", "7"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    return {
        "unet": train(load_recipe(RECIPE, [f"out={root / 'unet'}", *FAST])),
        "dit": train(load_recipe(RECIPE, [f"out={root / 'dit'}", *FAST, *DIT])),
    }


@pytest.fixture(scope="module")
def unet_student(runs):
    return load_student(runs["unet"])


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_plain_diffusers_samples_like_diffdistill(runs, arch, tmp_path):
    out = tmp_path / "pipe"
    info = export_run(runs[arch], out)
    assert info["max_abs_diff_vs_sampler"] <= 1e-4
    assert {"model_index.json", "README.md", "scheduler"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"

    # SD keeps its default guidance_scale (7.5), which the exported UNet's guidance embedding must switch off;
    # DiTPipeline has no such switch, and re-noises from the global generator.
    dit = arch == "dit"
    calls = {f"k{k}": {"num_inference_steps": k, **({"guidance_scale": 1.0} if dit else {})} for k in (1, 4)}
    inputs = {"labels": [1, 7]} if dit else {"prompts": PROMPTS[arch]}
    child, = run_plain([{"folder": str(out), **inputs, "calls": calls, "seed": SEED, "global_rng": dit,
                         "output_type": "pt" if dit else "latent", "scheduler": "LCMScheduler"}], tmp_path)
    assert child["scheduler"].item()

    student = load_student(runs[arch])
    kind = "image" if dit else "latent"
    for k in (1, 4):
        ours = reference_output(student, kind, PROMPTS[arch], k, SEED)
        assert child[f"k{k}"].shape == ours.shape
        assert (child[f"k{k}"] - ours).abs().max().item() <= 1e-4, f"K={k}"
    assert (child["k1"] - child["k4"]).abs().max() > 1e-3  # K matters: the comparison is not vacuous


@pytest.mark.filterwarnings("ignore:.*lora_bias.*")  # bias deltas ride on lora_B.bias; peft notes bias-less layers cannot fuse
def test_lora_loads_with_diffusers_and_reproduces_the_student(unet_student, tmp_path):
    from diffdistill.backbones.tiny import tiny_pipeline
    from diffdistill.export.lora import extract, output_difference

    out = tmp_path / "lora"
    info = export_student(unet_student, out, "lora", rank=4)
    report = json.loads((out / "lora_report.json").read_text())
    assert report["rank"] == 4 and report["layers"] > 0
    assert 0 < report["max_abs_output_diff"] < report["max_abs_output_diff_teacher"]  # closer to the student than the teacher is
    assert info["max_abs_output_diff"] == report["max_abs_output_diff"]

    pipe = tiny_pipeline("unet", unet_student.config.seed)  # the run's teacher, tiny:unet
    pipe.load_lora_weights(str(out))
    loaded = output_difference(unet_student, pipe.unet)
    assert loaded <= report["max_abs_output_diff"] * 1.001 + 1e-5, (loaded, report["max_abs_output_diff"])

    _, errors = extract(unet_student.teacher.backbone, unet_student.backbone, rank=10**6)  # full rank is exact
    assert max(errors.values()) < 1e-6
    assert max(report["relative_frobenius"].values()) > 1e-3  # rank 4 is not


def test_single_file_round_trip(unet_student, tmp_path, tiny_unet_dir):
    from diffdistill.export.single_file import load_student_file, read_metadata

    path = tmp_path / "student.safetensors"
    export_student(unet_student, path, "single-file")
    meta = read_metadata(path)
    assert meta["timesteps"] == [999, 749, 499, 249] and meta["component"] == "unet" and meta["teacher"] == "tiny:unet"
    expected = unet_student.backbone.state_dict()
    for teacher_config in (None, str(tiny_unet_dir)):  # the recorded tiny:unet spec, and a pipeline folder via load_teacher
        loaded = load_student_file(path, teacher_config).backbone.state_dict()
        assert max((loaded[k] - expected[k]).abs().max().item() for k in expected) == 0


def test_no_finished_checkpoint(runs, tmp_path, capsys):
    from diffdistill.cli import main

    run = tmp_path / "run"
    (run / "checkpoints" / ".tmp-step-00000005").mkdir(parents=True)
    (run / "config.yaml").write_text((runs["unet"] / "config.yaml").read_text())
    assert main(["export", str(run), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no finished checkpoint" in err and ".tmp-step-00000005" in err
    assert not (tmp_path / "out").exists()


def test_teacher_that_does_not_match(runs, tmp_path):
    with pytest.raises(ExportError, match="does not match the teacher 'tiny:dit'.*--teacher"):
        export_run(runs["unet"], tmp_path / "out", teacher="tiny:dit")


def test_existing_out_is_refused_then_replaced_whole(unet_student, tmp_path, monkeypatch, capsys):
    import diffdistill.export as export  # export_student calls the writer it imported
    from diffdistill.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main(["export", str(unet_student.run_dir), "--to", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "old"
    (out / export.EXPORT_MARKER).write_text("{}")  # --overwrite replaces only a previous export (tests/test_errors.py)

    def half_written(student, tmp, steps, name=None, scheduler=None):
        (tmp / "unet").mkdir(parents=True)
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_diffusers", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(unet_student, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "old"  # no temp left, old intact

    monkeypatch.undo()
    export_student(unet_student, out, overwrite=True, steps=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and not (out / "keep.txt").exists()
    assert (out / "model_index.json").is_file()


def test_bad_options(unet_student, runs, tmp_path):
    with pytest.raises(ExportError, match="choose 1..4"):
        export_student(unet_student, tmp_path / "a", steps=8)
    with pytest.raises(ExportError, match="no EMA weights"):
        export_run(runs["unet"], tmp_path / "b", ema=True)
    with pytest.raises(ExportError, match=r"ending in \.safetensors"):
        export_student(unet_student, tmp_path / "c", "single-file")
    with pytest.raises(ExportError, match="DiTPipeline has no LoRA loader"):
        export_run(runs["dit"], tmp_path / "d", "lora")
    with pytest.raises(ExportError, match="run folder itself"):
        export_student(unet_student, unet_student.run_dir, overwrite=True)


def test_lora_trained_student_exports_its_adapters():
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    from diffdistill.export.lora import from_adapters, merged
    from diffdistill.export.student import load_into_backbone
    from diffdistill.teachers import resolve_teacher

    teacher = resolve_teacher("tiny:unet")
    lora_net = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]), copy.deepcopy(teacher.backbone))
    with torch.no_grad():
        for name, p in lora_net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at zero; a trained adapter is not
    backbone, adapters = load_into_backbone(teacher, lora_net.state_dict(), "a LoRA generator")
    assert len(adapters) == 2 * sum(n.endswith("to_q") for n, _ in teacher.backbone.named_modules())  # to_q and to_v
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    cond = {"encoder_hidden_states": torch.randn(1, 32, 32)}
    with torch.no_grad():
        want = teacher.denoiser(lora_net).raw(x, t, cond)
        assert (teacher.denoiser(backbone).raw(x, t, cond) - want).abs().max() < 1e-5  # merged on load
        assert (teacher.denoiser(merged(teacher.backbone, from_adapters(adapters))).raw(x, t, cond) - want).abs().max() < 1e-5


def test_sid_scaled_input_is_refused_not_exported_wrong(unet_student, tmp_path):
    import dataclasses

    from diffdistill.export.student import student_input_scale

    schedule = unet_student.teacher.schedule
    scale = student_input_scale({"name": "sid"}, schedule, [999.0])  # SiD's default scale_input=true
    assert scale == pytest.approx(float(schedule.sigma(torch.tensor([999.0]))))
    assert student_input_scale({"name": "dmd2"}, schedule, [999.0]) == 1.0
    with pytest.raises(ExportError, match="scale_input"):
        export_student(dataclasses.replace(unet_student, input_scale=scale), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_kohya_layout_loads_in_diffusers_as_the_diffusers_layout_does(tmp_path):
    from diffdistill.backbones.tiny import tiny_pipeline
    from diffdistill.export.lora import WEIGHT_NAME, output_difference

    run = train(load_recipe(RECIPE, [f"out={tmp_path / 'run'}", *FAST, "method.student_lora_rank=4"]))  # adapters: no bias changes
    student = load_student(run)
    loaded = {}
    for layout in ("diffusers", "kohya"):
        info = export_student(student, tmp_path / layout, "lora", lora_layout=layout)
        assert info["layout"] == layout
        pipe = tiny_pipeline("unet", student.config.seed)  # the run's teacher, tiny:unet
        pipe.load_lora_weights(str(tmp_path / layout))
        loaded[layout] = pipe.unet
    keys = load_file(str(tmp_path / "kohya" / WEIGHT_NAME))
    assert keys and all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert output_difference(student, loaded["kohya"]) <= 1e-5 and output_difference(student, loaded["diffusers"]) <= 1e-5
    assert output_difference(student, student.teacher.backbone) > 1e-3  # the adapters matter: the comparison is not vacuous


def test_kohya_layout_refuses_bias_changes(unet_student, tmp_path):
    with pytest.raises(ExportError, match="kohya layout has no LoRA bias"):
        export_student(unet_student, tmp_path / "k", "lora", rank=4, lora_layout="kohya")


ORIGINAL_CHILD = r"""
import json
import sys
sys.modules["diffdistill"] = None  # plain diffusers only
import diffusers
import torch

# diffusers' Flux reader splits single_blocks.N.linear1 (q, k, v, MLP input) at FLUX.1's width, 3072, which it has
# written in; the tiny Flux is 16 wide. Only that split is taken at the file's own width, in the same proportions
# (q, k, v one width each, the MLP input four) and order; the rest is diffusers' reader as released.
split = torch.split
def split_at_own_width(tensor, sizes, dim=0):
    if isinstance(sizes, (list, tuple)) and tuple(sizes) == (3072, 3072, 3072, 12288) and tensor.shape[dim] != sum(sizes):
        width = tensor.shape[dim] // 7
        sizes = (width, width, width, 4 * width)
    return split(tensor, sizes, dim)
torch.split = split_at_own_width

def largest_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

for kind, label, cls, single, reference, config in json.loads(sys.argv[1]):
    if kind == "pipeline":  # the whole checkpoint against the folder export
        loaded = getattr(diffusers, cls).from_single_file(single, config=config, local_files_only=True)
        exported = diffusers.DiffusionPipeline.from_pretrained(reference)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            if getattr(exported, name, None) is None:
                continue
            a, b = getattr(loaded, name).state_dict(), getattr(exported, name).state_dict()
            extra = set(b) - set(a)  # the folder's UNet adds a zero guidance embedding that switches CFG off in diffusers
            assert set(a) <= set(b) and all("cond_proj" in k for k in extra), (name, sorted(extra)[:3])
            print(label, name, largest_difference(a, b))
    else:  # a transformer alone against its diffusers-format weights
        model = getattr(diffusers, cls)
        a = model.from_single_file(single, config=config, subfolder="transformer", local_files_only=True).state_dict()
        b = model.from_pretrained(reference, subfolder="transformer").state_dict()
        assert set(a) == set(b), (label, sorted(set(a) ^ set(b))[:3])
        print(label, "transformer", largest_difference(a, b))
"""
ORIGINAL_PREFIXES = {
    "StableDiffusionPipeline": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."),
    "StableDiffusionXLPipeline": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                                  "conditioner.embedders.1.model."),
}
FLOW = ["method.timesteps=[1.0,0.75]"]  # a flow schedule's t is in [0, 1]


def weightless(folder: Path, out: Path) -> str:
    """A copy of a model folder without its weights, so every tensor diffusers loads comes from our file."""
    return str(shutil.copytree(folder, out, ignore=shutil.ignore_patterns("*.safetensors")))


def original_and_folder(run, teacher_dir, pipeline: str, out: Path) -> list[str]:
    """Both exports of ``run`` and a weight-less copy of its teacher folder: the child's arguments for one pipeline."""
    info = export_run(run, out / "student.safetensors", "original")
    assert info["sampling"]["timesteps"] == [999, 749, 499, 249]
    keys = set(load_file(str(out / "student.safetensors")))
    assert all(k.startswith(ORIGINAL_PREFIXES[pipeline]) for k in keys), sorted(keys)[:5]
    export_run(run, out / "folder")
    return ["pipeline", pipeline, pipeline, str(out / "student.safetensors"), str(out / "folder"), weightless(teacher_dir, out / "configs")]


def transformer_job(label: str, model, out: Path, single: Path | None = None) -> list[str]:
    """``model`` in diffusers' format (the reference) and in the reference layout (our mapping, unless ``single`` is
    the file an export wrote): the child's arguments for one transformer."""
    model.save_pretrained(out / "reference" / "transformer")
    if single is None:
        single = out / "transformer.safetensors"
        save_file(transformer_to_original(model), str(single))
    return ["model", label, type(model).__name__, str(single), str(out / "reference"), weightless(out / "reference", out / "configs")]


def randomized(model):
    """Every parameter drawn at random: diffusers starts norms at one and some biases at zero, where a swapped
    pair (q/k norms, shift/scale biases) would read back unchanged."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


@pytest.fixture(scope="module")
def original_read_back(runs, tmp_path_factory, tiny_unet_dir):
    """Every --format original layout read back by diffusers' from_single_file in one child process: SD1.5 and SDXL
    pipelines against the folder export; an SD3 student's transformer; our mapping of an SD3.5-shaped transformer
    (qk norms, a dual-attention layer, two blocks) and of Flux with and without its guidance input.
    Returns the files by label, ``{(label, component): largest difference}`` and the SD3 export's summary."""
    from diffdistill.backbones.tiny import write_tiny_pipeline

    root = tmp_path_factory.mktemp("original")
    sdxl = train(load_recipe(RECIPE, [f"out={root / 'sdxl-run'}", *FAST, "teacher=tiny:sdxl"]))
    sd3 = train(load_recipe(RECIPE, [f"out={root / 'sd3-run'}", *FAST, *FLOW, "teacher=tiny:sd3"]))
    sd3_info = export_run(sd3, root / "sd3.safetensors", "original")
    flux = train(load_recipe(RECIPE, [f"out={root / 'flux-run'}", *FAST, *FLOW, "teacher=tiny:flux"]))  # drops its guidance input
    export_run(flux, root / "flux-student.safetensors", "original")
    jobs = [original_and_folder(runs["unet"], tiny_unet_dir, "StableDiffusionPipeline", root / "sd"),
            original_and_folder(sdxl, write_tiny_pipeline(root / "sdxl-teacher", "sdxl"), "StableDiffusionXLPipeline", root / "xl"),
            transformer_job("sd3", load_student(sd3).backbone, root / "sd3", root / "sd3.safetensors"),
            transformer_job("flux-student", load_student(flux).backbone, root / "flux-student", root / "flux-student.safetensors")]
    sd35 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                                 pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
    jobs.append(transformer_job("sd35", randomized(sd35), root / "sd35"))
    for guidance in (True, False):  # FLUX.1-dev embeds a guidance scale, FLUX.1-schnell does not
        flux = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                                      num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                      guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
        label = "flux-dev" if guidance else "flux-schnell"
        jobs.append(transformer_job(label, randomized(flux), root / label))
    out = subprocess.run([sys.executable, "-c", ORIGINAL_CHILD, json.dumps(jobs)], check=False, capture_output=True, text=True,
                         cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = {tuple(line.split()[:2]): float(line.split()[2]) for line in out.stdout.splitlines()}
    return {job[1]: load_file(job[3]) for job in jobs}, diffs, sd3_info


def test_sd_and_sdxl_original_layout_loads_with_from_single_file_as_the_folder_export(original_read_back):
    """SD1.5 and SDXL (label_emb, the CLIP-L encoder in transformers' layout, the bigG one in OpenCLIP's)."""
    files, diffs, _ = original_read_back
    pipelines = {k: d for k, d in diffs.items() if k[0].startswith("StableDiffusion")}
    assert sorted(pipelines) == [("StableDiffusionPipeline", n) for n in ("text_encoder", "unet", "vae")] + [
        ("StableDiffusionXLPipeline", n) for n in ("text_encoder", "text_encoder_2", "unet", "vae")]
    assert all(d <= 1e-4 for d in pipelines.values()), pipelines
    xl = files["StableDiffusionXLPipeline"]
    assert xl["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 68  # pooled 20 + six size ids x 8
    assert xl["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 20, 20)


def test_sd3_and_flux_transformers_load_with_from_single_file_exactly(original_read_back):
    """The SD3 and Flux students' files, and our mapping of SD3.5 and Flux (fused q, k, v; Flux's fused single-block input;
    the swapped shift/scale of the final layer and of SD3's last text stream) read back bit for bit."""
    files, diffs, sd3_info = original_read_back
    labels = ("sd3", "sd35", "flux-dev", "flux-schnell", "flux-student")
    transformers = {label: d for (label, _), d in diffs.items() if label in labels}
    assert transformers == dict.fromkeys(labels, 0.0), transformers
    assert sd3_info["contents"] == "transformer" and sd3_info["sampling"]["timesteps"] == [1.0, 0.75]  # a flow student's sigmas
    assert "Load Diffusion Model" in _summary(sd3_info)
    sd3, sd35 = files["sd3"], files["sd35"]
    assert all(k.startswith("model.diffusion_model.") for k in [*sd3, *sd35])  # the transformer alone, Stability's prefix
    assert sd3["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape == (3 * 16, 16)
    assert "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight" in sd35
    assert "model.diffusion_model.joint_blocks.1.x_block.attn2.qkv.weight" not in sd35
    assert not any(k.startswith("model.") for k in [*files["flux-dev"], *files["flux-schnell"]])  # bare, as BFL ship Flux
    assert files["flux-dev"]["single_blocks.1.linear1.weight"].shape == (3 * 16 + 4 * 16, 16)
    assert "guidance_in.in_layer.weight" in files["flux-dev"] and "guidance_in.in_layer.weight" not in files["flux-schnell"]
    assert "guidance_in.in_layer.weight" not in files["flux-student"]  # a tiny:flux (dev-shaped) student, its guidance folded in


def test_original_refuses_transformers_without_a_reference_layout(runs, tmp_path):
    with pytest.raises(ExportError, match="SD1.5/2.x and SDXL checkpoints and the SD3/SD3.5 and Flux transformers; DiTPipeline"
                                          ".*--format diffusers or single-file"):
        export_run(runs["dit"], tmp_path / "dit.safetensors", "original")


def test_export_takes_the_ema_weights_unless_told_not_to(tmp_path):
    run = train(load_recipe(RECIPE, [f"out={tmp_path / 'run'}", *FAST, "max_steps=4", "ema_decay=0.5"]))
    folder = next((run / "checkpoints").glob("step-*"))
    saved = {kind: load_file(str(folder / f"{kind}-generator.safetensors")) for kind in ("ema", "net")}
    assert any(not torch.equal(saved["ema"][k], saved["net"][k]) for k in saved["net"])  # the EMA is not the raw net
    for ema, kind in ((None, "ema"), (False, "net")):
        student = load_student(run, ema=ema)
        weights = student.backbone.state_dict()
        assert all(torch.equal(weights[k[len("backbone."):]], v) for k, v in saved[kind].items()), kind
