"""Export: the diffusers folder samples exactly like diffdistill (checked in a process that cannot
import diffdistill), the LoRA loads with load_lora_weights and reproduces the student within its
reported error, the single file round-trips, and bad input fails with errors naming the fix."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plain_diffusers import run_plain
from safetensors.torch import load_file

from diffdistill.config import load_recipe
from diffdistill.export import ExportError, export_run, export_student, load_student
from diffdistill.export.diffusers_folder import reference_output
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
import sys
sys.modules["diffdistill"] = None  # plain diffusers only
from diffusers import DiffusionPipeline, StableDiffusionPipeline

single, folder, config = sys.argv[1:4]
loaded = StableDiffusionPipeline.from_single_file(single, config=config, local_files_only=True)
exported = DiffusionPipeline.from_pretrained(folder)
for name in ("unet", "vae", "text_encoder"):
    a, b = getattr(loaded, name).state_dict(), getattr(exported, name).state_dict()
    extra = set(b) - set(a)  # the folder's UNet adds a zero guidance embedding that switches CFG off in diffusers
    assert set(a) <= set(b) and all("cond_proj" in k for k in extra), (name, sorted(extra)[:3])
    print(name, max((a[k].float() - b[k].float()).abs().max().item() for k in a))
"""


def test_original_layout_loads_with_from_single_file_as_the_folder_export(runs, tmp_path, tiny_unet_dir):
    info = export_run(runs["unet"], tmp_path / "student.safetensors", "original")
    assert info["sampling"]["timesteps"] == [999, 749, 499, 249]
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for k in load_file(str(tmp_path / "student.safetensors")))
    export_run(runs["unet"], tmp_path / "folder")
    out = subprocess.run([sys.executable, "-c", ORIGINAL_CHILD, str(tmp_path / "student.safetensors"), str(tmp_path / "folder"),
                          str(tiny_unet_dir)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diffs = dict(line.split() for line in out.stdout.splitlines())
    assert sorted(diffs) == ["text_encoder", "unet", "vae"] and all(float(d) == 0.0 for d in diffs.values()), diffs
    with pytest.raises(ExportError, match="original"):
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
