"""Quality during training (``eval_every``): rows, curve, the ``best`` checkpoint, export of it, resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffdistill import cli
from diffdistill.config import ConfigError, load_recipe
from diffdistill.engine.checkpoint import best_checkpoint
from diffdistill.eval import MissingWeightsError
from diffdistill.eval.fid import INCEPTION_ENV, TORCHSCRIPT_FILE, InceptionFeatureExtractor, frechet_distance, load_statistics
from diffdistill.eval.inception import write_random_torchscript_inception
from diffdistill.eval.protocol import extract_features
from diffdistill.export import export_run
from diffdistill.quality import evaluator_for
from diffdistill.run import build_trainer, train

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "tiny" / "dmd2.yaml"
FAST = ["sample_every=0", "log_every=1", "batch_size=4", "method.ratio=1", "ema_decay=0.9", "checkpoint_every=1000", "keep_checkpoints=1"]


class ScriptedQuality:
    """A metric whose values are given in advance (so which evaluation is best is known), and that
    records what it was shown."""

    metric, lower_is_better = "score", True

    def __init__(self, values):
        self.values, self.prompts, self.seen = list(values), ["a digit 1", "a digit 7"], []

    def __call__(self, samples):
        self.seen.append(samples.clone())
        return {"score": self.values.pop(0), "brightness": float(samples.mean())}

    def reference(self):
        return {"score": 1.5}


def eval_rows(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("phase") == "eval"]


def test_eval_every_logs_rows_draws_the_curve_keeps_the_best_and_exports_it(tmp_path):
    run = tmp_path / "run"
    quality = ScriptedQuality([3.0, 1.0, 2.0])
    train(load_recipe(RECIPE, [f"out={run}", "max_steps=6", "eval_every=2", *FAST]), quality)
    rows = eval_rows(run)
    assert [(r["step"], r["score"]) for r in rows] == [(2, 3.0), (4, 1.0), (6, 2.0)]
    assert all(r["train_seconds"] > 0 for r in rows) and rows[0]["train_seconds"] < rows[-1]["train_seconds"]
    assert (run / "quality.png").stat().st_size > 10_000
    assert json.loads((run / "quality-reference.json").read_text())["values"] == {"score": 1.5}
    # the best evaluation's checkpoint is kept beside latest, although keep_checkpoints=1 prunes the rest
    assert best_checkpoint(run).name == "step-00000004"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]
    saved = json.loads((run / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert saved["quality"]["score"] == 1.0
    # every evaluation sampled the same prompts from the same noise, as images in [-1, 1]
    assert all(s.shape == quality.seen[0].shape and s.min() >= -1 and s.max() <= 1 for s in quality.seen)
    assert not torch.equal(quality.seen[0], quality.seen[1])  # ... of a generator that trained in between

    info = export_run(run, tmp_path / "best", "diffusers", checkpoint="best")
    assert info["checkpoint"].endswith("step-00000004") and info["ema"]
    exported = load_file(str(tmp_path / "best" / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(run / "checkpoints" / "step-00000004" / "ema-generator.safetensors"))
    assert all(torch.equal(exported[k.removeprefix("backbone.")], v) for k, v in ema.items())


def test_a_resumed_run_continues_the_curve_and_keeps_ranking_against_the_saved_best(tmp_path):
    run = tmp_path / "run"
    train(load_recipe(RECIPE, [f"out={run}", "max_steps=4", "eval_every=2", *FAST]), ScriptedQuality([2.0, 1.0]))
    first = eval_rows(run)[-1]["train_seconds"]
    # the resumed run's evaluations are worse than the saved best (1.0 at step 4): best stays there
    train(load_recipe(RECIPE, [f"out={run}", "max_steps=8", "eval_every=2", *FAST]), ScriptedQuality([1.5, 1.2]))
    rows = eval_rows(run)
    assert [(r["step"], r["score"]) for r in rows] == [(2, 2.0), (4, 1.0), (6, 1.5), (8, 1.2)]
    assert rows[2]["train_seconds"] > first  # wall time adds up over the resume
    assert best_checkpoint(run).name == "step-00000004"


def test_evaluation_samples_the_ema_and_leaves_the_trained_weights(tmp_path):
    cfg = load_recipe(RECIPE, [f"out={tmp_path}", "max_steps=3", *FAST, "ema_decay=0.999999"])
    trainer = build_trainer(cfg)
    start = trainer.generate(["a digit 3"])
    trainer.fit()
    generator = trainer.method.nets["generator"]
    trained = {k: v.clone() for k, v in generator.state_dict().items()}
    # the EMA (decay ~1) is still the initial generator: its samples are the start's, not the trained net's
    torch.testing.assert_close(trainer.generate(["a digit 3"]), start, atol=1e-4, rtol=0)
    assert all(torch.equal(trained[k], v) for k, v in generator.state_dict().items())
    trainer.emas.clear()  # without an EMA the trained weights are sampled
    assert (trainer.generate(["a digit 3"]) - start).abs().max() > 1e-3


def test_eval_every_without_a_metric_and_best_without_evaluations_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="eval_prompts=FILE"):
        evaluator_for(load_recipe(RECIPE, [f"out={tmp_path}", "eval_every=2"]))
    with pytest.raises(ConfigError, match="eval_every needs a quality metric"):
        build_trainer(load_recipe(RECIPE, [f"out={tmp_path}", "eval_every=2"]))
    train(load_recipe(RECIPE, [f"out={tmp_path / 'run'}", "max_steps=1", *FAST]))
    capsys.readouterr()  # the training's progress bar
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "x"), "--checkpoint", "best"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no best checkpoint" in err and len(err.splitlines()) == 1
    assert cli.main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "x"), "--checkpoint", "7"]) == 2
    assert "step-00000001" in capsys.readouterr().err


def test_digits_runs_rank_by_the_digit_judge_through_the_cli(tmp_path):
    run = tmp_path / "run"
    code = cli.main(["train", str(ROOT / "recipes" / "zoo" / "digits_dmd2.yaml"), f"out={run}", "max_steps=2", "eval_every=2",
                     "eval_samples=20", "batch_size=8", "log_every=1", "sample_every=0"])
    assert code == 0
    row = eval_rows(run)[0]
    assert row["step"] == 2 and row["digit_fid"] > 0 and 0 <= row["prompt_accuracy"] <= 1 and 0 <= row["digits_covered"] <= 10
    teacher = json.loads((run / "quality-reference.json").read_text())["values"]
    assert teacher["digit_fid"] < row["digit_fid"] and teacher["prompt_accuracy"] > 0.8  # the 25-step teacher beats a 2-step student
    assert best_checkpoint(run).name == "step-00000002"


def test_real_teachers_rank_by_fid_on_captions_as_the_eval_harness_scores_the_same_images(tmp_path, monkeypatch):
    """FID-N of in-memory samples equals the eval protocol's on the same images saved as PNG, against the given statistics."""
    monkeypatch.setenv(INCEPTION_ENV, str(write_random_torchscript_inception(tmp_path / TORCHSCRIPT_FILE, seed=0)))
    prompts = tmp_path / "captions.txt"
    prompts.write_text("".join(f"a photo of {n} digits\n" for n in range(12)))
    extractor = InceptionFeatureExtractor.load(tmp_path / TORCHSCRIPT_FILE)
    real = [tmp_path / f"real{i}.png" for i in range(5)]
    for i, path in enumerate(real):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    extract_features(real, extractor).save(tmp_path / "reference.npz", extractor=extractor.describe())
    settings = [f"out={tmp_path / 'run'}", "max_steps=2", "eval_every=2", "eval_samples=4", f"eval_prompts={prompts}",
                f"eval_reference={tmp_path / 'reference.npz'}", *FAST]
    cfg = load_recipe(RECIPE, settings)
    trainer = build_trainer(cfg, evaluator=evaluator_for(cfg))
    trainer.fit()
    logged = eval_rows(tmp_path / "run")[0]["fid"]

    samples = trainer.generate(trainer.evaluator.prompts)  # the same noise and weights as the evaluation at step 2
    saved = []
    for i, image in enumerate(((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        saved.append(tmp_path / f"generated{i}.png")
        Image.fromarray(image).save(saved[-1])
    stats = extract_features(saved, extractor)
    mu, sigma, _, _ = load_statistics(tmp_path / "reference.npz")
    assert logged == pytest.approx(frechet_distance(stats.mean, stats.covariance, mu, sigma), rel=1e-6)
    assert logged > 1.0  # samples of a random tiny teacher against other random images: far apart, not FID(x, x)


def test_real_teacher_evaluation_settings_are_checked_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nowhere.pt"))
    prompts = tmp_path / "captions.txt"
    prompts.write_text("one\ntwo\n")
    base = [f"out={tmp_path}", "eval_every=2", f"eval_prompts={prompts}"]
    with pytest.raises(ConfigError, match="eval_reference=.*does not exist"):
        evaluator_for(load_recipe(RECIPE, [*base, f"eval_reference={tmp_path / 'missing.npz'}", "eval_samples=2"]))
    (tmp_path / "stats.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match="eval_prompts.*3"):  # more samples than captions
        evaluator_for(load_recipe(RECIPE, [*base, f"eval_reference={tmp_path / 'stats.npz'}", "eval_samples=3"]))
    with pytest.raises(MissingWeightsError, match=INCEPTION_ENV):
        evaluator_for(load_recipe(RECIPE, [*base, f"eval_reference={tmp_path / 'stats.npz'}", "eval_samples=2"]))
