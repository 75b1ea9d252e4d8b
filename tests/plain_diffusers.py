"""Sampling exported folders with plain diffusers, in a child process that cannot import diffdistill.

A job names a folder, the inputs (prompts, or DiT class labels), how to seed, and the calls to make:
``{"folder", "prompts" | "labels", "global_rng", "output_type", "calls": {name: kwargs}}``. With
``"card": true`` the child runs the ```python block of the folder's README.md (the model card),
all but its example line ``image = ...``, and calls the ``generate`` it defines instead of a bare
pipeline: what the card says is what is tested. One child runs every job, so the imports are paid once.
"""

import json
import subprocess
import sys

from safetensors.torch import load_file

CHILD = r"""
import json, sys
sys.modules["diffdistill"] = None  # any import of diffdistill now raises ImportError
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

jobs, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
result = {}
for i, job in enumerate(jobs):
    if job.get("card"):
        code = open(job["folder"] + "/README.md").read().split("```python\n", 1)[1].split("```", 1)[0]
        namespace = {}
        exec("\n".join(line for line in code.splitlines() if not line.startswith("image = ")), namespace)
        pipe, sample = namespace["pipe"], namespace["generate"]
    else:
        pipe = DiffusionPipeline.from_pretrained(job["folder"])
        sample = pipe
    pipe.set_progress_bar_config(disable=True)
    inputs = {"class_labels": job["labels"]} if "labels" in job else {"prompt": job["prompts"]}
    for name, call in job["calls"].items():
        generator = torch.manual_seed(job["seed"]) if job["global_rng"] else torch.Generator().manual_seed(job["seed"])
        result[f"{i}/{name}"] = sample(**inputs, generator=generator, output_type=job["output_type"], **call).images
    result[f"{i}/scheduler"] = torch.tensor([type(pipe.scheduler).__name__ == job["scheduler"]])
save_file({k: v.contiguous() for k, v in result.items()}, out)
"""


def run_plain(jobs: list, tmp_path) -> list:
    """Runs ``jobs`` in the child; returns, per job, ``{call name: images}`` plus ``scheduler`` (the class matched)."""
    spec, out = tmp_path / "jobs.json", tmp_path / "child.safetensors"
    spec.write_text(json.dumps(jobs))
    done = subprocess.run([sys.executable, "-c", CHILD, str(spec), str(out)], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    flat = load_file(str(out))
    return [{key.split("/", 1)[1]: value for key, value in flat.items() if key.startswith(f"{i}/")} for i in range(len(jobs))]
