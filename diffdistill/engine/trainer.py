"""The one training loop, on ``accelerate`` (single process, DDP, FSDP or DeepSpeed alike).

Each optimizer step: ask the method which phase the step is, run ``grad_accum`` micro-batches of
that phase's loss, clip, step, update the EMA; then log, draw a sample grid, checkpoint.
Randomness and data order are functions of (seed, step), so a resumed run and a run on more
processes reproduce the single uninterrupted run (see :mod:`diffdistill.engine.random`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from diffdistill.config import TrainConfig, dump_yaml, to_dict
from diffdistill.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffdistill.engine.ema import EMA
from diffdistill.engine.logging import append_metrics, save_grid, tensorboard_available
from diffdistill.engine.random import derive_seed, step_random


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to ``base_lr``, then constant (DMD2's schedule)."""
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _unwrap(module):
    return getattr(module, "module", module)


class Trainer:
    def __init__(self, cfg: TrainConfig, teacher=None, data=None):
        """``teacher`` and ``data`` may be given as objects (benchmarks with exact teachers);
        by default they are resolved from the recipe."""
        from accelerate import Accelerator

        from diffdistill.conditioning import PromptCache
        from diffdistill.data.sources import build_data_source
        from diffdistill.methods import build_method
        from diffdistill.teachers import resolve_teacher

        self.cfg, self.run_dir = cfg, Path(cfg.out)
        log_with = "tensorboard" if tensorboard_available() else None
        # Without cpu=True, accelerate treats a multi-process launch on a machine with no GPU as
        # single-process; with it, `accelerate launch --multi_gpu --num_processes N` runs gloo DDP on CPU.
        self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with, project_dir=str(self.run_dir),
                                       cpu=not torch.cuda.is_available())
        world = self.accelerator.num_processes
        if cfg.batch_size % (cfg.grad_accum * world):
            raise ValueError(f"batch_size={cfg.batch_size} must divide evenly into grad_accum={cfg.grad_accum} x {world} processes")
        self.local_batch = cfg.batch_size // (cfg.grad_accum * world)
        torch.manual_seed(derive_seed(cfg.seed, "init"))  # same initial weights (e.g. GAN heads) on every rank
        self.teacher = teacher or resolve_teacher(cfg.teacher, config=cfg.teacher_config, allow_pickle=cfg.allow_pickle,
                                                  trust_remote_code=cfg.trust_remote_code, seed=cfg.seed, dtype=cfg.teacher_dtype)
        if self.teacher.pipe is not None:
            self.teacher.pipe.to(self.accelerator.device)
        self.teacher.backbone.to(self.accelerator.device)
        self.data = data or build_data_source(cfg, self.teacher)
        self.method = build_method(cfg.method, self.teacher, cfg, self.data.prompts)
        self.encode = PromptCache(self.teacher.pipe, self.accelerator.device) if self.teacher.pipe is not None else (lambda prompts: {})
        self._prepare()

    def _prepare(self) -> None:
        cfg, acc, method = self.cfg, self.accelerator, self.method
        for name, net in method.nets.items():
            method.nets[name] = acc.prepare_model(net) if _trainable(net) else net.to(acc.device)
        self.optimizers = {}
        for phase in method.phases:
            opt_cfg = cfg.optim if phase == "generator" else cfg.critic_optim
            params = [p for name in method.phase_nets(phase) for p in _trainable(method.nets[name])]
            optimizer = torch.optim.AdamW(params, lr=opt_cfg.lr, betas=tuple(opt_cfg.betas), weight_decay=opt_cfg.weight_decay, eps=opt_cfg.eps)
            self.optimizers[phase] = acc.prepare_optimizer(optimizer)
        self.emas = {"generator": EMA(_unwrap(method.nets["generator"]), cfg.ema_decay)} if cfg.ema_decay > 0 else {}
        # A method's own EMA targets (LCM's target network: a module it updates in ``after_step``),
        # saved and restored with the checkpoint like the generator's EMA; the trainer never updates them.
        self.emas.update(getattr(method, "ema_targets", {}))

    # ---- one step ---------------------------------------------------------------------------

    def make_batch(self, step: int, micro: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        micro_global = cfg.batch_size // cfg.grad_accum
        start = step * cfg.batch_size + micro * micro_global + acc.process_index * self.local_batch
        batch = self.data.items(start, self.local_batch)
        if "x0" in batch:
            batch["x0"] = batch["x0"].to(acc.device)
        batch["cond"] = self.encode(batch["prompts"])
        batch["uncond"] = self.encode([""] * len(batch["prompts"]))
        batch["rng"] = step_random(cfg.seed, step, f"micro{micro}", acc.process_index, acc.num_processes, acc.device)
        batch["step"] = step
        return batch

    def _no_sync(self, names: list[str], last: bool):
        if last:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for name in names:
            stack.enter_context(self.accelerator.no_sync(self.method.nets[name]))
        return stack

    def train_step(self, step: int) -> dict:
        cfg, acc, method = self.cfg, self.accelerator, self.method
        phase = method.phase(step)
        names = method.phase_nets(phase)
        optimizer = self.optimizers[phase]
        opt_cfg = cfg.optim if phase == "generator" else cfg.critic_optim
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, opt_cfg.lr, opt_cfg.warmup_steps)
        loss_fn = method.generator_loss if phase == "generator" else method.critic_loss
        logs: dict = {}
        for micro in range(cfg.grad_accum):
            with self._no_sync(names, micro == cfg.grad_accum - 1):
                with acc.autocast():
                    per_sample, logs = loss_fn(self.make_batch(step, micro))
                loss = per_sample.float().mean()
                self._check_finite(step, phase, loss, logs)
                acc.backward(loss / cfg.grad_accum)
        if opt_cfg.grad_clip > 0:
            params = [p for name in names for p in _trainable(method.nets[name])]
            logs["grad_norm"] = float(acc.clip_grad_norm_(params, opt_cfg.grad_clip))
        optimizer.step()
        for opt in self.optimizers.values():  # a generator loss may leave grads on critic params (SiD)
            opt.zero_grad(set_to_none=True)
        if phase == "generator" and "generator" in self.emas:
            self.emas["generator"].update(_unwrap(method.nets["generator"]))
        if hasattr(method, "after_step"):  # the one hook after an optimizer step (LCM's EMA target follows the student)
            method.after_step(step)
        mean_loss = acc.reduce(loss.detach(), reduction="mean").item()  # log the global batch's loss
        return {"phase": phase, f"loss_{phase}": mean_loss, **logs}

    def _check_finite(self, step: int, phase: str, loss: torch.Tensor, logs: dict) -> None:
        finite = self.accelerator.gather(torch.isfinite(loss.detach()).float()[None]).min().item()
        if finite < 1:
            latest = latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint had been written yet"
            raise TrainingDiverged(
                f"step {step}: the {phase} loss is {loss.item()} (parts: {logs}); training stopped and {kept}. "
                "Lower the learning rate, enable grad clipping, or check the teacher's precision."
            )

    # ---- side effects -----------------------------------------------------------------------

    def checkpoint(self, step: int) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            nets = {k: _unwrap(v) for k, v in self.method.nets.items() if _trainable(v)}
            optimizers = {k: opt.optimizer for k, opt in self.optimizers.items()}
            state = {"config": to_dict(self.cfg), "teacher": self.cfg.teacher, "method": self.cfg.method}
            save_checkpoint(self.run_dir, step, nets, self.emas, optimizers, state, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()

    def resume(self) -> int:
        path = latest_checkpoint(self.run_dir) if self.cfg.resume else None
        if path is None:
            return 0
        nets = {k: _unwrap(v) for k, v in self.method.nets.items() if _trainable(v)}
        optimizers = {k: opt.optimizer for k, opt in self.optimizers.items()}
        import json

        saved = json.loads((path / "state.json").read_text())
        for key in ("teacher", "method"):
            if saved[key] != getattr(self.cfg, key):
                raise ValueError(f"{self.run_dir} holds a run with {key}={saved[key]!r}, not {getattr(self.cfg, key)!r}; use another out=")
        state = load_checkpoint(path, nets, self.emas, optimizers)
        return int(state["step"])

    @torch.no_grad()
    def sample_grid(self, step: int) -> Path | None:
        from diffdistill.conditioning import encode_prompts
        from diffdistill.sampling import decode_latents

        cfg = self.cfg
        prompts = cfg.sample_prompts or self.data.prompts[:8]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "grid"))
        noise = torch.randn((len(prompts), *self.teacher.latent_shape), generator=gen).to(self.accelerator.device)
        cond = encode_prompts(self.teacher.pipe, prompts, self.accelerator.device)
        uncond = encode_prompts(self.teacher.pipe, [""] * len(prompts), self.accelerator.device)
        steps = cfg.sample_steps or self.method.default_sample_steps
        x0 = self.method.sample(noise, cond, uncond, steps, cfg.sample_guidance, gen)
        return save_grid(decode_latents(self.teacher.pipe, x0).cpu(), self.run_dir / "samples" / f"step-{step:08d}.png")

    def _out_of_time(self, tic: float) -> bool:
        """True on every process once the main process has passed the time limit (one decision, so DDP stays in step)."""
        if self.cfg.time_limit_minutes <= 0:
            return False
        over = torch.tensor([float(time.perf_counter() - tic > 60 * self.cfg.time_limit_minutes)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(over, reduction="sum").item() > 0)

    def fit(self) -> Path:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
            if acc.log_with:
                acc.init_trackers("diffdistill")
        start = self.resume()
        bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not acc.is_main_process, desc="train")
        tic = time.perf_counter()
        for step in bar:
            logs = self.train_step(step)
            done = step + 1
            if acc.is_main_process and (done % cfg.log_every == 0 or done == cfg.max_steps):
                logs["it_per_s"] = (done - start) / (time.perf_counter() - tic)
                append_metrics(self.run_dir, done, logs)
                acc.log({k: v for k, v in logs.items() if isinstance(v, float)}, step=done)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if isinstance(v, float)})
            if cfg.sample_every and done % cfg.sample_every == 0 and acc.is_main_process:
                self.sample_grid(done)
            out_of_time = self._out_of_time(tic)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or out_of_time:
                self.checkpoint(done)
            if out_of_time:
                bar.write(f"time limit of {cfg.time_limit_minutes:g} min reached after step {done}; stopped with a checkpoint")
                break
        acc.end_training()
        return self.run_dir


def train(cfg: TrainConfig) -> Path:
    """Runs (or resumes) the recipe and returns the run folder."""
    return Trainer(cfg).fit()


__all__ = ["Trainer", "train", "TrainingDiverged", "lr_at"]
