"""Every expected failure of the command line is one ``error:`` line naming the key or file, exit code 2;
Ctrl-C is one ``interrupted`` line, exit 130; a traceback only under --debug or DIFFDISTILL_DEBUG=1.
Also what the commands report: an export's --overwrite, a reused quickstart run, bf16 without CUDA.
The eval side (``--num``, prompts, the image cache) is in tests/test_eval_coco.py."""

import errno
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError

import diffdistill.run
from diffdistill.cli import main
from diffdistill.export import EXPORT_MARKER, clear_stale, export_student, staged

RECIPE = "recipes/tiny/sft.yaml"


def fails_with_one_line(capsys, argv) -> str:
    """Runs the CLI, asserts exit code 2 and a single ``error:`` line with no traceback; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


# ---------------------------------------------------------------- the recipe


def test_bad_yaml_in_the_recipe_names_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("max_steps: 3\nmethod: {name: sft\n")
    line = fails_with_one_line(capsys, ["train", str(recipe)])
    assert "bad.yaml" in line and "not valid YAML" in line and "line" in line


def test_bad_yaml_in_an_override_names_the_key(capsys):
    line = fails_with_one_line(capsys, ["train", RECIPE, "data.prompts=[a, b"])
    assert "data.prompts" in line and "quote it" in line


def test_a_non_utf8_recipe_and_an_empty_one_are_named(tmp_path, capsys):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("out: runs/caf\xe9\n".encode("latin-1"))
    line = fails_with_one_line(capsys, ["train", str(latin1)])
    assert "latin1.yaml" in line and "not UTF-8" in line
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    line = fails_with_one_line(capsys, ["train", str(empty)])
    assert "empty.yaml" in line and "is empty" in line


@pytest.mark.parametrize("override, allowed", [
    ("max_steps=-1", ">= 1"), ("max_steps=0", ">= 1"), ("checkpoint_every=0", ">= 1"), ("log_every=0", ">= 1"),
    ("keep_checkpoints=0", ">= 1"), ("grad_accum=0", ">= 1"), ("sample_every=-1", ">= 0"),
    ("ema_decay=2.0", "in [0, 1)"), ("ema_decay=1", "in [0, 1)"), ("ema_decay=-0.1", "in [0, 1)"),
    ("optim.lr=-1e-4", "> 0"), ("optim.lr=0", "> 0"), ("critic_optim.lr=0", "> 0"), ("optim.betas=[0.9,1.0]", "in [0, 1)"),
    ("optim.weight_decay=-0.01", ">= 0"), ("optim.grad_clip=-1", ">= 0"), ("optim.warmup_steps=-5", ">= 0"),
    ("time_limit_minutes=-1", ">= 0"), ("data.uncond_prob=1.5", "in [0, 1]"),
])
def test_numeric_keys_out_of_their_domain_are_refused(override, allowed, capsys):
    key = override.split("=")[0]
    line = fails_with_one_line(capsys, ["train", RECIPE, override])
    assert f"error: {key}=" in line and allowed in line


def test_batch_size_zero_is_refused(capsys):
    assert "batch_size=0" in fails_with_one_line(capsys, ["train", RECIPE, "batch_size=0"])


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    line = fails_with_one_line(capsys, ["train", RECIPE, f"out={taken}"])
    assert "notes.txt" in line and "is a file" in line and taken.read_text() == "mine"


# ---------------------------------------------------------------- the teacher's files


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffdistill.backbones.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("teacher") / "pipe", "unet", 0)


def copy_pipeline(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_a_text_file_teacher_is_not_called_a_pickle(tmp_path, capsys):
    teacher = tmp_path / "teacher.txt"
    teacher.write_text("not weights")
    line = fails_with_one_line(capsys, ["train", RECIPE, f"teacher={teacher}", f"out={tmp_path / 'run'}"])
    assert "teacher.txt" in line and "is a pickle checkpoint" not in line and "pipeline folder" in line and ".safetensors" in line


def test_a_malformed_model_index_is_named(tiny_pipeline, tmp_path, capsys):
    teacher = copy_pipeline(tiny_pipeline, tmp_path / "pipe")
    (teacher / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"],')
    line = fails_with_one_line(capsys, ["train", RECIPE, f"teacher={teacher}", f"out={tmp_path / 'run'}"])
    assert "model_index.json" in line and "not valid JSON" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights_name_the_file(damage, tiny_pipeline, tmp_path, capsys):
    teacher = copy_pipeline(tiny_pipeline, tmp_path / "pipe")
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 4096, "empty": b""}[damage])
    line = fails_with_one_line(capsys, ["train", RECIPE, f"teacher={teacher}", f"out={tmp_path / 'run'}"])
    assert "diffusion_pytorch_model.safetensors" in line and "is a damaged .safetensors file" in line and "re-download" in line


# ---------------------------------------------------------------- the machine: disk, permissions, Ctrl-C


@pytest.mark.parametrize("failure, words", [
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/step-1"), ["No space left", "runs/x", "free some space"]),
    (PermissionError(errno.EACCES, "Permission denied", "runs/x/config.yaml"), ["Permission denied", "runs/x/config.yaml", "writable"]),
    (OSError(errno.EROFS, "Read-only file system", "runs/x"), ["Read-only", "runs/x", "writable folder"]),
    (SafetensorError("Error while serializing: IoError(No space left on device)"), ["safetensors", "No space left", "free space"]),
])
def test_disk_and_permission_failures_are_one_line(failure, words, monkeypatch, capsys):
    def fail(cfg, evaluator=None):
        raise failure

    monkeypatch.setattr(diffdistill.run, "train", fail)
    line = fails_with_one_line(capsys, ["train", RECIPE])
    assert all(word in line for word in words), line


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(cfg, evaluator=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffdistill.run, "train", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:  # Python callers still see Ctrl-C as Ctrl-C ...
        main(["train", RECIPE])
    assert isinstance(stopped.value, SystemExit) and stopped.value.code == 130  # ... the shell sees 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_ctrl_c_as_a_program_prints_no_traceback(tmp_path):
    script = ("import diffdistill.run, diffdistill.cli\n"
              "def stop(cfg, evaluator=None): raise KeyboardInterrupt\n"
              "diffdistill.run.train = stop\n"
              f"raise SystemExit(diffdistill.cli.main(['train', {RECIPE!r}]))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 130 and out.stderr.strip().splitlines()[-1] == "interrupted" and "Traceback" not in out.stderr


def test_traceback_only_under_debug(monkeypatch, capsys):
    argv = ["train", RECIPE, "log_every=0"]
    fails_with_one_line(capsys, argv)
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: log_every=0")
    monkeypatch.setenv("DIFFDISTILL_DEBUG", "1")
    assert main(argv) == 2 and "Traceback" in capsys.readouterr().err


def test_a_refusal_raised_as_systemexit_exits_2_with_one_error_line(tmp_path, capsys):
    out = tmp_path / "t"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(SystemExit) as refused:
        main(["tiny-sd", str(out)])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {out} exists and is not empty; pass --overwrite to replace it"]


# ---------------------------------------------------------------- export


def fake_student(run_dir):
    return SimpleNamespace(run_dir=run_dir, timesteps=[999], checkpoint=run_dir / "checkpoints" / "step-1", ema=False, default_steps=None, experts=None,
                           deterministic=False)


@pytest.fixture
def fake_writer(monkeypatch):
    from diffdistill import export

    def write(student, tmp, steps, name=None, scheduler=None):
        tmp.mkdir(parents=True)
        (tmp / "model_index.json").write_text("{}")
        return {"format": "diffusers", "steps": steps}

    monkeypatch.setattr(export, "write_diffusers", write)


def test_overwrite_replaces_only_a_previous_export(tmp_path, fake_writer, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    line = fails_with_one_line(capsys, ["export", str(run_dir), "--to", str(out), "--overwrite"])
    assert "out" in line and EXPORT_MARKER in line and (out / "notes.txt").read_text() == "my notes"

    fresh = tmp_path / "fresh"
    export_student(fake_student(run_dir), fresh)
    assert (fresh / EXPORT_MARKER).is_file()  # every export carries its marker ...
    (fresh / "model_index.json").write_text("old")
    export_student(fake_student(run_dir), fresh, overwrite=True)  # ... so a previous export is replaced
    assert (fresh / "model_index.json").read_text() == "{}" and (fresh / EXPORT_MARKER).is_file()


def a_dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_killed_export_leaves_nothing_for_good(tmp_path, fake_writer):
    out, pid = tmp_path / "out", a_dead_pid()
    half = tmp_path / f".out.tmp-{pid}"  # what an export killed while writing leaves
    (half / "unet").mkdir(parents=True)
    export_student(fake_student(tmp_path / "run"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # killed between moving the previous export aside and moving the new one in: the previous one comes back
    out.rename(tmp_path / f".out.old-{pid}")
    (tmp_path / f".out.tmp-{pid}").mkdir()
    clear_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / EXPORT_MARKER).is_file()


def test_a_live_exports_temporary_folder_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with staged(out) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
        live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            other = tmp_path / f".out.tmp-{live.pid}"
            other.mkdir()
            clear_stale(out)
            assert other.is_dir() and tmp.is_dir()
        finally:
            live.kill()
            live.wait()


# ---------------------------------------------------------------- what is reported


def test_a_reused_quickstart_run_reports_no_training_and_keeps_its_time(tmp_path):
    from diffdistill.zoo.quickstart import training_record, training_summary

    (tmp_path / "results.json").write_text(json.dumps({"train_seconds": 534.0, "train_steps": 1800}))
    record = training_record(tmp_path, 5.08, steps_this_run=0)
    assert record["train_seconds"] == 534.0 and record["train_steps_this_run"] == 0 and record["train_reused"]
    summary = training_summary({"train_steps": 1800, "run_dir": "runs/q/run", **record})
    assert "reused" in summary and "534 s" in summary and "5 s" not in summary

    fresh = training_record(tmp_path, 12.0, steps_this_run=1800)
    assert training_summary({"train_steps": 1800, "run_dir": "r", **fresh}) == "trained 1800 steps in 12 s"
    resumed = training_record(tmp_path, 3.0, steps_this_run=300)
    assert "resumed at step 1500" in training_summary({"train_steps": 1800, "run_dir": "r", **resumed})


def test_quickstart_counts_only_the_steps_it_trains(tmp_path, monkeypatch):
    from diffdistill.zoo import quickstart

    monkeypatch.setattr(quickstart, "train", lambda cfg, evaluator=None: cfg.out)
    monkeypatch.setattr(quickstart, "finished_step", lambda run_dir: 40)
    assert quickstart.distill("dmd2", tmp_path / "run", ["max_steps=40"])[2] == 0
    assert quickstart.distill("dmd2", tmp_path / "run", ["max_steps=50"])[2] == 10
    assert quickstart.distill("dmd2", tmp_path / "run", ["max_steps=50", "resume=false"])[2] == 50


def test_mixed_precision_without_cuda_is_announced_once(capsys):
    from diffdistill.config import TrainConfig
    from diffdistill.run import announce_precision_without_gpu

    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    announce_precision_without_gpu(TrainConfig(mixed_precision="bf16"), cpu)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mixed_precision=bf16" in err[0] and "without CUDA" in err[0]
    announce_precision_without_gpu(TrainConfig(mixed_precision="no"), cpu)
    announce_precision_without_gpu(TrainConfig(mixed_precision="bf16"), SimpleNamespace(device=cpu.device, is_main_process=False))
    announce_precision_without_gpu(TrainConfig(mixed_precision="bf16"), SimpleNamespace(device=torch.device("cuda"), is_main_process=True))
    assert capsys.readouterr().err == ""
