"""``diffdistill eval``'s arguments, apart from the harness so that ``diffdistill --help`` loads no torch."""

import argparse
import os

BENCHMARK_CHOICES = ("coco2014-30k", "coco2017-5k", "prompts")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline_dir", help="a diffusers pipeline folder (local, safetensors)")
    parser.add_argument("--benchmark", choices=BENCHMARK_CHOICES, default="coco2014-30k",
                        help="coco2014-30k: 30k COCO-2014 val captions (the papers' FID-30k); "
                             "coco2017-5k: the 5k COCO-2017 val captions (FID-5k, cheaper); "
                             "prompts: captions from --prompts, reference from --reference")
    parser.add_argument("--coco", metavar="DIR", help="COCO root: DIR/annotations/captions_val20XX.json, DIR/val20XX/")
    parser.add_argument("--prompts", metavar="FILE", help="one caption a line (e.g. DMD2's 30k COCO-2014 list)")
    parser.add_argument("--reference", choices=("coco2014", "coco2017"), default="coco2014",
                        help="reference images for --benchmark prompts (default coco2014)")
    parser.add_argument("--num", type=int, help="number of captions (default: the benchmark's count)")
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, help="guidance_scale (default: the pipeline's)")
    parser.add_argument("--resolution", type=int, help="generated height and width in px (default: the pipeline's)")
    parser.add_argument("--scheduler", metavar="CLASS",
                        help="swap the pipeline's scheduler for this diffusers class built from the same config, "
                             "e.g. DDIMScheduler for the teacher's 50-step ODE reference")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call and per Inception batch")
    parser.add_argument("--seed", type=int, default=0, help="image i is drawn with seed SEED + i")
    parser.add_argument("--caption-seed", type=int, default=0, help="seed of the COCO caption selection")
    parser.add_argument("--out", metavar="DIR", help="where images go (default ./diffdistill-eval/NAME-BENCHMARK-N)")
    parser.add_argument("--json", metavar="PATH", help="results file (default OUT/results.json)")
    parser.add_argument("--inception", metavar="PATH",
                        help="inception-2015-12-05.pt (clean-fid) or weights-inception-2015-12-05-6726825d.pth "
                             "(torch-fidelity), or a folder holding one; default $DIFFDISTILL_INCEPTION")
    parser.add_argument("--clip", metavar="PATH",
                        help="open_clip ViT-g-14 laion2b_s12b_b42k weights, or a transformers CLIPModel folder; "
                             "default $DIFFDISTILL_CLIP; without either the CLIP score is skipped")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="reference statistics cache (default ~/.cache/diffdistill/fid-stats)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="pipeline dtype (default float16 on cuda, float32 on cpu)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding workers")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)


# ---------------------------------------------------------------- plan
