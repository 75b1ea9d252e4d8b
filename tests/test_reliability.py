"""Nothing lost: one owner per run folder, checkpoints that fall back instead of restarting,
resumes that name what changed, signals that stop with a checkpoint, SIGKILL at any moment."""

import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from diffdistill import cli
from diffdistill.config import ConfigError, load_recipe
from diffdistill.engine import checkpoint as ckpt
from diffdistill.engine.manifest import verify
from diffdistill.engine.run_folder import RunFolderLock
from diffdistill.engine.trainer import TrainingInterrupted
from diffdistill.run import build_trainer, train

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "sft.yaml"
FAST = ["sample_every=0", "log_every=1", "batch_size=4", "keep_checkpoints=3"]


def cfg(run, *overrides):
    return load_recipe(RECIPE, [f"out={run}", *FAST, *overrides])


def step_dirs(run) -> list[str]:
    return sorted(p.name for p in (Path(run) / "checkpoints").glob("step-*"))


def metric_steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def weights(run, step) -> dict:
    return load_file(str(Path(run) / "checkpoints" / f"step-{step:08d}" / "net-generator.safetensors"))


def _hold_lock(run, ready):
    RunFolderLock(run).acquire()
    ready.set()
    time.sleep(60)


def test_a_locked_run_folder_refuses_a_second_training_and_a_killed_owner_leaves_no_lock(tmp_path, capsys):
    ready = multiprocessing.get_context("fork").Event()
    owner = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(tmp_path, ready))
    owner.start()
    try:
        assert ready.wait(20)
        code = cli.main(["train", str(RECIPE), f"out={tmp_path}", *FAST, "max_steps=1"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err[-1].startswith(f"error: {tmp_path} is locked by process {owner.pid} on {socket.gethostname()}")
        assert "Traceback" not in "".join(err) and not (tmp_path / "config.yaml").exists()  # nothing written
    finally:
        os.kill(owner.pid, signal.SIGKILL)
        owner.join()
    train(cfg(tmp_path, "max_steps=1"))  # the kernel dropped the dead owner's lock
    assert step_dirs(tmp_path) == ["step-00000001"]


def test_pruning_keeps_the_new_checkpoint_among_higher_numbered_old_ones(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    for step in (8, 10, 2, 4):  # an old run's 8 and 10, then a new run from step 0
        ckpt.save_checkpoint(tmp_path, step, {"g": model}, {}, {"g": opt}, {}, keep=2)
        assert ckpt.latest_checkpoint(tmp_path).name == f"step-{step:08d}"
    assert step_dirs(tmp_path) == ["step-00000004", "step-00000010"]


def test_lost_latest_and_state_json_fall_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    train(cfg(tmp_path, "max_steps=6", "checkpoint_every=2"))
    (tmp_path / "checkpoints" / "latest").unlink()
    (tmp_path / "checkpoints" / "step-00000006" / "state.json").unlink()
    capsys.readouterr()
    train(cfg(tmp_path, "max_steps=8", "checkpoint_every=2"))
    out = capsys.readouterr()
    assert "step-00000006 is damaged (state.json is missing)" in out.err
    assert f"resuming from step 4 (checkpoint {tmp_path / 'checkpoints' / 'step-00000004'})" in out.out
    assert (tmp_path / "checkpoints" / "damaged-step-00000006" / "net-generator.safetensors").is_file()  # kept aside
    assert metric_steps(tmp_path) == list(range(1, 9))


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, capsys, damage):
    train(cfg(tmp_path, "max_steps=4", "checkpoint_every=2"))
    target = tmp_path / "checkpoints" / "step-00000004" / "net-generator.safetensors"
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    trainer = build_trainer(cfg(tmp_path, "max_steps=4", "checkpoint_every=2"))
    assert trainer.resume() == 2
    assert "step-00000004 is damaged" in capsys.readouterr().err
    assert step_dirs(tmp_path) == ["step-00000002"] and (tmp_path / "checkpoints" / "damaged-step-00000004").is_dir()
    assert verify(tmp_path / "checkpoints" / "step-00000002") is None


def test_no_verifying_checkpoint_refuses_instead_of_restarting_from_zero(tmp_path):
    train(cfg(tmp_path, "max_steps=2", "checkpoint_every=2"))
    (tmp_path / "checkpoints" / "step-00000002" / "net-generator.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="no checkpoint in .* verifies.*resume=false"):
        train(cfg(tmp_path, "max_steps=4"))
    assert (tmp_path / "checkpoints" / "damaged-step-00000002").is_dir() and metric_steps(tmp_path) == [1, 2]


def test_resume_applies_a_new_lr_prints_and_records_it(tmp_path, capsys):
    train(cfg(tmp_path, "max_steps=2", "checkpoint_every=2"))
    capsys.readouterr()
    train(cfg(tmp_path, "max_steps=3", "optim.lr=0.5"))
    printed = capsys.readouterr().out
    assert "optim.lr changed: 0.0001 -> 0.5" in printed and "max_steps changed: 2 -> 3" in printed
    history = [json.loads(line) for line in (tmp_path / "config-history.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 2 and history[-1]["changes"]["optim.lr"] == [0.0001, 0.5]
    assert "lr: 0.5" in (tmp_path / "config.yaml").read_text()


def test_resume_refuses_a_new_batch_size_or_method_option_listing_each(tmp_path):
    train(cfg(tmp_path, "max_steps=2", "checkpoint_every=2"))
    before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError) as refused:
        build_trainer(cfg(tmp_path, "max_steps=4", "batch_size=8", "method.sample_steps=5")).fit()
    assert "batch_size: 4 -> 8" in str(refused.value) and "method.sample_steps: 10 -> 5" in str(refused.value)
    assert (tmp_path / "config.yaml").read_text() == before  # written only after the check passes


def test_max_steps_below_the_checkpoint_is_refused(tmp_path):
    train(cfg(tmp_path, "max_steps=4", "checkpoint_every=2"))
    with pytest.raises(ConfigError, match="max_steps=3 is below step 4"):
        train(cfg(tmp_path, "max_steps=3"))


def test_metrics_hold_no_duplicate_steps_after_a_resume(tmp_path):
    train(cfg(tmp_path, "max_steps=5", "checkpoint_every=2"))  # checkpoints 2, 4, 5
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000005")  # as if killed after logging step 5, before its checkpoint
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss')  # and mid-row
    train(cfg(tmp_path, "max_steps=6", "checkpoint_every=2"))
    assert metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_resume_false_moves_the_old_checkpoints_aside(tmp_path):
    train(cfg(tmp_path, "max_steps=4", "checkpoint_every=2"))
    old = weights(tmp_path, 4)
    train(cfg(tmp_path, "max_steps=2", "checkpoint_every=2", "resume=false", "seed=1"))
    (aside,) = tmp_path.glob("checkpoints.old-*")
    assert sorted(p.name for p in aside.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert all(torch.equal(old[k], v) for k, v in load_file(str(aside / "step-00000004" / "net-generator.safetensors")).items())
    assert step_dirs(tmp_path) == ["step-00000002"] and metric_steps(tmp_path) == [1, 2]


def _signal_after_rows(run, signum, rows):
    """Sends ``signum`` to this process once ``rows`` metric rows are logged (training is under way)."""
    def send():
        while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < rows:
            time.sleep(0.02)
        os.kill(os.getpid(), signum)
    threading.Thread(target=send, daemon=True).start()


def test_sigint_stops_with_a_checkpoint_at_that_step_and_a_rerun_resumes_from_it(tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a worker that ignores it
    _signal_after_rows(tmp_path, signal.SIGINT, 2)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg(tmp_path, "max_steps=1000", "checkpoint_every=1000"))
    assert stopped.value.exit_code == 130
    step = int(str(stopped.value).split("after step ")[1].split()[0])
    assert step >= 2 and step_dirs(tmp_path) == [f"step-{step:08d}"] and str(tmp_path / "checkpoints" / f"step-{step:08d}") in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is before  # put back
    train(cfg(tmp_path, f"max_steps={step + 1}", "checkpoint_every=1000"))
    assert f"resuming from step {step}" in capsys.readouterr().out
    assert metric_steps(tmp_path) == list(range(1, step + 2))


def test_sigterm_through_the_cli_is_one_line_and_exit_143(tmp_path, capsys):
    _signal_after_rows(tmp_path, signal.SIGTERM, 1)
    code = cli.main(["train", str(RECIPE), f"out={tmp_path}", *FAST, "max_steps=1000", "checkpoint_every=1000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 143 and err[-1].startswith("SIGTERM: stopped after step") and "Traceback" not in "".join(err)


def _train_in_child(run, overrides):
    train(cfg(run, *overrides))


def _rows(run) -> int:
    path = Path(run) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigkill_at_random_moments_of_checkpoint_writes_resumes_to_the_same_weights(tmp_path):
    """Every step writes a checkpoint just after logging its row, so a kill a random fraction of a
    step after row N lands in step N's checkpoint write or step N+1's work. Each relaunch finds
    complete checkpoints only, and the last ends where an uninterrupted run does, bit for bit."""
    args = ["max_steps=12", "checkpoint_every=1", "keep_checkpoints=2"]
    straight = train(cfg(tmp_path / "straight", *args))
    run, fork, rand = tmp_path / "killed", multiprocessing.get_context("fork"), random.Random(0)
    reached = []
    for rows in (2, 4, 6, 8):
        child = fork.Process(target=_train_in_child, args=(run, args))  # forked: no interpreter start-up per launch
        child.start()
        while _rows(run) < rows and child.is_alive():
            time.sleep(0.005)
        time.sleep(rand.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL  # killed mid-run, not after it ended
        complete = ckpt.complete_checkpoints(run / "checkpoints")
        assert all(verify(p) is None for p in complete)
        reached.append(ckpt.checkpoint_step(complete[-1]) if complete else 0)
    assert reached == sorted(reached) and 0 < reached[0] and reached[-1] < 12, reached  # progress kept, never lost
    train(cfg(run, *args))
    for name in ("net-generator", "ema-generator", "optim-generator", "rng"):
        a, b = (load_file(str(r / "checkpoints" / "step-00000012" / f"{name}.safetensors")) for r in (straight, run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert metric_steps(run) == list(range(1, 13))


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_with_its_checkpoint(tmp_path):
    """Only rank 1 is signalled: the stop is one all-reduce, so rank 0 stops after the same step, the
    checkpoint of that step is written whole, and a relaunch resumes from it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561", "-m", "diffdistill.cli", "train",
              str(RECIPE), f"out={tmp_path}", *FAST, "checkpoint_every=1000"]
    launcher = subprocess.Popen([*launch, "max_steps=1000"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while _rows(tmp_path) < 2 and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    workers = sorted(psutil.Process(launcher.pid).children(recursive=True), key=lambda p: p.pid)
    rank1 = [w for w in workers if "LOCAL_RANK" in w.environ() and w.environ()["LOCAL_RANK"] == "1"]
    assert len(rank1) == 1, [w.cmdline() for w in workers]
    rank1[0].send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=300)
    stopped = [line for line in err.splitlines() if "SIGTERM: stopped after step" in line]
    assert stopped, err[-3000:]
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert step >= 2 and step_dirs(tmp_path) == [f"step-{step:08d}"] and verify(tmp_path / "checkpoints" / f"step-{step:08d}") is None
    assert metric_steps(tmp_path)[-1] == step  # rank 0 logged that step and stopped there too
    resumed = subprocess.run([*launch, f"max_steps={step + 1}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0 and f"resuming from step {step}" in resumed.stdout, resumed.stderr[-3000:]
    assert metric_steps(tmp_path) == list(range(1, step + 2))
