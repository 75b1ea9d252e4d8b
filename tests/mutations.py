"""Mutation check: deliberate breakages of the library that the test suite must catch.

Each mutation replaces one line of a copy of ``diffdistill/`` (the checkout is never touched) and
runs the test files meant to guard it against the copy; the mutation is *caught* when they fail.
Not collected by pytest (the name does not start with ``test_``); run it by hand:

    OMP_NUM_THREADS=1 python tests/mutations.py            # the control, then every mutation: about 8 minutes here
    OMP_NUM_THREADS=1 python tests/mutations.py ema-noop    # one

It prints one row per mutation and exits 1 if any survived.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (file, the line as it is, the broken line, test files that must fail)
MUTATIONS = {
    "ema-noop": ("diffdistill/ema.py", "self.shadow[key].lerp_(value.detach().float(), 1 - self.decay)", "pass",
                 ["tests/test_engine_units.py"]),
    "dm-gradient-sign": ("diffdistill/methods/dmd.py", "grad = x0_fake - x0_real", "grad = x0_real - x0_fake",
                         ["tests/test_dmd_gradient.py"]),
    "dm-term-in-bf16": ("diffdistill/methods/dmd.py", "torch.autocast(x.device.type, enabled=False) if full else contextlib.nullcontext()",
                        "contextlib.nullcontext()", ["tests/test_dmd_gradient.py"]),
    "backward-simulation-from-first-step": ("diffdistill/generator.py",
                                            "k = rng.shared_randint(0, len(timesteps)) if len(timesteps) > 1 else 0", "k = 0",
                                            ["tests/test_generator.py"]),
    "lora-owns-everything": ("diffdistill/denoiser.py", 'return not isinstance(self.adapter, str) or f".{self.adapter}." in name', "return True",
                             ["tests/test_memory_tiers.py"]),
    "accumulation-noise-per-micro-batch": ("diffdistill/engine/trainer.py", 'batch["rng"] = step_random(cfg.seed, step, "micro0", slot, slots, acc.device)',
                                           'batch["rng"] = step_random(cfg.seed, step, f"micro{micro}", acc.process_index, acc.num_processes, acc.device)',
                                           ["tests/test_engine_units.py"]),
    "gan-features-first-output": ("diffdistill/scores.py", "return [o for o in output if torch.is_tensor(o)][-1]",
                                  "return [o for o in output if torch.is_tensor(o)][0]", ["tests/test_scores.py"]),
    "fdistill-ratio-inverted": ("diffdistill/methods/fdistill.py", "r = density_ratio_from_logits(logits) if self.needs_ratio",
                                "r = density_ratio_from_logits(-logits) if self.needs_ratio",
                                ["tests/test_fdistill.py::test_fdistill_weights_the_dm_term_by_the_discriminators_ratio_of_real_to_generated"]),
    "discriminator-loss-sign": ("diffdistill/methods/adversarial.py", "loss = F.softplus(fake_logits) + F.softplus(-real_logits)",
                                "loss = F.softplus(-fake_logits) + F.softplus(real_logits)", ["tests/test_adversarial.py"]),
    "ddim-steps-with-current-alpha": ("diffdistill/sampling.py", "x = alpha_next * x0 + sigma_next * eps", "x = alpha * x0 + sigma_next * eps",
                                      ["tests/test_sampling.py"]),
    "scm-update-noop": ("diffdistill/methods/scm.py", "g = normalize_tangent(", "g = 0 * normalize_tangent(",
                        ["tests/test_scm.py::test_repairs_a_shrunk_ring_to_the_floors[scm-300]"]),
    "phased-dmd-fake-score-noop": ("diffdistill/methods/phased_dmd.py", 'return loss, {"loss_fake": loss.mean().item(), "stage": float(k)}',
                                   'return 0 * loss, {"loss_fake": loss.mean().item(), "stage": float(k)}',
                                   ["tests/test_phased_dmd.py::test_repairs_a_shrunk_ring_to_the_floors"]),
    "eval-captions-misaligned": ("diffdistill/eval/run.py", "captions[start : start + len(images)]", "captions[: len(images)]",
                                 ["tests/test_eval_coco.py::test_eval_end_to_end_resumes_after_an_interruption"]),
}


def mutate(copy: Path, file: str, before: str, after: str) -> None:
    path = copy / file
    text = path.read_text()
    if text.count(before) != 1:
        raise SystemExit(f"{file}: the line to mutate ({before!r}) is not there exactly once; update tests/mutations.py")
    path.write_text(text.replace(before, after))


def run(name: str | None) -> tuple[bool, float]:
    """Whether the guarding tests fail on the mutated copy (``None``: the control, an unmutated copy
    of every guarded file's tests, which must pass or no row means anything)."""
    file, before, after, tests = MUTATIONS[name] if name else (None, None, None, sorted({t for m in MUTATIONS.values() for t in m[3]}))
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        for folder in ("diffdistill", "tests", "recipes"):  # run from the copy, so its package is the one imported
            shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
        if name:
            mutate(copy, file, before, after)
        env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1"}
        tic = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=copy, env=env,
                             capture_output=True, text=True, check=False)  # failing is what a caught mutation does
        return out.returncode != 0, time.perf_counter() - tic


def main(names: list[str]) -> int:
    names = names or list(MUTATIONS)
    survived = []
    failed, seconds = run(None)
    if failed:
        raise SystemExit("the guarding tests fail on the unmutated copy: fix them first (a mutation 'caught' there would mean nothing)")
    print(f"control: the guarding tests pass on an unmutated copy ({seconds:.0f} s)\n")
    print("| mutation | guarded by | caught | seconds |\n|---|---|---|---:|")
    for name in names:
        caught, seconds = run(name)
        survived += [] if caught else [name]
        print(f"| {name} | {', '.join(MUTATIONS[name][3])} | {'yes' if caught else '**no**'} | {seconds:.0f} |", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
