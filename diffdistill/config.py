"""Typed configuration: recipes (YAML) and ``key=value`` overrides become dataclasses.

Unknown keys and badly typed values are errors that name the closest valid key, so a typo in a
recipe never silently falls back to a default. The resolved config is written into every run
folder (``config.yaml``), from which a run can be re-created exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A recipe key or value that does not exist or does not parse, with the fix in the message."""


@dataclass
class DataConfig:
    source: str = "prompts"            # prompts | digits | imagefolder | webdataset (tar shards) | hf_dataset (a local `datasets`
                                       # folder) | latents (`diffdistill encode-latents`)
    prompts: list[str] = field(default_factory=list)  # inline prompts (source=prompts)
    prompts_file: str | None = None    # one prompt a line (source=prompts), e.g. the COCO-30k caption list
    path: str | None = None            # imagefolder root with metadata.jsonl ({"file_name", "text"} a line); webdataset: tar files (glob);
                                       # hf_dataset: a save_to_disk folder or a folder of .parquet/.arrow files; latents folder
    image_column: str = "image"        # hf_dataset: the column of images
    caption_column: str = "text"       # hf_dataset: the column of captions (the prompts the teacher is conditioned on)
    split: str = "train"               # hf_dataset: the split of a DatasetDict folder, or of split-named data files
    resolution: int | None = None      # image side in pixels; None: the backbone's sample_size x VAE factor
    uncond_prob: float = 0.0           # share of prompts replaced by "" (0.1 when training a teacher, so CFG works)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0              # linear warm-up, then constant (DMD2 uses 500)
    grad_clip: float = 1.0             # max global grad norm; 0 disables


@dataclass
class TrainConfig:
    teacher: str = "tiny:unet"         # local pipeline folder, .safetensors (+ teacher_config), tiny:ARCH, zoo:NAME
    teacher_config: str | None = None  # pipeline folder describing a single-file teacher
    allow_pickle: bool = False         # allow loading pickle checkpoints (they can run code): only for trusted files
    trust_remote_code: bool = False    # allow a pipeline's custom code to run
    teacher_dtype: str = "float32"     # float32 | bfloat16 | float16: precision the frozen teacher is held in
    student_guidance_embed: str = "drop"  # guidance-distilled teachers (Flux.1-dev: guidance_embeds): drop: the student has no
                                       # guidance input, the teacher's embedding at student_guidance folded in (a FLUX.1-schnell-shaped
                                       # student; plain pipelines then pass it no guidance) | keep: it keeps the input, always fed student_guidance
    student_guidance: float = 3.5      # that scale (FluxPipeline's default guidance_scale); the teacher's own scale is the method's guidance
    load_on_main_only: bool = True     # several processes: only the main one reads the teacher's weights from disk, the
                                       # others build it on meta and receive them by broadcast (one host copy, one disk read)
    out: str = "runs/run"              # the run folder: config, checkpoints, logs, sample grids
    method: dict = field(default_factory=lambda: {"name": "sft"})  # name + that method's own options
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)         # the generator's optimizer
    critic_optim: OptimConfig = field(default_factory=OptimConfig)  # the critic's (fake score, GAN head)
    batch_size: int = 4                # global batch per optimizer step, over all processes and accumulation
    grad_accum: int = 1                # micro-batches per optimizer step
    max_steps: int = 100
    time_limit_minutes: float = 0.0    # stop (with a checkpoint) after the step that passes this wall time; 0: no limit
    mixed_precision: str = "no"        # no | fp16 | bf16
    parallel: str = "ddp"              # ddp: every process holds whole nets | fsdp: PyTorch FSDP2 shards them over processes
    shard_teacher: bool = False        # fsdp: shard the frozen teacher too (else every process holds it, in teacher_dtype)
    cpu_offload: bool = False          # fsdp: keep parameter shards and optimizer state in host memory (GPU runs)
    gradient_checkpointing: bool = False  # recompute trained backbones' activations in backward (diffusers' own)
    optimizer: str = "adamw"           # adamw | adamw8bit (bitsandbytes: 8-bit moments, a quarter of AdamW's state)
    optimizer_offload: bool = False    # without FSDP: AdamW's moments and step in host memory (see engine.offload)
    seed: int = 0
    ema_decay: float = 0.0             # EMA of the generator; 0 disables
    checkpoint_every: int = 500        # plus one at the last step
    keep_checkpoints: int = 2
    sample_every: int = 0              # write a sample grid PNG every N steps; 0 disables
    sample_prompts: list[str] = field(default_factory=list)
    sample_steps: int | None = None    # sampler steps for grids; None: the method's own
    sample_guidance: float = 1.0
    eval_every: int = 0                # score the generator (its EMA if kept) every N steps and at the end; keep the best
                                       # checkpoint (checkpoints/best); 0 disables. The metric follows the teacher (see quality.py)
    eval_samples: int = 500            # samples a quality evaluation scores (fixed prompts and noise)
    eval_prompts: str | None = None    # real teachers: a prompts file (one caption a line) for FID and CLIP score
    eval_reference: str | None = None  # real teachers: Inception statistics of real images (.npz from `diffdistill eval`)
    log_every: int = 10
    log_with: str = "tensorboard"      # tensorboard (when installed) | wandb (W&B; WANDB_MODE=offline works without network) | none
    resume: bool = True                # continue from the latest checkpoint in `out` if there is one


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "critic_optim": OptimConfig}


def _valid_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        nested = SECTIONS.get(f.name) if cls is TrainConfig else None
        keys += _valid_keys(nested, f"{prefix}{f.name}.") if nested else [prefix + f.name]
    return keys


def unknown_key_error(key: str, valid: list[str], where: str = "recipe") -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown {where} key {key!r}{hint}")


def _coerce(value, annotation, key: str):
    """Checks (and gently converts) a value against a field's type: int->float is fine, str->int is not."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        (item,) = typing.get_args(annotation) or (typing.Any,)
        return [_coerce(v, item, key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / yes as a boolean
            return "no" if value is False else "yes"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if annotation is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = "", valid: list[str] | None = None):
    """Builds a dataclass from a nested dict, rejecting unknown keys with the closest valid one."""
    valid = valid if valid is not None else _valid_keys(cls)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in names:
            raise unknown_key_error(prefix + key, valid)
        nested = SECTIONS.get(key) if cls is TrainConfig else None
        if nested is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + key} must be a mapping of {', '.join(f.name for f in dataclasses.fields(nested))}")
            kwargs[key] = from_dict(nested, value, f"{prefix}{key}.", valid)
        else:
            kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Applies ``a.b=value`` strings to a nested dict; values parse as YAML (``lr=1e-5``, ``x=[1,2]``)."""
    data = yaml.safe_load(yaml.safe_dump(data)) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        value = _parse_override_value(key, raw)
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def _parse_override_value(key: str, raw: str):
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {key}={raw}: the value is not valid YAML ({problem}); quote it, e.g. {key}='{raw}'") from None


CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "teacher_dtype": ("float32", "bfloat16", "float16"),
    "student_guidance_embed": ("drop", "keep"),
    "data.source": ("prompts", "digits", "imagefolder", "webdataset", "hf_dataset", "latents"),
}


def _check_choices(cfg: TrainConfig) -> None:
    for key, options in CHOICES.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if node not in options:
            close = difflib.get_close_matches(str(node), options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}={node!r} is not valid{hint}; choose one of {', '.join(options)}")
    if cfg.batch_size <= 0 or cfg.grad_accum <= 0 or cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a positive multiple of grad_accum={cfg.grad_accum}")
    if not isinstance(cfg.method.get("name"), str):
        raise ConfigError("method must be a mapping with a 'name', e.g. method: {name: dmd2}")
    if Path(cfg.out).is_file():
        raise ConfigError(f"out={cfg.out!r} is a file; out= names the run folder (new, or one to resume)")


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: ``low``/``high`` bounds, each inclusive unless marked open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = self.low is None or value > self.low or (value == self.low and not self.low_open)
        below = self.high is None or value < self.high or (value == self.high and not self.high_open)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_ONE, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
FRACTION_BELOW_ONE = Range(0, 1, high_open=True)  # decays and Adam betas: 1 would never forget
OPTIM_RANGES = {"lr": POSITIVE, "betas": FRACTION_BELOW_ONE, "weight_decay": NON_NEGATIVE, "eps": POSITIVE,
                "warmup_steps": NON_NEGATIVE, "grad_clip": NON_NEGATIVE}
RANGES = {
    "max_steps": AT_LEAST_ONE, "checkpoint_every": AT_LEAST_ONE, "log_every": AT_LEAST_ONE, "keep_checkpoints": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE, "grad_accum": AT_LEAST_ONE, "sample_every": NON_NEGATIVE, "sample_steps": AT_LEAST_ONE,
    "eval_every": NON_NEGATIVE, "eval_samples": Range(2),
    "sample_guidance": NON_NEGATIVE, "time_limit_minutes": NON_NEGATIVE, "ema_decay": FRACTION_BELOW_ONE,
    "data.resolution": AT_LEAST_ONE, "data.uncond_prob": Range(0, 1),
    **{f"{section}.{key}": r for section in ("optim", "critic_optim") for key, r in OPTIM_RANGES.items()},
}


def _check_ranges(cfg: TrainConfig) -> None:
    """Every numeric key with a domain, so that max_steps=-1 or ema_decay=2 fails here and not silently later."""
    for key, allowed in RANGES.items():
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        for value in node if isinstance(node, list) else [node]:
            if value is not None and value not in allowed:
                raise ConfigError(f"{key}={node!r} is out of range: it must be {allowed}")


def _read_recipe(path: Path) -> dict:
    """The recipe file as a mapping; an unreadable, non-UTF-8, malformed or empty file is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist; shipped recipes are under recipes/ (e.g. recipes/tiny/sft.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "cannot be parsed"
        raise ConfigError(f"recipe {str(path)!r} is not valid YAML{where}: {problem}; fix that line") from None
    if data is None:
        raise ConfigError(f"recipe {str(path)!r} is empty; give keys such as teacher:, method: and out: (see recipes/tiny/sft.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of keys to values")
    return data


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    data = _read_recipe(Path(path)) if path is not None else {}
    cfg = from_dict(TrainConfig, apply_overrides(data, list(overrides)))
    _check_ranges(cfg)  # first: batch_size=0 is out of range before it is a bad multiple
    _check_choices(cfg)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
