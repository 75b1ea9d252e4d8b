"""The COCO side of the evaluation and the whole ``diffdistill eval`` path, offline:
a COCO-format fixture written here, a tiny random Stable Diffusion, a tiny random
CLIP and a random TorchScript Inception. The numbers mean nothing as quality; the plumbing,
the protocol's transforms, the caching and the resuming are what is checked, and each
reported score is recomputed from the features, images and captions the run saved."""

import argparse
import json
import urllib.request

import numpy as np
import pytest
import torch
from cleanfid.fid import kernel_distance
from PIL import Image

from diffdistill.eval import coco, generation, protocol, reference_stats
from diffdistill.eval.clip_score import load_clip_scorer
from diffdistill.eval.fid import TORCHSCRIPT_FILE, TORCHSCRIPT_URL
from diffdistill.eval.inception import write_random_torchscript_inception
from diffdistill.eval.run import add_eval_arguments, protocol_label, run_eval

STEPS, GUIDANCE, RESOLUTION = 2, 2.0, 32


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation tried to download something")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- fixtures


def _tiny_pipeline_writer():
    try:
        from diffdistill.tiny import write_tiny_pipeline
    except ImportError:
        from diffdistill.backbones.tiny import write_tiny_pipeline
    return write_tiny_pipeline


def _tiny_tokenizer(tmp_path):
    """CLIP's byte-level BPE over single characters, loaded with ``from_pretrained`` (in transformers 5.x
    the ``vocab_file=`` / ``merges_file=`` constructor arguments are silently ignored)."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        chars.append(chr(byte) if byte in printable else chr(256 + extra))
        extra += byte not in printable
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Everything the command reads: a pipeline, a CLIP folder, an Inception file, a COCO folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    root = tmp_path_factory.mktemp("assets")
    pipeline = _tiny_pipeline_writer()(root / "pipeline", arch="unet", seed=0)

    tokenizer = _tiny_tokenizer(root)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    torch.manual_seed(0)
    clip = root / "clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)

    inception = write_random_torchscript_inception(root / "weights" / TORCHSCRIPT_FILE, seed=0)

    coco_dir = root / "coco"
    (coco_dir / "annotations").mkdir(parents=True)
    (coco_dir / "val2014").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, (h, w) in zip((42, 7, 19), ((48, 36), (40, 40), (30, 52))):
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(coco_dir / "val2014" / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for k in range(2):
            caption = f"picture {image_id}\n  {k} "  # official captions carry stray newlines and spaces too
            annotations.append({"id": 100 * image_id + k, "image_id": image_id, "caption": caption})
    with open(coco_dir / "annotations" / "captions_val2014.json", "w") as f:
        json.dump({"images": images, "annotations": annotations}, f)

    prompts = root / "prompts.txt"
    prompts.write_text("a red cube\na cat on a mat\n\nthe sea at night\n")
    return {"pipeline": pipeline, "clip": clip, "inception": inception, "coco": coco_dir, "prompts": prompts,
            "cache": root / "cache"}


def eval_argv(assets, out, *extra):
    return [
        str(assets["pipeline"]), "--coco", str(assets["coco"]), "--inception", str(assets["inception"]),
        "--clip", str(assets["clip"]), "--cache-dir", str(assets["cache"]), "--out", str(out),
        "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--resolution", str(RESOLUTION),
        "--batch-size", "2", "--workers", "0", "--kid-subsets", "3", "--device", "cpu", *extra,
    ]


def eval_args(assets, out, *extra):
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser.parse_args(eval_argv(assets, out, *extra))


def diffdistill_eval(argv):
    """The command line as users type it: ``diffdistill eval ...``."""
    from diffdistill.cli import main

    return main(["eval", *argv])


# ---------------------------------------------------------------- captions and transforms


def synthetic_annotations(num_images=50, per_image=5):
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(num_images)],
        "annotations": [
            {"id": 1000 - (i * per_image + k), "image_id": i, "caption": f"image {i} caption {k}"}
            for i in reversed(range(num_images)) for k in range(per_image)
        ],
    }


def test_caption_selection_is_seeded_one_per_distinct_image():
    annotations = synthetic_annotations()
    chosen = coco.select_coco_captions(annotations, 20, seed=3)
    assert chosen.captions == coco.select_coco_captions(annotations, 20, seed=3).captions
    assert chosen.captions != coco.select_coco_captions(annotations, 20, seed=4).captions
    assert chosen.image_ids == sorted(set(chosen.image_ids)) and len(chosen.image_ids) == 20
    for image_id, caption in zip(chosen.image_ids, chosen.captions):
        assert caption.startswith(f"image {image_id} caption")
    # The documented recipe, restated: images by id, rng.choice, then one rng.integers per image.
    rng = np.random.default_rng(3)
    ids = np.sort(rng.choice(50, size=20, replace=False))
    expected = []
    for i in ids:
        options = sorted((1000 - (i * 5 + k), f"image {i} caption {k}") for k in range(5))
        expected.append(options[int(rng.integers(5))][1])
    assert chosen.captions == expected
    with pytest.raises(ValueError):
        coco.select_coco_captions(annotations, 51)


def test_prompts_file_keeps_order_and_skips_blank_lines(assets):
    prompts = coco.read_prompts_file(assets["prompts"])
    assert prompts.captions == ["a red cube", "a cat on a mat", "the sea at night"]
    assert coco.read_prompts_file(assets["prompts"], 2).captions == prompts.captions[:2]
    with pytest.raises(ValueError):
        coco.read_prompts_file(assets["prompts"], 4)


@pytest.mark.parametrize("size", [(57, 40), (31, 50), (64, 64), (513, 512), (300, 203)])
def test_centre_crop_is_gigagans_torchvision_crop(size):
    from torchvision.transforms.functional import center_crop

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ours = protocol.centre_crop_long_edge(image)
    theirs = center_crop(image, min(image.size))
    assert ours.size == theirs.size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    assert protocol.protocol_image(image).shape == (256, 256, 3)


def test_protocol_label_never_hides_the_sample_count():
    assert protocol_label(30_000, 30_000, "COCO-2014 val") == "FID-30k, COCO-2014 val"
    assert protocol_label(5_000, 5_000, "COCO-2017 val") == "FID-5k, COCO-2017 val"
    short = protocol_label(5_000, 30_000, "COCO-2014 val")
    assert short.startswith("FID-5k") and "not comparable with FID-30k" in short


# ---------------------------------------------------------------- generation and CLIP


def test_images_do_not_depend_on_the_batch_they_fall_in(assets, tmp_path):
    from diffdistill.eval.run import load_pipeline

    pipeline = load_pipeline(str(assets["pipeline"]), "cpu", torch.float32)
    captions = ["a red cube", "a cat"]
    kwargs = generation.pipeline_call_kwargs(pipeline, STEPS, GUIDANCE, RESOLUTION)
    together = generation.generate_images(pipeline, captions, tmp_path / "a", batch_size=2, seed=5, call_kwargs=kwargs)
    generation.generate_images(pipeline, captions, tmp_path / "b", batch_size=1, seed=5, call_kwargs=kwargs)
    assert together.generated == 2 and together.nfe == 2 * STEPS  # guided steps count twice
    for i in range(2):
        a = np.asarray(Image.open(generation.image_path(tmp_path / "a", i)), dtype=int)
        b = np.asarray(Image.open(generation.image_path(tmp_path / "b", i)), dtype=int)
        assert a.shape == (RESOLUTION, RESOLUTION, 3)
        assert np.abs(a - b).max() <= 1  # same noise; only float reduction order may differ


def test_settings_a_pipeline_does_not_take_are_refused():
    class OneStepGenerator:
        def __call__(self, prompt, num_inference_steps=1, generator=None, output_type="pil"):
            pass

    assert generation.pipeline_call_kwargs(OneStepGenerator(), steps=1) == {"num_inference_steps": 1}
    with pytest.raises(ValueError, match="guidance_scale"):
        generation.pipeline_call_kwargs(OneStepGenerator(), steps=1, guidance=3.0)


def test_clip_score_is_the_cosine_with_the_prefixed_caption(assets):
    from transformers import AutoTokenizer, CLIPModel

    from diffdistill.eval.clip_score import PROMPT_PREFIX

    scorer = load_clip_scorer(assets["clip"])
    images = [np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8) for i in range(2)]
    captions = ["a red cube", "the sea at night"]
    ours = scorer.similarities(images, captions)

    model = CLIPModel.from_pretrained(assets["clip"]).eval()
    tokens = AutoTokenizer.from_pretrained(assets["clip"])([PROMPT_PREFIX + c for c in captions], padding=True,
                                                           return_tensors="pt")
    pixels = scorer.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    expected = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert "same model folder" in scorer.describe()["comparable_with"]


# ---------------------------------------------------------------- the whole command


FIVE_PROMPTS = ["a red cube", "a cat on a mat", "the sea at night", "two dogs", "a blue house"]


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID from two small feature sets: with centred features A1, A2 (n_i x d), Sigma_i = A_i^T A_i / (n_i - 1) and
    tr sqrt(Sigma1 Sigma2) is the nuclear norm of A1 A2^T / sqrt((n1 - 1)(n2 - 1)) (their nonzero eigenvalues are its
    squared singular values): exact, and an n1 x n2 problem where clean-fid's sqrtm of 2048 x 2048 takes 40 s here."""
    f1, f2 = torch.from_numpy(np.asarray(features1, np.float64)), torch.from_numpy(np.asarray(features2, np.float64))
    a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1) - 1, len(f2) - 1
    cross = torch.linalg.matrix_norm(a1 @ a2.T, "nuc") / (n1 * n2) ** 0.5
    return float((f1.mean(0) - f2.mean(0)).square().sum() + a1.square().sum() / n1 + a2.square().sum() / n2 - 2 * cross)


def clean_fid_kid(features1, features2, num_subsets: int) -> float:
    """clean-fid's kernel_distance, whose subsets come from numpy's global generator, seeded 0 as the run's."""
    state = np.random.get_state()
    np.random.seed(0)
    try:
        return kernel_distance(np.asarray(features1, np.float64), np.asarray(features2, np.float64), num_subsets=num_subsets)
    finally:
        np.random.set_state(state)


def assert_scores_are_those_of_the_saved_features_and_captions(results: dict, out, clip_dir) -> None:
    """FID of generated against reference, KID with clean-fid's argument order (reference first, as its compute_kid),
    and the CLIP score of each image with its own caption, recomputed from what the run left on disk."""
    generated = np.load(out / "inception_features.npy")
    reference = np.load(results["reference_statistics"][: -len(".npz")] + ".features.npy")
    assert generated.shape == (5, 2048) and reference.shape == (3, 2048)
    fid = fid_from_features(generated, reference)
    assert fid > 1 and results["fid"] == pytest.approx(fid, rel=1e-6)  # generated against itself would be 0
    kid, swapped = clean_fid_kid(reference, generated, 3), clean_fid_kid(generated, reference, 3)
    assert abs(kid - swapped) > 1e-3 * abs(kid) and results["kid"] == pytest.approx(kid, rel=1e-9)
    scorer = load_clip_scorer(clip_dir)
    images = [protocol.protocol_image(Image.open(generation.image_path(out / "images", i))) for i in range(5)]
    pairs = [[scorer.similarities([image], [caption])[0] for caption in FIVE_PROMPTS] for image in images]  # [image, caption]
    paired = np.mean(np.diagonal(pairs))
    shifted = np.mean([pairs[i][(i + 1) % 5] for i in range(5)])
    assert abs(paired - shifted) > 1e-4 and results["clip_score"]["value"] == pytest.approx(paired, abs=1e-6)


def test_eval_end_to_end_resumes_after_an_interruption(assets, tmp_path, monkeypatch, capsys):
    """Five prompts in batches of two (the last batch holds one) against the three COCO reference images."""
    out, prompts = tmp_path / "run", tmp_path / "five.txt"
    prompts.write_text("\n".join(FIVE_PROMPTS) + "\n")
    argv = eval_argv(assets, out, "--benchmark", "prompts", "--prompts", str(prompts))

    # First run: stopped after two of the three images.
    real_save = generation._save_png
    saved = []

    def save_then_stop(array, path):
        if len(saved) == 2:
            raise KeyboardInterrupt
        real_save(array, path)
        saved.append(path.name)

    monkeypatch.setattr(generation, "_save_png", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        diffdistill_eval(argv)
    first = sorted(p.name for p in (out / "images").glob("*.png"))
    assert first == ["000000.png", "000001.png"]
    assert not (out / "results.json").exists()
    kept = {name: (out / "images" / name).read_bytes() for name in first}

    # Second run: only the remainder is generated; the reference statistics come from the cache.
    monkeypatch.setattr(generation, "_save_png", real_save)
    extracted = []
    real_extract = protocol.extract_features
    monkeypatch.setattr(protocol, "extract_features", lambda paths, *a, **k: extracted.append(len(paths))
                        or real_extract(paths, *a, **k))
    capsys.readouterr()
    assert diffdistill_eval(argv) == 0
    assert extracted == [5]  # the generated images only
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert all((out / "images" / name).read_bytes() == data for name, data in kept.items())

    results = json.loads((out / "results.json").read_text())
    assert results["generation"]["found_on_disk"] == 2 and results["generation"]["generated_this_run"] == 3
    assert results["protocol"]["num_generated"] == 5 and results["protocol"]["num_reference"] == 3
    assert results["fid_label"] == "FID-5" and results["protocol"]["label"].startswith("FID-5, prompts file")
    assert np.isfinite(results["fid"]) and results["fid"] >= 0 and np.isfinite(results["kid"])
    assert -1 <= results["clip_score"]["value"] <= 1
    assert results["speed"]["nfe"] == 2 * STEPS and results["speed"]["images_per_second"] > 0
    assert results["extractor"]["kind"] == "torchscript"
    table = capsys.readouterr().out
    assert "| Protocol | FID | KID | CLIP score | images/s | NFE | s/image |" in table
    assert "FID-5, prompts file five.txt" in table
    assert (out / "captions.txt").read_text().splitlines() == FIVE_PROMPTS

    # The streamed statistics are those of the features written for KID; the reference ones are cached.
    from diffdistill.eval.fid import load_statistics

    features = np.load(out / "inception_features.npy").astype(np.float64)
    assert features.shape == (5, 2048)
    mu, sigma, count, _ = load_statistics(results["generated_statistics"])
    assert count == 5
    np.testing.assert_allclose(mu, features.mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-7, atol=1e-12)
    assert load_statistics(results["reference_statistics"])[2] == 3
    assert_scores_are_those_of_the_saved_features_and_captions(results, out, assets["clip"])

    # A finished run re-scores to the same numbers without generating.
    assert diffdistill_eval(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["generation"]["generated_this_run"] == 0 and again["generation"]["found_on_disk"] == 5
    assert again["fid"] == pytest.approx(results["fid"], rel=1e-12) and again["kid"] == pytest.approx(results["kid"])
    assert again["clip_score"]["value"] == pytest.approx(results["clip_score"]["value"])
    assert again["speed"]["measured"] == "in an earlier run" and again["speed"]["nfe"] == 2 * STEPS


def test_coco_benchmark_selects_captions_and_labels_a_short_run(assets):
    from diffdistill.eval.run import _captions_and_reference

    args = eval_args(assets, assets["cache"] / "unused", "--benchmark", "coco2014-30k", "--num", "2")
    title, nominal, captions, split, annotations = _captions_and_reference(args)
    assert (title, nominal, split) == ("COCO-2014 val", 30_000, "val2014")
    assert captions.captions == coco.select_coco_captions(annotations, 2, seed=0).captions
    assert all(c.startswith("picture ") and "\n" not in c and "  " not in c for c in captions.captions)
    assert [p.name for p in reference_stats.reference_image_paths(assets["coco"], split, annotations)] == [
        f"COCO_val2014_{i:012d}.jpg" for i in (7, 19, 42)]
    label = protocol_label(len(captions.captions), nominal, title)
    assert label == "FID-2, COCO-2014 val (2 of the protocol's 30000: not comparable with FID-30k)"


def test_missing_inception_stops_before_generating(assets, tmp_path, monkeypatch, capsys):
    from diffdistill.eval import run

    monkeypatch.setattr(run, "load_pipeline", lambda *a: pytest.fail("loaded the pipeline without weights"))
    monkeypatch.delenv("DIFFDISTILL_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    args = eval_args(assets, tmp_path / "out", "--benchmark", "prompts", "--prompts", str(assets["prompts"]))
    args.inception = None
    assert run_eval(args) == 2
    message = capsys.readouterr().err
    assert TORCHSCRIPT_FILE in message and TORCHSCRIPT_URL in message and "DIFFDISTILL_INCEPTION" in message
    assert not (tmp_path / "out").exists()


def test_resuming_with_other_settings_is_refused(assets, tmp_path):
    out = tmp_path / "run"
    (out / "images").mkdir(parents=True)
    (out / "generation.json").write_text(json.dumps({"seed": 123}))
    with pytest.raises(SystemExit, match="other settings"):
        diffdistill_eval(eval_argv(assets, out, "--benchmark", "prompts", "--prompts", str(assets["prompts"])))


# ---------------------------------------------------------------- inputs refused, cache verified


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize("num, words", [("0", "at least 1"), ("-1", "at least 1"), ("4", "more than the 3 prompts")])
def test_num_outside_one_to_the_prompts_available_is_refused(num, words, assets, tmp_path, capsys):
    argv = eval_argv(assets, tmp_path / "out", "--benchmark", "prompts", "--prompts", str(assets["prompts"]), "--num", num)
    assert diffdistill_eval(argv) == 2
    line = one_error_line(capsys)
    assert f"--num {num}" in line and words in line and not (tmp_path / "out").exists()


def test_num_zero_never_means_the_whole_benchmark(assets, tmp_path, capsys):
    assert diffdistill_eval(eval_argv(assets, tmp_path / "out", "--benchmark", "coco2014-30k", "--num", "0")) == 2
    assert "--num 0" in one_error_line(capsys)


def test_a_non_utf8_prompts_file_is_one_line(assets, tmp_path, capsys):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes("un caf\xe9\nune cr\xeape\n".encode("latin-1"))
    assert diffdistill_eval(eval_argv(assets, tmp_path / "out", "--benchmark", "prompts", "--prompts", str(prompts))) == 2
    line = one_error_line(capsys)
    assert "latin1.txt" in line and "not UTF-8" in line


def test_every_input_problem_is_listed_at_once(assets, tmp_path, capsys):
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{not json")
    argv = eval_argv(assets, tmp_path / "out", "--benchmark", "prompts", "--prompts", str(tmp_path / "missing.txt"))
    argv[0] = str(pipeline)
    argv[argv.index("--inception") + 1] = str(tmp_path / "no-inception.pt")
    argv[argv.index("--clip") + 1] = str(tmp_path / "no-clip")
    assert diffdistill_eval(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: 4 problems")
    for named in ("no-inception.pt", "no-clip", "model_index.json", "missing.txt"):
        assert named in line


def test_damaged_or_swapped_images_are_generated_again(assets, tmp_path):
    from diffdistill.eval.run import load_pipeline

    pipeline = load_pipeline(str(assets["pipeline"]), "cpu", torch.float32)
    kwargs = generation.pipeline_call_kwargs(pipeline, 1, GUIDANCE, RESOLUTION)
    captions, images = ["a red cube", "a cat", "the sea", "a dog"], tmp_path / "images"
    first = generation.generate_images(pipeline, captions, images, batch_size=4, seed=0, call_kwargs=kwargs)
    assert first.generated == 4 and (images / generation.MANIFEST).is_file()
    originals = [generation.image_path(images, i).read_bytes() for i in range(4)]

    generation.image_path(images, 0).write_bytes(originals[0][: len(originals[0]) // 2])  # truncated
    generation.image_path(images, 1).write_bytes(originals[2])  # a valid image from elsewhere
    generation.image_path(images, 2).unlink()  # missing
    altered = bytearray(originals[3])
    altered[len(altered) // 2] ^= 0xFF  # same size, one byte changed
    generation.image_path(images, 3).write_bytes(bytes(altered))
    again = generation.generate_images(pipeline, captions, images, batch_size=4, seed=0, call_kwargs=kwargs)
    assert (again.found_on_disk, again.generated, again.rejected) == (0, 4, 3)
    assert [generation.image_path(images, i).read_bytes() for i in range(4)] == originals

    untouched = generation.generate_images(pipeline, captions, images, batch_size=4, seed=0, call_kwargs=kwargs)
    assert (untouched.found_on_disk, untouched.generated) == (4, 0)


def test_an_image_without_a_record_is_not_trusted(assets, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(generation.image_path(images, 0))
    assert generation.verified_images(images, 1) == set()
    (images / generation.MANIFEST).write_text(json.dumps(generation.image_record(generation.image_path(images, 0))) + "\n{cut sh")
    assert generation.verified_images(images, 1) == {0}  # a line cut short by a crash is skipped, the rest read
