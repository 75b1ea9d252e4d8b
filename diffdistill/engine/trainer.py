"""The one training loop, on ``accelerate``: one process, or many under DDP or FSDP2 (``parallel``).

Each optimizer step: ask the method which phase the step is, run ``grad_accum`` micro-batches of
that phase's loss, clip, step, update the EMA; then log, draw a sample grid, evaluate quality
(``eval_every``, with an evaluator: :mod:`.quality`), checkpoint.
Randomness and data order are functions of (seed, step), so a resumed run and a run on more
processes reproduce the single uninterrupted run (see :mod:`diffdistill.randomness`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffdistill.conditioning import PromptCache, encode_prompts
from diffdistill.config import ConfigError, TrainConfig, dump_yaml, to_dict
from diffdistill.denoiser import OwnState, adapter_checkpointing
from diffdistill.ema import EMA
from diffdistill.engine.checkpoint import (
    best_checkpoint,
    complete_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from diffdistill.engine.config_changes import check_resume, record_changes
from diffdistill.engine.logging import append_metrics, drop_metrics_after, flat_config, log_image, tracker_for
from diffdistill.engine.offload import HostOffloadedOptimizer
from diffdistill.engine.quality import Evaluator, improves, save_quality_curve, summary, teacher_reference
from diffdistill.engine.run_folder import RunFolderLock, main_decides, move_old_run_aside
from diffdistill.engine.sharding import full_tensor, is_sharded, reshard, set_gradient_sync, shard
from diffdistill.engine.signals import StopRequest, stop_on_signals
from diffdistill.methods.base import Method
from diffdistill.plots import labelled_grid
from diffdistill.randomness import derive_seed, step_random
from diffdistill.sampling import decode_latents


class TrainingDiverged(RuntimeError):
    """A loss became NaN or Inf; the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped training after a step, with a checkpoint at that step.
    ``exit_code`` is the shell's for that signal: 130 for SIGINT, 143 for SIGTERM."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to ``base_lr``, then constant (DMD2's schedule)."""
    return base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters a net trains: its own (a LoRA net's adapter, not the teacher it sits on,
    nor another net's adapter on the same weights) that require gradients."""
    module = _unwrap(module)
    owns = getattr(module, "owns", lambda name: True)
    return [p for name, p in module.named_parameters() if p.requires_grad and owns(name)]


@contextlib.contextmanager
def _frozen(params: list[torch.nn.Parameter]):
    """Trained ``params`` with ``requires_grad`` off for the duration, then on again."""
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _unwrap(module):
    return getattr(module, "module", module)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's accelerator; refuses a global batch that does not split over accumulation x processes."""
    log_with = tracker_for(cfg.log_with)
    # Without cpu=True, accelerate treats a multi-process launch on a machine with no GPU as
    # single-process; with it, `accelerate launch --multi_gpu --num_processes N` runs gloo DDP on CPU.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with, project_dir=str(Path(cfg.out)), cpu=not torch.cuda.is_available())
    world = accelerator.num_processes
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ConfigError(f"batch_size={cfg.batch_size} must divide evenly into grad_accum={cfg.grad_accum} x {world} processes")
    if cfg.parallel not in PARALLEL:
        raise ConfigError(f"parallel={cfg.parallel!r}: choose one of {', '.join(PARALLEL)}")
    if cfg.cpu_offload and not torch.cuda.is_available():
        raise ConfigError("cpu_offload moves shards from GPU to host memory; on a machine without GPUs drop cpu_offload=true")
    if cfg.parallel != "fsdp" and (cfg.shard_teacher or cfg.cpu_offload):
        raise ConfigError("shard_teacher and cpu_offload are FSDP options: add parallel=fsdp (and launch several processes)")
    if cfg.optimizer_offload and (cfg.parallel == "fsdp" or cfg.optimizer != "adamw"):
        fix = "under FSDP use cpu_offload=true (it offloads shards and their optimizer state)" if cfg.parallel == "fsdp" else \
            "8-bit AdamW steps on the GPU; choose one of optimizer=adamw8bit or optimizer_offload=true"
        raise ConfigError(f"optimizer_offload=true: {fix}")
    if cfg.parallel == "fsdp" and world == 1:
        raise ConfigError("parallel=fsdp shards over several processes, but this is one: launch with "
                          "`accelerate launch --multi_gpu --num_processes N -m diffdistill.cli train ...`, or drop parallel=fsdp")
    if cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    return accelerator


PARALLEL = ("ddp", "fsdp")
OPTIMIZERS = ("adamw", "adamw8bit")


def make_optimizer(kind: str, params: list, opt_cfg) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (moments quantized blockwise: 2 bytes a parameter, not 8).
    ``kind`` is one of OPTIMIZERS (checked with the rest of the run's settings in make_accelerator)."""
    options = {"lr": opt_cfg.lr, "betas": tuple(opt_cfg.betas), "weight_decay": opt_cfg.weight_decay, "eps": opt_cfg.eps}
    if kind == "adamw":
        return torch.optim.AdamW(params, **options)
    try:
        import bitsandbytes  # optional extra: 8-bit optimizers (CUDA)
    except ImportError as e:
        raise ConfigError("optimizer=adamw8bit needs bitsandbytes: `pip install bitsandbytes` on a CUDA machine, or use optimizer=adamw") from e
    return bitsandbytes.optim.AdamW8bit(params, **options)


def enable_gradient_checkpointing(nets: list) -> None:
    """diffusers' own activation checkpointing on every trained backbone that has it (GAN heads are small)."""
    backbones = [getattr(_unwrap(net), "backbone", None) for net in nets]
    able = [b for b in backbones if hasattr(b, "enable_gradient_checkpointing")]
    if not able:
        names = ", ".join(sorted({type(b).__name__ for b in backbones}))
        raise ConfigError(f"gradient_checkpointing: no trained backbone here ({names}) supports it; drop gradient_checkpointing=true")
    for backbone in able:
        backbone.enable_gradient_checkpointing(adapter_checkpointing(backbone))


def place_teacher(teacher, device) -> None:
    """Moves the frozen teacher (its pipeline's text encoders and VAE too) to the training device."""
    if teacher.pipe is not None:
        teacher.pipe.to(device)
    teacher.backbone.to(device)


class Trainer:
    def __init__(self, cfg: TrainConfig, teacher, method: Method, data, accelerator: Accelerator | None = None,
                 evaluator: Evaluator | None = None):
        """``teacher``, ``method`` and ``data`` come built (see :mod:`diffdistill.run`, which builds
        them from a recipe); the trainer knows only the :class:`~diffdistill.methods.base.Method` protocol
        and, for ``eval_every``, the :class:`~diffdistill.engine.quality.Evaluator` one."""
        if cfg.eval_every and evaluator is None:
            raise ConfigError("eval_every needs a quality metric for this teacher: train with `diffdistill train`, or pass "
                              "evaluator=diffdistill.quality.evaluator_for(cfg) to build_trainer / train; or set eval_every=0")
        self.cfg, self.run_dir, self.evaluator = cfg, Path(cfg.out), evaluator
        self.best: tuple[int, float] | None = None  # (step, value) of the best evaluation so far
        self.seconds_before = 0.0  # wall seconds of the run before this process resumed it
        self.reference: dict[str, float] = {}  # the evaluator's teacher values
        self.accelerator = accelerator or make_accelerator(cfg)
        self.local_batch = cfg.batch_size // (cfg.grad_accum * self.accelerator.num_processes)
        self.teacher, self.method, self.data = teacher, method, data
        place_teacher(teacher, self.accelerator.device)
        self.encode = PromptCache(teacher.pipe, self.accelerator.device) if teacher.pipe is not None else (lambda prompts: {})
        self._prepare()

    def _prepare(self) -> None:
        cfg, acc, method = self.cfg, self.accelerator, self.method
        self.trained = {name: _trainable(net) for name, net in method.nets.items() if _trainable(net)}  # name -> its trained params
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing([method.nets[name] for name in self.trained])
        self.sharded = cfg.parallel == "fsdp"
        # A method's EMA copies (LCM's target, Phased DMD's expert EMAs) follow a trained net parameter by
        # parameter, so under FSDP they are sharded as that net is.
        ema_copies = [id(m) for m in getattr(method, "ema_targets", {}).values()]
        for name, net in method.nets.items():
            if name not in self.trained and not (self.sharded and id(net) in ema_copies):
                method.nets[name] = net.to(acc.device)
            elif self.sharded:
                if not is_sharded(net):  # LoRA student and LoRA critic may share (and so have sharded) the teacher
                    shard(net.to(acc.device), cfg.mixed_precision, cfg.cpu_offload)
            else:
                with self._frozen_except(name):  # DDP reduces what requires grad when it wraps: this net's own only
                    method.nets[name] = acc.prepare_model(net)
        if self.sharded and cfg.shard_teacher and not is_sharded(self.teacher.backbone):  # a LoRA critic may have sharded it
            shard(self.teacher.backbone)  # frozen: gathered block by block for its forward passes, in its own dtype
        self.optimizers = {}
        for phase in method.phases:
            opt_cfg = cfg.optim if phase == "generator" else cfg.critic_optim
            params = [p for name in method.phase_nets(phase) for p in _trainable(method.nets[name])]
            if cfg.optimizer_offload:
                optimizer = HostOffloadedOptimizer(params, lambda host, c=opt_cfg: make_optimizer(cfg.optimizer, host, c))
            else:
                optimizer = make_optimizer(cfg.optimizer, params, opt_cfg)
            self.optimizers[phase] = acc.prepare_optimizer(optimizer)
        self.emas = {"generator": EMA(OwnState(_unwrap(method.nets["generator"])), cfg.ema_decay)} if cfg.ema_decay > 0 else {}
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
        # One stream per step, sliced by (micro-batch, process) as the data is: accumulating micro-batches
        # draws the numbers one step at the same global batch draws, on any number of processes.
        slot, slots = micro * acc.num_processes + acc.process_index, cfg.grad_accum * acc.num_processes
        batch["rng"] = step_random(cfg.seed, step, "micro0", slot, slots, acc.device)
        batch["step"] = step
        return batch

    def _no_sync(self, names: list[str], last: bool):
        if self.sharded:  # FSDP2: reduce-scatter only the last micro-batch's gradients
            for name in names:
                set_gradient_sync(self.method.nets[name], last)
            return contextlib.nullcontext()
        if last:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for name in names:
            stack.enter_context(self.accelerator.no_sync(self.method.nets[name]))
        return stack

    def _frozen_except(self, keep: str):
        """Every trained net's parameters but ``keep``'s frozen for the duration."""
        return _frozen([p for name, params in self.trained.items() if name != keep for p in params])

    @contextlib.contextmanager
    def _reading_only(self, stepped: list[str]):
        """Nets this phase reads but does not step (the critic in a generator phase) run unwrapped
        with frozen parameters: gradients still flow to their inputs, but none is computed for their
        weights, so DDP expects no reduction (a GAN head reading part of a DDP critic would otherwise
        leave it waiting for the rest) and FSDP reduces nothing for them."""
        method, read = self.method, {name: net for name, net in self.method.nets.items() if name in self.trained and name not in stepped}
        for name, net in read.items():
            method.nets[name] = _unwrap(net)
        try:
            with _frozen([p for name in read for p in self.trained[name]]):
                yield
        finally:
            method.nets.update(read)

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
            with self._reading_only(names), self._no_sync(names, micro == cfg.grad_accum - 1):
                with acc.autocast():
                    per_sample, logs = loss_fn(self.make_batch(step, micro))
                loss = per_sample.float().mean()
                self._check_finite(step, phase, loss, logs)
                acc.backward(loss / cfg.grad_accum)
        if opt_cfg.grad_clip > 0:
            params = [p for name in names for p in _trainable(method.nets[name])]
            logs["grad_norm"] = float(full_tensor(acc.clip_grad_norm_(params, opt_cfg.grad_clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if self.sharded:
            for net in method.nets.values():
                reshard(net)
        if phase == "generator" and "generator" in self.emas:
            self.emas["generator"].update(OwnState(_unwrap(method.nets["generator"])))
        if hasattr(method, "after_step"):  # the one hook after an optimizer step (LCM's EMA target follows the student)
            method.after_step(step)
        # The loss and the method's float parts, averaged over processes in one collective: the logs
        # describe the global batch, not the main process's share (grad_norm is global already).
        parts = sorted(k for k, v in logs.items() if isinstance(v, float) and k != "grad_norm")
        values = torch.tensor([loss.detach().float().item(), *(logs[k] for k in parts)], device=acc.device)
        mean_loss, *means = acc.reduce(values, reduction="mean").tolist()
        return {"phase": phase, f"loss_{phase}": mean_loss, **logs, **dict(zip(parts, means))}

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

    def _state_views(self) -> tuple[dict, dict, dict]:
        """What a checkpoint holds: trained nets (their own tensors), EMAs, optimizers (under FSDP, each process's shards)."""
        nets = {k: OwnState(_unwrap(self.method.nets[k])) for k in self.trained}
        optimizers = {k: opt.optimizer for k, opt in self.optimizers.items()}
        return nets, dict(self.emas), optimizers

    def checkpoint(self, step: int, seconds: float, quality: dict | None = None) -> Path:
        """Writes the step's checkpoint; with ``quality`` (the main process's evaluation) it is kept in
        ``state.json`` and, when it is the best so far, ``checkpoints/best`` names this checkpoint."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.sharded or acc.is_main_process:  # sharded, every process writes its own shards
            state = {"config": to_dict(self.cfg), "teacher": self.cfg.teacher, "method": self.cfg.method, "train_seconds": seconds}
            best = False
            if quality is not None:
                state["quality"] = quality
                value = quality[self.evaluator.metric]
                best = improves(value, self.best and self.best[1], self.evaluator.lower_is_better)
                self.best = (step, value) if best else self.best
            save_checkpoint(self.run_dir, step, *self._state_views(), state, self.cfg.keep_checkpoints, sharded=self.sharded, best=best)
        acc.wait_for_everyone()
        return self.run_dir / "checkpoints" / f"step-{step:08d}"

    def resume(self) -> int:
        """Loads the checkpoint the main process chose (:meth:`_plan_resume`); returns its step, 0 for a fresh start."""
        path = main_decides(self.accelerator, self._plan_resume)
        if path is None:
            return 0
        state = load_checkpoint(Path(path), *self._state_views())
        self.seconds_before = float(state.get("train_seconds", 0.0))
        return int(state["step"])

    def _plan_resume(self) -> str | None:
        """Main process: the checkpoint to continue from, once the config is checked against it;
        ``config.yaml`` is written only after that check, and metrics past the checkpoint are dropped."""
        cfg, run_dir = self.cfg, self.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            for moved in move_old_run_aside(run_dir):
                print(f"resume=false: moved the earlier run's files to {moved}")
        had_checkpoints = cfg.resume and bool(complete_checkpoints(run_dir / "checkpoints"))
        path = resume_checkpoint(run_dir) if cfg.resume else None
        if path is None and had_checkpoints:
            raise ConfigError(f"no checkpoint in {run_dir / 'checkpoints'} verifies (each moved aside as damaged-step-*); "
                              "start a new run there with resume=false, or choose another out=")
        step = 0
        if path is not None:
            saved = json.loads((path / "state.json").read_text())
            step = int(saved["step"])
            if "config" in saved:
                record_changes(run_dir, step, check_resume(saved["config"], to_dict(cfg), step, path))
            print(f"resuming from step {step} (checkpoint {path})")
        dump_yaml(cfg, run_dir / "config.yaml")
        drop_metrics_after(run_dir, step)
        self.best = self._saved_best()
        return None if path is None else str(path)

    def _saved_best(self) -> tuple[int, float] | None:
        """(step, value) of the checkpoint ``best`` names, if it was ranked by this run's metric."""
        path = best_checkpoint(self.run_dir)
        if path is None or self.evaluator is None:
            return None
        saved = json.loads((path / "state.json").read_text())
        value = saved.get("quality", {}).get(self.evaluator.metric)
        return None if value is None else (int(saved["step"]), float(value))

    @torch.no_grad()
    def sample_grid(self, step: int) -> Path | None:
        cfg = self.cfg
        prompts = cfg.sample_prompts or self.data.prompts[:8]
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "grid"))
        noise = torch.randn((len(prompts), *self.teacher.latent_shape), generator=gen).to(self.accelerator.device)
        cond = encode_prompts(self.teacher.pipe, prompts, self.accelerator.device)
        uncond = encode_prompts(self.teacher.pipe, [""] * len(prompts), self.accelerator.device)
        steps = cfg.sample_steps or self.method.default_sample_steps
        x0 = self.method.sample(noise, cond, uncond, steps, cfg.sample_guidance, gen)
        if not self.accelerator.is_main_process:  # under FSDP every process joins the sampling; one writes
            return None
        headings = [p if len(p) <= 28 else p[:27] + "…" for p in prompts]  # the prompt above each sample
        path = labelled_grid({f"step {step}": decode_latents(self.teacher.pipe, x0).cpu()}, headings,
                             self.run_dir / "samples" / f"step-{step:08d}.png")
        log_image(self.accelerator.trackers, path, step)
        return path

    @contextlib.contextmanager
    def _sampling_weights(self):
        """The generator as a user gets it: unwrapped (no DDP collective on one process) and, when the
        run keeps an EMA, with the EMA's weights loaded; the trained weights are restored after."""
        method, wrapped = self.method, dict(self.method.nets)
        method.nets.update({name: _unwrap(net) for name, net in wrapped.items()})
        own = OwnState(method.nets["generator"])
        trained = {k: v.detach().clone() for k, v in own.state_dict().items()} if "generator" in self.emas else None
        try:
            if trained is not None:
                own.load_state_dict(self.emas["generator"].state_dict())
            yield
        finally:
            if trained is not None:
                own.load_state_dict(trained)
            method.nets.update(wrapped)

    @torch.no_grad()
    def generate(self, prompts: list[str], batch: int = 100) -> torch.Tensor:
        """Samples for ``prompts`` from the same noise every call (seeded by the run's seed), with the
        method's own sampler at ``sample_guidance``: images in [-1, 1], or data for a pipeline-less teacher."""
        cfg, device = self.cfg, self.accelerator.device
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "eval"))
        noise = torch.randn((len(prompts), *self.teacher.latent_shape), generator=gen)
        steps = cfg.sample_steps or self.method.default_sample_steps
        out = []
        with self._sampling_weights():
            for i in range(0, len(prompts), batch):
                chunk = prompts[i : i + batch]
                x0 = self.method.sample(noise[i : i + batch].to(device), self.encode(chunk), self.encode([""] * len(chunk)),
                                        steps, cfg.sample_guidance, gen)
                out.append((decode_latents(self.teacher.pipe, x0) * 2 - 1 if self.teacher.pipe is not None else x0).float().cpu())
        return torch.cat(out)

    def evaluate(self, step: int, seconds: float) -> dict | None:
        """The evaluator's metrics at ``step`` on the main process (every process samples under FSDP),
        logged to metrics.jsonl, the trackers and ``quality.png``; None on the other processes."""
        acc = self.accelerator
        if not (acc.is_main_process or self.sharded):
            return None
        samples = self.generate(self.evaluator.prompts)
        if not acc.is_main_process:
            return None
        metrics = {k: float(v) for k, v in self.evaluator(samples).items() if isinstance(v, (int, float))}
        append_metrics(self.run_dir, step, {"phase": "eval", **metrics, "train_seconds": seconds})
        acc.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        curve = save_quality_curve(self.run_dir, self.evaluator, self.reference)
        if curve is not None:
            log_image(acc.trackers, curve, step, "quality")
        tqdm.write(summary(step, metrics, self.evaluator.metric, self.best, self.reference))
        return metrics

    def _should_stop(self, tic: float, request: StopRequest) -> tuple[bool, int]:
        """(past the time limit, the stop signal or 0), one decision for every process (one all-reduce),
        so DDP and FSDP stay in step: any process past the limit or signalled stops them all."""
        over = self.cfg.time_limit_minutes > 0 and time.perf_counter() - tic > 60 * self.cfg.time_limit_minutes
        flags = torch.tensor([float(over), float(request.signum == signal.SIGINT), float(request.signum == signal.SIGTERM)],
                             device=self.accelerator.device)
        over, sigint, sigterm = (self.accelerator.reduce(flags, reduction="sum") > 0).tolist()
        return over, int(signal.SIGINT if sigint else signal.SIGTERM if sigterm else 0)

    def fit(self) -> Path:
        """Trains from the checkpoint to resume (or step 0) to ``max_steps``, owning the run folder meanwhile."""
        lock = RunFolderLock(self.run_dir)
        main_decides(self.accelerator, lock.acquire)  # before anything is written there
        try:
            with stop_on_signals() as request:
                return self._train_loop(request)
        finally:
            lock.release()

    def _train_loop(self, request: StopRequest) -> Path:
        cfg, acc = self.cfg, self.accelerator
        start = self.resume()
        if acc.is_main_process and acc.log_with:  # the run folder's name names the W&B run; W&B writes under the run folder
            acc.init_trackers("diffdistill", config=flat_config(cfg), init_kwargs={"wandb": {"name": self.run_dir.name, "dir": str(self.run_dir)}})
        if self.evaluator is not None and acc.is_main_process:  # before the clock starts: the teacher's cost is not the run's
            self.reference = teacher_reference(self.run_dir, self.evaluator)
        bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, disable=not acc.is_main_process, desc="train")
        tic = time.perf_counter()
        try:
            for step in bar:
                logs = self.train_step(step)
                done = step + 1
                if acc.is_main_process and (done % cfg.log_every == 0 or done == cfg.max_steps):
                    logs["it_per_s"] = (done - start) / (time.perf_counter() - tic)
                    append_metrics(self.run_dir, done, logs)
                    acc.log({k: v for k, v in logs.items() if isinstance(v, float)}, step=done)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if isinstance(v, float)})
                if cfg.sample_every and done % cfg.sample_every == 0 and (acc.is_main_process or self.sharded):
                    self.sample_grid(done)
                evaluating = bool(cfg.eval_every) and (done % cfg.eval_every == 0 or done == cfg.max_steps)
                quality = self.evaluate(done, self.seconds_before + time.perf_counter() - tic) if evaluating else None
                out_of_time, signum = self._should_stop(tic, request)
                if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or out_of_time or signum or evaluating:
                    path = self.checkpoint(done, self.seconds_before + time.perf_counter() - tic, quality)
                if signum:
                    raise TrainingInterrupted(f"{signal.Signals(signum).name}: stopped after step {done} with checkpoint {path}; "
                                              "run the same command again to resume", signum)
                if out_of_time:
                    bar.write(f"time limit of {cfg.time_limit_minutes:g} min reached after step {done}; stopped with a checkpoint")
                    break
        finally:
            acc.end_training()
        return self.run_dir


__all__ = ["Trainer", "TrainingDiverged", "TrainingInterrupted", "lr_at", "make_accelerator", "place_teacher"]
