"""``diffdistill eval``: score any diffusers pipeline folder on the COCO protocol.

Order of work, so that nothing is generated unless it can be scored: resolve the
weight files (Inception, CLIP), read the captions and list the reference images,
load the pipeline and the extractor, compute or load the cached reference
statistics, and only then generate (resuming), extract, and report.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from diffdistill.eval import EvalInputError, MissingWeightsError, clip_score, coco, generation, protocol, reference_stats
from diffdistill.eval.arguments import add_eval_arguments
from diffdistill.eval.fid import (
    InceptionFeatureExtractor,
    fid_label,
    frechet_distance,
    kernel_inception_distance,
    resolve_inception_path,
)


class Problems:
    """What is wrong with eval's inputs, collected so that every problem is reported at once."""

    def __init__(self):
        self.found: list[str] = []

    def add(self, message: str) -> None:
        self.found.append(" ".join(message.split()))

    def attempt(self, check, *args):
        """``check(*args)``, or None with its failure recorded."""
        try:
            return check(*args)
        except (OSError, ImportError, ValueError) as error:  # missing files and packages, bad values and formats
            self.add(str(error))
            return None

    def raise_if_any(self) -> None:
        if len(self.found) == 1:
            raise EvalInputError(self.found[0])
        if self.found:
            listed = "; ".join(f"({i}) {message}" for i, message in enumerate(self.found, 1))
            raise EvalInputError(f"{len(self.found)} problems with the inputs: {listed}")


def _captions_and_reference(args, problems: Problems | None = None):
    """(benchmark title, nominal count, CaptionSet, reference split, annotations of the reference split).
    Without ``problems``, the first problem raises; with it, each is recorded and its result is None."""
    own = problems is None
    problems = problems or Problems()
    if not args.coco:
        problems.add("--coco DIR is required: the reference statistics come from the COCO validation images")
    if args.benchmark == "prompts":
        if not args.prompts:
            problems.add("--benchmark prompts needs --prompts FILE")
        captions = problems.attempt(coco.read_prompts_file, args.prompts, args.num) if args.prompts else None
        split = coco.REFERENCE_SPLITS[args.reference]
        annotations = problems.attempt(coco.read_coco_annotations, args.coco, split) if args.coco else None
        title = f"prompts file {Path(args.prompts or '').name}, reference COCO {split}"
        nominal = None
    else:
        benchmark = coco.BENCHMARKS[args.benchmark]
        title, nominal, split = benchmark.title, benchmark.num, benchmark.split
        annotations = problems.attempt(coco.read_coco_annotations, args.coco, split) if args.coco else None
        num = benchmark.num if args.num is None else args.num  # --num 0 is refused, never read as "the default"
        captions = problems.attempt(coco.select_coco_captions, annotations, num, args.caption_seed) if annotations else None
    if own:
        problems.raise_if_any()
    return title, nominal, captions, split, annotations


def _check_pipeline_folder(pipeline_dir: str) -> dict:
    """The pipeline folder's model_index.json, read before anything loads."""
    index_file = Path(pipeline_dir, "model_index.json")
    if not index_file.is_file():
        raise EvalInputError(f"{pipeline_dir} is not a diffusers pipeline folder (no model_index.json)")
    try:
        return json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalInputError(f"{index_file} is not valid JSON ({error}); restore it from the pipeline's source") from None


def check_inputs(args):
    """Every input eval reads, checked before any work, every problem listed in one error:
    (inception path, CLIP path or None, title, nominal count, CaptionSet, reference split, annotations)."""
    problems = Problems()
    inception_path = problems.attempt(resolve_inception_path, args.inception)
    clip_path = problems.attempt(clip_score.resolve_clip_path, args.clip)
    if clip_path is not None:
        problems.attempt(clip_score.check_clip_backend, clip_path)
    problems.attempt(_check_pipeline_folder, args.pipeline_dir)
    title, nominal, captions, split, annotations = _captions_and_reference(args, problems)
    if annotations is not None:  # missing COCO images fail now, not after generating
        problems.attempt(reference_stats.reference_image_paths, args.coco, split, annotations)
    if captions is not None and len(captions.captions) < 2:
        problems.add(f"FID and KID need at least 2 generated images, and there are {len(captions.captions)} captions")
    problems.raise_if_any()
    return inception_path, clip_path, title, nominal, captions, split, annotations


def protocol_label(num: int, nominal: int | None, title: str) -> str:
    """'FID-30k, COCO-2014 val' with a warning whenever the count is not the benchmark's own."""
    label = f"{fid_label(num)}, {title}"
    if nominal is not None and num != nominal:
        label += f" ({num} of the protocol's {nominal}: not comparable with {fid_label(nominal)})"
    return label


def _default_cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "diffdistill" / "fid-stats"


def _device_and_dtype(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("float16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype_name)


def load_pipeline(pipeline_dir: str, device: str, dtype, scheduler: str | None = None):
    """Any diffusers pipeline folder, local files and safetensors only; the safety checker is left out,
    as in the papers' evaluations (it blanks images, which would count against FID)."""
    # diffusers takes seconds to import and only loading a pipeline needs it
    from diffusers import DiffusionPipeline

    components = _check_pipeline_folder(pipeline_dir)
    extra = {"safety_checker": None} if "safety_checker" in components else {}
    pipeline = DiffusionPipeline.from_pretrained(
        pipeline_dir, torch_dtype=dtype, local_files_only=True, use_safetensors=True, **extra
    )
    pipeline.set_progress_bar_config(disable=True)
    if scheduler:
        import diffusers  # as above: deferred to the one call that needs it

        scheduler_class = getattr(diffusers, scheduler, None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise SystemExit(f"--scheduler {scheduler} is not a diffusers scheduler class")
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    return pipeline.to(device)


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    """Refuse to resume into a folder whose images came from other settings."""
    path = out_dir / "generation.json"
    if path.is_file():
        with open(path) as f:
            previous = json.load(f)
        if previous != manifest:
            changed = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
            raise SystemExit(
                f"{out_dir} holds images generated with other settings ({', '.join(changed)} differ); "
                "pass another --out or delete it"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)


def _speed(out_dir: Path, report, batch_size: int, device: str) -> dict:
    """This run's timings; when it generated nothing (a finished run re-scored), the last measured ones."""
    path = out_dir / "speed.json"
    if report.generated == 0:
        if path.is_file():
            with open(path) as f:
                return {**json.load(f), "measured": "in an earlier run"}
        return {"images_per_second": None, "seconds_per_image": None, "nfe": None, "batch_size": batch_size,
                "device": device, "timed_images": 0, "measured": "never"}
    speed = {
        "images_per_second": report.images_per_second,
        "seconds_per_image": report.seconds_per_image,
        "nfe": report.nfe,
        "batch_size": batch_size,
        "device": device,
        "timed_images": report.timed_images,
    }
    with open(path, "w") as f:
        json.dump(speed, f, indent=2)
    return {**speed, "measured": "in this run"}


# ---------------------------------------------------------------- report


def _fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def markdown_table(results: dict) -> str:
    clip = results["clip_score"]
    speed = results["speed"]
    header = "| Protocol | FID | KID | CLIP score | images/s | NFE | s/image |"
    row = "| {} | {} | {} | {} | {} | {} | {} |".format(
        results["protocol"]["label"],
        _fmt(results["fid"], ".2f"),
        _fmt(results["kid"], ".5f"),
        _fmt(clip["value"], ".4f", "skipped (no --clip)"),
        _fmt(speed["images_per_second"], ".2f", "n/a (nothing generated)"),
        _fmt(speed["nfe"], "g"),
        _fmt(speed["seconds_per_image"], ".3f"),
    )
    return "\n".join([header, "|---|---|---|---|---|---|---|", row])


def _notes(results: dict) -> list[str]:
    notes = [f"Inception: {results['extractor']['name']} ({Path(results['extractor']['file']).name})"]
    clip = results["clip_score"]
    if clip["value"] is not None:
        notes.append(f"CLIP: {clip['model']}; prefix {clip['prefix']!r}; comparable with {clip['comparable_with']}")
    speed = results["speed"]
    if speed["images_per_second"] is not None:
        notes.append(
            f"Speed: batch {speed['batch_size']} on {speed['device']}, {speed['timed_images']} images timed "
            f"{speed['measured']} (first batch excluded as warm-up when there were several); "
            "NFE counts a guided step twice"
        )
    return notes


# ---------------------------------------------------------------- run


def run_eval(args: argparse.Namespace) -> int:
    """Run ``diffdistill eval``; 0 on success, 2 when a file (weights, COCO, prompts) or package is missing."""
    try:
        return _run(args)
    except (MissingWeightsError, FileNotFoundError, ImportError, EvalInputError) as error:
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, as the CLI's other errors
        return 2


def _run(args) -> int:
    # 1. Everything that can be missing or wrong is looked up before any work, and reported together.
    inception_path, clip_path, title, nominal, captions, split, annotations = check_inputs(args)
    num = len(captions.captions)

    device, dtype = _device_and_dtype(args)
    extractor = InceptionFeatureExtractor.load(inception_path, device)
    pipeline = load_pipeline(args.pipeline_dir, device, dtype, args.scheduler)
    try:
        call_kwargs = generation.pipeline_call_kwargs(pipeline, args.steps, args.guidance, args.resolution)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    scheduler = type(pipeline.scheduler).__name__
    out_dir = Path(args.out or Path("diffdistill-eval") / f"{Path(args.pipeline_dir).name}-{args.benchmark}-{num}")
    _check_manifest(out_dir, {
        "pipeline": str(Path(args.pipeline_dir).resolve()),
        "captions_sha256": captions.sha256,
        "seed": args.seed,
        "call": call_kwargs,
        "dtype": str(dtype),
        "scheduler": scheduler,
    })
    (out_dir / "captions.txt").write_text("\n".join(captions.captions) + "\n", encoding="utf-8")

    # 2. Reference statistics: cached per protocol, split, image list and extractor weights.
    reference = reference_stats.reference_statistics(
        args.coco, split, annotations, extractor, args.cache_dir or _default_cache_dir(),
        batch_size=args.batch_size, workers=args.workers,
    )
    print(f"reference: {reference.count} COCO {split} images "
          f"({'cached' if reference.from_cache else 'computed'}: {reference.stats_path})", file=sys.stderr)

    # 3. Generation, resuming from the images already on disk.
    generation_report = generation.generate_images(
        pipeline, captions.captions, out_dir / "images", batch_size=args.batch_size, seed=args.seed,
        call_kwargs=call_kwargs,
    )
    if generation_report.rejected:
        print(f"regenerated {generation_report.rejected} images that did not match their records in "
              f"{out_dir / 'images' / generation.MANIFEST} (truncated, unreadable or replaced)", file=sys.stderr)
    speed = _speed(out_dir, generation_report, args.batch_size, device)
    del pipeline  # free the accelerator for the feature networks
    _empty_cuda_cache(device)

    # 4. Scores of the generated images.
    scores = _score_generated(args, out_dir, captions.captions, extractor, reference, clip_path, device)
    results = {
        "protocol": {
            "label": protocol_label(num, nominal, title),
            "benchmark": args.benchmark,
            "num_generated": num,
            "num_reference": reference.count,
            "reference_split": split,
            "captions": captions.source,
            "transform": "centre crop on the long edge, PIL LANCZOS 256, clean-fid clean mode (PIL bicubic 299)",
        },
        **scores,
        "extractor": extractor.describe(),
        "speed": speed,
        "generation": {
            "pipeline": str(args.pipeline_dir),
            "images_dir": str(out_dir / "images"),
            "found_on_disk": generation_report.found_on_disk,
            "regenerated_damaged": generation_report.rejected,
            "generated_this_run": generation_report.generated,
            "seed": args.seed,
            "call": call_kwargs,
            "scheduler": scheduler,
        },
        "reference_statistics": str(reference.stats_path),
        "generated_statistics": str(out_dir / "inception_stats.npz"),
    }
    _report(results, Path(args.json or out_dir / "results.json"))
    return 0


def _empty_cuda_cache(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _score_generated(args, out_dir: Path, captions: list[str], extractor, reference, clip_path, device) -> dict:
    """FID, KID and CLIP score of ``out_dir/images`` in one streaming pass over the files."""
    scorer = clip_score.load_clip_scorer(clip_path, device) if clip_path is not None else None
    clip_mean = clip_score.RunningMean()

    def score_clip(start, images):
        if scorer is not None:
            clip_mean.update(scorer.similarities(list(images), captions[start : start + len(images)]))

    features_path = out_dir / "inception_features.npy"
    paths = [generation.image_path(out_dir / "images", i) for i in range(len(captions))]
    stats = protocol.extract_features(
        paths, extractor, batch_size=args.batch_size, workers=args.workers, features_path=features_path,
        on_batch=score_clip, desc="generated images",
    )
    stats.save(out_dir / "inception_stats.npz", images=len(paths), extractor=extractor.describe())
    kid = kernel_inception_distance(
        reference.features(), np.load(features_path, mmap_mode="r"),
        num_subsets=args.kid_subsets, max_subset_size=args.kid_subset_size, seed=0,
    )
    clip_description = scorer.describe() if scorer else {
        "model": None, "prefix": clip_score.PROMPT_PREFIX, "comparable_with": None}
    return {
        "fid": frechet_distance(stats.mean, stats.covariance, reference.mu, reference.sigma),
        "fid_label": fid_label(len(paths)),
        "kid": kid,
        "kid_subsets": {"num_subsets": args.kid_subsets, "max_subset_size": args.kid_subset_size, "seed": 0},
        "clip_score": {**clip_description, "value": clip_mean.value},
    }


def _report(results: dict, json_path: Path) -> None:
    print(markdown_table(results))
    for note in _notes(results):
        print(f"- {note}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"results: {json_path}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffdistill eval", description=__doc__.splitlines()[0])
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
