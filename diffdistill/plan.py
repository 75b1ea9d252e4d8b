"""``diffdistill plan``: a per-GPU memory *prediction* for a distillation recipe, from config files alone.

Backbones, VAEs and text encoders are built from ``config.json`` on the meta device (shapes, no weights) and counted. Activations
are measured, not guessed: the forward runs on meta tensors under ``saved_tensors_hooks``, which sees every tensor autograd keeps
for backward, with and without diffusers' gradient checkpointing. The rest is arithmetic."""

from __future__ import annotations

import contextlib
import json
import re
from collections import namedtuple
from dataclasses import dataclass, replace
from pathlib import Path
from unittest import mock

import diffusers
import torch
import transformers
from peft import LoraConfig, inject_adapter_in_model

from diffdistill.backbones import feature_module
from diffdistill.config import ConfigError, load_recipe
from diffdistill.denoiser import LORA_TARGETS
from diffdistill.methods.adversarial import DiscriminatorHeads, as_tokens, pooled_text
from diffdistill.methods.base import method_options
from diffdistill.scores import GANHead, LayerTaps

GIB = 2**30
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
COMPUTE_DTYPE = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}
BACKBONES = {"UNet2DConditionModel": "unet", "SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux",
             "DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart", "SanaTransformer2DModel": "sana"}
TEXT_TOKENS = {"unet": 77, "sd3": 333, "flux": 512, "pixart": 300, "sana": 300}  # what each pipeline encodes (SD3: 77 CLIP + 256 T5)
CRITIC_METHODS = {"dmd", "dmd2", "diff_instruct", "fdistill", "phased_dmd", "rcm", "sid", "sim"}  # methods that train a fake score
TEACHER_HEAD_METHODS = {"ladd"}  # discriminator heads on the frozen teacher's blocks, the generator's gradient through the teacher

# Stated sizes assumed where a folder has no vae/ or text_encoder*/config.json (the published models, counted on meta).
DEFAULT_VAE = ("SD VAE (AutoencoderKL 128-512 ch)", 83_653_863)
_L, _LP, _H, _G, _T5 = (("CLIP ViT-L/14", 123_060_480), ("CLIP ViT-L/14 + projection", 123_650_304), ("OpenCLIP ViT-H/14", 340_387_840),
                        ("OpenCLIP bigG/14 + projection", 694_659_840), ("T5-v1.1-XXL encoder", 4_762_310_656))
DEFAULT_TEXT_ENCODERS = {"unet:768": [_L], "unet:1024": [_H], "unet:2048": [_L, _G], "sd3": [_LP, _G, _T5], "flux": [_L, _T5], "pixart": [_T5]}
COMPONENTS = ("student", "teacher", "critic", "GAN head", "VAE + text", "grads", "optimizer", "EMA", "activations", "workspace")
# (label, change, cost): cheapest first, by what a tier costs in speed or in the trained result
TIER_LADDER = (("bf16 teacher", {"teacher_dtype": "bfloat16"}, 1), ("FSDP x{gpus}", {"parallel": "fsdp"}, 2),
               ("grad ckpt", {"gradient_checkpointing": True}, 3), ("8-bit Adam", {"adam8bit": True}, 3),
               ("LoRA critic", {"critic": "lora"}, 4), ("optimizer offload", {"optimizer_offload": True}, 5))
STUDENT_LORA = ("LoRA student", {"student_lora": True}, 8)
PipelineConfigs = namedtuple("PipelineConfigs", "folder backbone_class backbone vae text_encoders vae_factor")
# Bytes of one forward with grad: kept for backward at its end (saved) and once the GAN's feature module has run (at_features);
# saved weights in the compute dtype (weights); the largest checkpointed block's own saved bytes (block_peak) and size.
Activations = namedtuple("Activations", "saved at_features weights block_peak block_params")
# LADD's teacher pass: the frozen teacher's forward with grad to its input (never checkpointed: only trained backbones are), the
# bytes of the block outputs its heads read (held through a no-grad pass until the heads run), and what the heads keep for backward.
TeacherHeadsPass = namedtuple("TeacherHeadsPass", "teacher features heads")
Measurements = namedtuple("Measurements", "backbone buffers lora gan_head frozen frozen_note latent activations teacher_heads", defaults=(None,))


# Configs and parameter counts, on the meta device.
def read_pipeline_configs(folder) -> PipelineConfigs:
    """A diffusers pipeline folder (unet/ or transformer/config.json) or a folder holding only the backbone's config.json."""
    def _read_json(file: Path) -> dict | None:
        try:
            return json.loads(file.read_text()) if file.is_file() else None
        except ValueError as error:
            raise ConfigError(f"{file} is not valid JSON ({error}); fix or replace that config file") from None
    path = Path(folder)
    fix = "point teacher= at a diffusers pipeline folder (unet/ or transformer/config.json) or a folder with the backbone's config.json"
    if not path.is_dir():
        raise ConfigError(f"teacher {str(folder)!r} is not a local folder, and plan reads config files only: {fix}")
    cfg = next((c for c in (_read_json(path / sub / "config.json") for sub in ("unet", "transformer", ".")) if c), None)
    if cfg is None:
        raise ConfigError(f"{path} holds no backbone config (no unet/config.json, transformer/config.json or config.json); {fix}")
    if cfg.get("_class_name") not in BACKBONES:
        raise ConfigError(f"{path}: backbone _class_name {cfg.get('_class_name')!r} is not one plan builds ({', '.join(BACKBONES)}); {fix}")
    encoders = [(p.name, c) for p, c in ((p, _read_json(p / "config.json")) for p in sorted(path.glob("text_encoder*"))) if c]
    vae = _read_json(path / "vae" / "config.json")
    # The VAE's downsampling: 2^(levels - 1); without its config, SD-style 8x (Sana's DC-AE: 32x).
    factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae and "block_out_channels" in vae else 32 if "Sana" in cfg["_class_name"] else 8
    return PipelineConfigs(str(path), cfg["_class_name"], cfg, vae, encoders, factor)


def build_backbone(cfg: dict, kind: str | None = None) -> torch.nn.Module:
    """``kind``: a family (unet, sd3, flux, dit, pixart, sana) or class name, for configs without ``_class_name``."""
    name = {family: cls for cls, family in BACKBONES.items()}.get(kind, kind) or cfg.get("_class_name")
    if name not in BACKBONES:
        raise ConfigError(f"backbone {name!r} is unknown; give kind= one of {', '.join(BACKBONES.values())}")
    with torch.device("meta"):  # shapes only: a 12B transformer costs nothing to build
        return getattr(diffusers, name).from_config(cfg)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else 0


def count_parameters(config_dir_or_dict, kind: str | None = None) -> int:
    """Parameters of a backbone built on meta from its config: a dict, or a folder as read_pipeline_configs reads it."""
    if isinstance(config_dir_or_dict, (str, Path)):
        pipe = read_pipeline_configs(config_dir_or_dict)
        config_dir_or_dict, kind = pipe.backbone, pipe.backbone_class
    return _numel(build_backbone(config_dir_or_dict, kind))


def frozen_pipeline_parameters(pipe: PipelineConfigs, backbone_config: dict) -> tuple[int, str]:
    """VAE + text encoders (frozen, in the teacher's dtype): counted from their configs on meta, else the stated defaults."""
    with torch.device("meta"):
        counts = [("VAE (vae/config.json)", _numel(getattr(diffusers, pipe.vae["_class_name"]).from_config(pipe.vae)))] if pipe.vae else []
    counts = counts or [(f"{DEFAULT_VAE[0]} (default)", DEFAULT_VAE[1])]
    for folder, cfg in pipe.text_encoders:
        config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures", "_name_or_path")})
        with torch.device("meta"):
            counts.append((f"{cfg['architectures'][0]} ({folder}/config.json)", _numel(getattr(transformers, cfg["architectures"][0])(config))))
    key = f"unet:{backbone_config.get('cross_attention_dim')}" if pipe.backbone_class == "UNet2DConditionModel" else BACKBONES[pipe.backbone_class]
    counts += [] if pipe.text_encoders else [(f"{name} (default)", n) for name, n in DEFAULT_TEXT_ENCODERS.get(key, [])]
    return sum(n for _, n in counts), "; ".join(f"{name} {n / 1e6:.1f}M" for name, n in counts)


def add_lora(model: torch.nn.Module, rank: int) -> int:
    """peft LoRA on the attention projections (make_critic's targets), the rest frozen; returns what it trains: the adapters."""
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [t for t in LORA_TARGETS if any(name.endswith(t) for name in linears)]
    with torch.device("meta"):
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
    model.requires_grad_(False)
    return sum(p.requires_grad_(True).numel() for name, p in model.named_parameters() if "lora_" in name)


# Activations, measured on meta tensors.
class _FusedAttentionSaves(torch.autograd.Function):
    """What fused SDPA (flash / memory-efficient on a GPU, flash on a CPU) keeps: q, k, v, output, fp32 log-sum-exp; meta's math path
    would save L x L. The output is laid out (B, L, heads, D) and returned transposed, so merging the heads after it copies nothing."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1])).transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


class SavedTensorMeter:
    """Bytes autograd keeps for backward, once per storage; saved parameters are tallied apart (weights, not activations)."""

    def __init__(self, model: torch.nn.Module):
        self.weight_ids = {self.storage(p)[0] for p in model.parameters()}
        self.activations, self.weights, self.kept = {}, {}, []
        self.at_features, self.feature_shape, self.block_peak, self.block_params = 0, None, 0, 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.kept.append(t)  # holds every saved storage, so no storage id is reused during the pass
        key, nbytes = self.storage(t)
        (self.weights if key in self.weight_ids else self.activations)[key] = nbytes
        return t

    @staticmethod
    def storage(t: torch.Tensor) -> tuple[int, int]:
        """(identity, bytes) of a tensor's storage: meta tensors have no data_ptr but have storages, so views count once."""
        try:
            storage = t.untyped_storage()
            return storage._cdata, storage.nbytes()
        except (RuntimeError, NotImplementedError, AttributeError):
            return id(t), t.numel() * t.element_size()

    @property
    def saved(self) -> int:
        return sum(self.activations.values())

    @contextlib.contextmanager
    def counting(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield self

    def checkpointing_func(self, cache: dict):
        """diffusers' gradient_checkpointing_func, plus what backward's recompute of the block holds: one un-checkpointed
        pass of that block, measured the same way (blocks of one class, size and input shape once)."""
        def checkpoint(block, *args, **kwargs):
            key = (type(block).__name__, _numel(block), tuple(tuple(a.shape) for a in args if torch.is_tensor(a)))
            if key not in cache:
                inner = SavedTensorMeter(block)
                with inner.counting():  # the innermost hooks win: this meter does not see these saves
                    block(*args, **kwargs)
                cache[key] = inner.saved
            self.block_peak, self.block_params = max(self.block_peak, cache[key]), max(self.block_params, key[1])
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
        return checkpoint


def example_inputs(kind: str, cfg, batch: int, latent: int, dtype: torch.dtype) -> dict:
    """The conditioning each family's pipeline feeds, at the config's sizes, as meta tensors."""
    def rand(*shape, grad=False):
        return torch.randn(*shape, dtype=dtype, device="meta").requires_grad_(grad)
    x, t, text = rand(batch, cfg.get("in_channels", 4), latent, latent, grad=True), torch.full((batch,), 500.0, device="meta"), TEXT_TOKENS.get(kind)
    if kind == "unet":
        inputs = {"sample": x, "timestep": t, "encoder_hidden_states": rand(batch, text, cfg["cross_attention_dim"])}
        if cfg.get("addition_embed_type") == "text_time":  # SDXL: pooled text embedding + 6 size/crop ids
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            inputs["added_cond_kwargs"] = {"text_embeds": rand(batch, pooled), "time_ids": rand(batch, 6)}
        return inputs
    if kind in ("sd3", "flux"):
        inputs = {"hidden_states": x, "timestep": t, "encoder_hidden_states": rand(batch, text, cfg["joint_attention_dim"]),
                  "pooled_projections": rand(batch, cfg["pooled_projection_dim"])}
        if kind == "flux":  # latents packed 2x2 into tokens, one position id per token
            tokens = (latent // 2) ** 2
            inputs |= {"hidden_states": rand(batch, tokens, cfg["in_channels"], grad=True), "timestep": t / 1000,
                       "img_ids": torch.zeros(tokens, 3, device="meta"), "txt_ids": torch.zeros(text, 3, device="meta")}
            inputs |= {"guidance": torch.full((batch,), 3.5, device="meta")} if cfg.get("guidance_embeds") else {}
        return inputs
    if kind == "dit":
        return {"hidden_states": x, "timestep": t.long(), "class_labels": torch.zeros(batch, dtype=torch.long, device="meta")}
    inputs = {"hidden_states": x, "timestep": t, "encoder_hidden_states": rand(batch, text, cfg["caption_channels"])}
    return inputs | ({"added_cond_kwargs": {"resolution": rand(batch, 2), "aspect_ratio": rand(batch, 1)}} if kind == "pixart" else {})


def measure_activations(model, kind: str, batch: int, latent: int, checkpointing: bool) -> tuple[Activations, tuple]:
    """One forward with grad, on meta tensors in the model's (compute) dtype; diffusers checkpoints only with grad enabled, as here."""
    meter = SavedTensorMeter(model)
    model.enable_gradient_checkpointing(meter.checkpointing_func({})) if checkpointing else model.disable_gradient_checkpointing()
    def mark_features(module, args, output):  # SD3's last block returns (None, hidden): the first tensor is the feature
        feature = next(o for o in output if torch.is_tensor(o)) if isinstance(output, tuple) else output
        meter.at_features, meter.feature_shape = meter.saved, tuple(feature.shape)
    hook = feature_module(model).register_forward_hook(mark_features)
    try:
        with (mock.patch("torch.nn.functional.scaled_dot_product_attention",  # same signature, fused attention's saves
                         lambda query, key, value, *args, **kwargs: _FusedAttentionSaves.apply(query, key, value)), meter.counting()):
            model.train()(**example_inputs(kind, model.config, batch, latent, next(model.parameters()).dtype), return_dict=False)
    finally:
        hook.remove()
    return Activations(meter.saved, meter.at_features, sum(meter.weights.values()), meter.block_peak, meter.block_params), meter.feature_shape


def measure_teacher_heads(model, kind: str, batch: int, latent: int, layers: list[int] | None, width: int) -> tuple[int, TeacherHeadsPass]:
    """LADD on meta: the frozen teacher's forward with grad to its input, its blocks tapped as the method taps them (LayerTaps), and
    its DiscriminatorHeads built on those features and run once. Returns (the heads' parameters, the pass's bytes)."""
    model.requires_grad_(False)
    taps = LayerTaps(model, layers)
    with taps.reading():
        teacher, _ = measure_activations(model, kind, batch, latent, checkpointing=False)
    inputs = example_inputs(kind, model.config, batch, latent, next(model.parameters()).dtype)
    text = pooled_text({k: v for k, v in (inputs | inputs.get("added_cond_kwargs", {})).items() if torch.is_tensor(v)}, batch, "meta")
    features = [torch.empty_like(f, device="meta").requires_grad_(True) for f in taps.values]  # graph from here on only
    with torch.device("meta"):
        heads = DiscriminatorHeads([as_tokens(f).shape[-1] for f in features], [1.0] * len(features), text.shape[1], 1.0, width)
    meter = SavedTensorMeter(heads)
    with meter.counting():
        heads(features, torch.full((batch,), 0.5, device="meta"), text)
    return _numel(heads), TeacherHeadsPass(teacher, sum(SavedTensorMeter.storage(f)[1] for f in features), meter.saved)


# The plan: what a recipe keeps on each GPU.
@dataclass
class PlanSpec:
    teacher: str                   # pipeline folder, or a folder with the backbone's config.json
    method: dict                   # the recipe's method section: name, gan_weight, guidance, critic_lora_rank
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    batch: int = 1                 # micro-batch per GPU
    resolution: int = 512          # image side in pixels
    mixed_precision: str = "bf16"  # autocast: activations in bf16, trained weights in param_dtype
    teacher_dtype: str = "float32"
    param_dtype: str = "float32"   # trained weights; the trainer keeps float32, and they are AdamW's master weights
    ema: bool = False
    lora_rank: int = 64            # for the LoRA tiers (the recipe's critic_lora_rank where it sets one)
    shard_teacher: bool = True     # under FSDP: shard the frozen teacher too, else replicate it
    workspace_fraction: float = 0.10  # allocator fragmentation, cuBLAS / NCCL / attention workspaces ...
    workspace_fixed_gib: float = 1.0  # ... and the CUDA context
    device: str = "cuda"           # cpu: one process's RSS, no CUDA context or fixed workspace; the 10% allocator margin stays

    def passes(self) -> tuple[bool, bool, int]:
        """(trains a fake score, has a GAN term, batches of a guided teacher pass: CFG runs cond + uncond as one 2B batch)."""
        guided = 1 if float(self.method.get("guidance", 1.0)) == 1.0 else 2
        return self.method.get("name") in CRITIC_METHODS, float(self.method.get("gan_weight") or 0) > 0, guided

    def teacher_heads(self) -> bool:
        """LADD: trained heads on the frozen teacher's blocks, in place of a fake score and a GAN head."""
        return self.method.get("name") in TEACHER_HEAD_METHODS

    def options(self):
        """The method's options dataclass (its defaults filled in), as the trainer reads the recipe's method section."""
        return method_options(self.method)[1]


def measure_plan(spec: PlanSpec) -> Measurements:
    """All the meta-device work: counts, and activations of {full, LoRA} x {checkpointing off, on} at the spec's batch."""
    pipe = read_pipeline_configs(spec.teacher)
    activations, counts, latent = {}, {}, spec.resolution // pipe.vae_factor
    for lora in (False, True):
        model = build_backbone(pipe.backbone, pipe.backbone_class)
        config, buffers = dict(model.config), sum(b.numel() for b in model.buffers())
        counts[lora] = add_lora(model, spec.lora_rank) if lora else _numel(model.requires_grad_(True))
        torch.nn.Module.to(model, getattr(torch, COMPUTE_DTYPE[spec.mixed_precision]))  # nn.Module.to: diffusers' .to warns
        for checkpointing in (False, True):
            activations[lora, checkpointing], features = measure_activations(model, BACKBONES[pipe.backbone_class], spec.batch, latent, checkpointing)
    with torch.device("meta"):  # DMD2's classifier on the critic's features
        gan_head = _numel(GANHead(features[-1] if len(features) == 3 else features[1], len(features))) if spec.passes()[1] else 0
    teacher_heads = None
    if spec.teacher_heads():  # a fifth pass, on a fresh frozen copy
        options = spec.options()
        model = torch.nn.Module.to(build_backbone(pipe.backbone, pipe.backbone_class), getattr(torch, COMPUTE_DTYPE[spec.mixed_precision]))
        gan_head, teacher_heads = measure_teacher_heads(model, BACKBONES[pipe.backbone_class], spec.batch, latent, options.feature_layers, options.head_width)
    return Measurements(counts[False], buffers, counts[True], gan_head, *frozen_pipeline_parameters(pipe, config), latent, activations, teacher_heads)


@dataclass(frozen=True)
class Tiers:
    parallel: str = "ddp"                # ddp | fsdp (FSDP2 shards params, grads, optimizer state and EMA over the GPUs)
    gradient_checkpointing: bool = False
    critic: str = "full"                 # full (a trained copy) | lora (adapters on the teacher's frozen weights)
    student_lora: bool = False           # LoRA student on the teacher's frozen weights: trains adapters only
    teacher_dtype: str = "float32"
    optimizer_offload: bool = False      # AdamW state in CPU memory
    adam8bit: bool = False               # 2 bytes of optimizer state per parameter instead of 8
    shard_teacher: bool = True


def _phases(spec: PlanSpec, m: Measurements, tiers: Tiers, trainable: dict, grad_bytes: float) -> list[tuple[str, int, float]]:
    """(phase, trainable params holding grads, activation bytes) at each phase's peak. DMD2's generator phase: the student
    forward with grad; the DM term's teacher (CFG, 2B) and critic under no_grad; with a GAN, the critic forward with grad (to its
    input; autograd fills the critic's own grads too). Critic phase: the student under no_grad, the critic's denoising loss with
    grad; with a GAN, two more critic passes (fake, kept to the features, and real). No fake score: the generator phase only.
    Grads exist only in backward, after the no-grad passes have freed theirs: a phase peaks at max(saved + no-grad pass, saved +
    block recompute + grads); its activations are that peak less the grads (``grad_bytes`` per trained parameter)."""
    has_critic, gan, guided = spec.passes()
    ck, compute = tiers.gradient_checkpointing, BYTES[COMPUTE_DTYPE[spec.mixed_precision]]
    no_grad = m.activations[False, True].block_peak  # a no-grad pass holds about one block's intermediates at a time
    # Without autocast a pass computes in its weights' dtype: passes on the teacher's frozen weights in the teacher's.
    frozen = BYTES[tiers.teacher_dtype] / compute if spec.mixed_precision == "no" else 1
    def grad_pass(lora: bool, extra: int = 0, a: Activations | None = None) -> tuple[float, float]:
        """(kept for backward, + one block's recompute in it); ``lora``: on the teacher's frozen weights; ``a``: another measurement."""
        a = a or m.activations[lora, ck]
        sharded = tiers.parallel == "fsdp" and (tiers.shard_teacher or not lora)  # FSDP2 frees gathered weights after each block
        if sharded or spec.mixed_precision == "no" or BYTES[tiers.teacher_dtype if lora else spec.param_dtype] == compute:
            copies = 0
        else:  # autocast caches a compute-dtype copy of each trained weight until it exits; frozen ones live where saved
            copies = a.weights if lora else m.backbone * compute
        return (a.saved + extra) * (frozen if lora else 1) + copies, (a.block_peak * (frozen if lora else 1) if ck else 0)
    def peak(grads: int, forward: float, backward: float) -> float:
        return max(forward, backward + grads * grad_bytes) - grads * grad_bytes
    critic_lora, (student, student_rc) = tiers.critic == "lora", grad_pass(tiers.student_lora)
    if m.teacher_heads:
        return _teacher_heads_phases(m.teacher_heads, trainable, peak, grad_pass, student, student_rc, no_grad, frozen)
    (critic, critic_rc), student_no_grad = grad_pass(critic_lora) if gan else (0, 0), no_grad * (frozen if tiers.student_lora else 1)
    grads = trainable["student"] + (trainable["critic"] + trainable["GAN head"] if gan else 0)
    phases = [("generator", grads, peak(grads, student + max(no_grad * guided * frozen, critic), student + critic + max(student_rc, critic_rc)))]
    if has_critic:
        crit = m.activations[critic_lora, ck]
        critic, critic_rc = grad_pass(critic_lora, crit.at_features + crit.saved if gan else 0)
        grads = trainable["critic"] + trainable["GAN head"]
        phases.append(("critic", grads, peak(grads, max(student_no_grad, critic), critic + critic_rc)))
    return phases


def _teacher_heads_phases(th: TeacherHeadsPass, trainable: dict, peak, grad_pass, student, student_rc, no_grad, frozen) -> list:
    """LADD's two phases. Generator: the student forward with grad (earlier backward-simulation steps under no_grad, done
    before it), then the frozen teacher on its sample with grad to its input, kept whole (no checkpointing on the teacher),
    and the heads on the tapped blocks; the heads are read with frozen weights, so grads are the student's alone, and they
    are made only once backward has passed the teacher and freed its saves. Heads phase: the student under no_grad, one
    no-grad teacher pass on fake + real (2B) whose tapped block outputs stay alive until the heads have run with grad."""
    teacher, _ = grad_pass(True, a=th.teacher)
    generator = peak(trainable["student"], student + teacher + th.heads, student + student_rc)
    heads = peak(trainable["GAN head"], max(no_grad, 2 * th.features * frozen + max(2 * no_grad * frozen, 2 * th.heads)), 2 * th.heads)
    return [("generator", trainable["student"], generator), ("critic", trainable["GAN head"], heads)]


def component_bytes(spec: PlanSpec, m: Measurements, tiers: Tiers) -> tuple[dict, str]:
    """Bytes per GPU by component, and the phase (generator or critic) whose peak sets grads and activations."""
    has_critic, gan, _ = spec.passes()
    shard, param, compute = spec.gpus if tiers.parallel == "fsdp" else 1, BYTES[spec.param_dtype], BYTES[COMPUTE_DTYPE[spec.mixed_precision]]
    full_critic = has_critic and tiers.critic == "full"
    trainable = {"student": m.lora if tiers.student_lora else m.backbone,
                 "critic": (m.backbone if full_critic else m.lora) if has_critic else 0,
                 "GAN head": m.gan_head if gan or spec.teacher_heads() else 0}  # LADD: its heads on the teacher
    out = {"student": (trainable["student"] + (0 if tiers.student_lora else m.buffers)) * param / shard,
           "critic": (trainable["critic"] + (m.buffers if full_critic else 0)) * param / shard, "GAN head": trainable["GAN head"] * 4 / shard,
           "teacher": (m.backbone + m.buffers) * BYTES[tiers.teacher_dtype] / (shard if tiers.shard_teacher else 1),
           "VAE + text": m.frozen * BYTES[tiers.teacher_dtype]}
    state = 0 if tiers.optimizer_offload else (2 if tiers.adam8bit else 8) + (4 if param != 4 else 0)  # 2 moments (+ fp32 master)
    out["optimizer"] = sum(trainable.values()) * state / shard
    out["EMA"] = trainable["student"] * 4 / shard if spec.ema else 0  # float32 shadow of what the student trains
    phase, with_grads, out["activations"] = max(_phases(spec, m, tiers, trainable, param / shard), key=lambda p: p[1] * param / shard + p[2])
    out["grads"] = with_grads * param / shard
    gather = 2 * m.activations[False, True].block_params * compute if shard > 1 else 0  # FSDP2: a gathered block + the prefetched next
    out["workspace"] = spec.workspace_fraction * sum(out.values()) + (spec.workspace_fixed_gib * GIB if spec.device == "cuda" else 0) + gather
    return {name: out[name] for name in COMPONENTS}, phase


def tier_rows(spec: PlanSpec) -> list[tuple[str, Tiers, int]]:
    """(label, tiers, cost): the recipe as written, each tier alone, the ladder cumulatively, then + a LoRA student."""
    base = Tiers(teacher_dtype=spec.teacher_dtype, critic="lora" if spec.method.get("critic_lora_rank") else "full", shard_teacher=spec.shard_teacher)
    steps = [(label.format(gpus=spec.gpus), change, cost) for label, change, cost in TIER_LADDER
             if (spec.gpus > 1 or "parallel" not in change) and (spec.passes()[0] or "critic" not in change) and replace(base, **change) != base]
    rows, tiers, names, total = [("baseline", base, 0)] + [(label, replace(base, **change), cost) for label, change, cost in steps], base, [], 0
    lora_student = [STUDENT_LORA] if hasattr(spec.options(), "student_lora_rank") else []  # others refuse method.student_lora_rank
    for label, change, cost in steps + lora_student:
        tiers, total, names = replace(tiers, **change), total + cost, names + [label]
        rows.append((" + ".join(names) if len(names) < len(steps) else f"all: {' + '.join(names)}", tiers, total))
    seen = set()  # the first label of a tier set wins
    return [row for row in rows if not (row[1] in seen or seen.add(row[1]))]


def recipe_overrides(tiers: Tiers, spec: PlanSpec) -> list[str]:
    """The ``key=value`` overrides that train with ``tiers`` (as ``diffdistill train RECIPE ...`` takes them)."""
    fsdp = tiers.parallel == "fsdp"
    keys = [f"teacher_dtype={tiers.teacher_dtype}"] if tiers.teacher_dtype != spec.teacher_dtype else []
    keys += ["parallel=fsdp"] + (["shard_teacher=true"] if tiers.shard_teacher else []) if fsdp else []
    keys += ["gradient_checkpointing=true"] if tiers.gradient_checkpointing else []
    keys += ["optimizer=adamw8bit"] if tiers.adam8bit else []
    keys += [f"method.critic_lora_rank={spec.lora_rank}"] if tiers.critic == "lora" and not spec.method.get("critic_lora_rank") else []
    keys += [f"method.student_lora_rank={spec.lora_rank}"] if tiers.student_lora else []
    keys += [("cpu_offload=true" if fsdp else "optimizer_offload=true")] if tiers.optimizer_offload else []
    return keys


def plan_table(spec: PlanSpec, m: Measurements | None = None) -> list[dict]:
    """A row per tier combination: bytes by component, total, fits, ``cheapest`` (least-cost tiers, then least memory, that fit)."""
    m, rows = m or measure_plan(spec), []
    for label, tiers, cost in tier_rows(spec):
        parts, phase = component_bytes(spec, m, tiers)
        total = sum(parts.values())
        rows.append({"tiers": label, "config": tiers, "cost": cost, "phase": phase, **parts, "total": total,
                     "fits": total <= spec.gpu_memory_gib * GIB, "cheapest": False})
    if fitting := [r for r in rows if r["fits"]]:
        min(fitting, key=lambda r: (r["cost"], r["total"]))["cheapest"] = True
    return rows


def render_markdown(rows: list[dict], spec: PlanSpec, m: Measurements) -> str:
    head = ["tiers", *COMPONENTS, "total", f"fits {spec.gpu_memory_gib:g} GiB"]
    title = (f"**Prediction** (from configs, not a GPU measurement) of peak memory per GPU, GiB: {spec.method.get('name')} on {spec.teacher}, "
             f"{spec.gpus} GPU(s), micro-batch {spec.batch} per GPU, {spec.resolution}px, mixed precision {spec.mixed_precision}.")
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fits = "**yes, cheapest**" if r["cheapest"] else ("yes" if r["fits"] else "no")
        lines.append("| " + " | ".join([r["tiers"], *(f"{r[c] / GIB:.1f}" for c in COMPONENTS), f"**{r['total'] / GIB:.1f}**", fits]) + " |")
    full, ckpt, dtype = m.activations[False, False], m.activations[False, True], COMPUTE_DTYPE[spec.mixed_precision]
    return "\n".join(lines) + f"""

- Parameters counted on the meta device: backbone {m.backbone:,} (+{m.buffers:,} buffer elements); LoRA rank {spec.lora_rank} on
  {', '.join(LORA_TARGETS)}: {m.lora:,}; GAN head {m.gan_head:,}; VAE + text encoders {m.frozen:,}: {m.frozen_note}.
- Activations measured on meta tensors (batch {spec.batch}, latent {m.latent}x{m.latent}, {dtype}, fused-attention saves): a forward with
  grad keeps {full.saved / GIB:.2f} GiB; with checkpointing {ckpt.saved / GIB:.2f} GiB + {ckpt.block_peak / GIB:.2f} GiB for one block's
  recompute. Grads and activations are those of the phase (generator or critic) with the higher peak.
- Trained copies in {spec.param_dtype}; AdamW 8 bytes/param (8-bit: 2; offload: 0 on the GPU); EMA float32; teacher, VAE, text encoders in
  the teacher dtype. Workspace: {spec.workspace_fraction:.0%} of the rest + {spec.workspace_fixed_gib * (spec.device == "cuda"):g} GiB (FSDP: + 2 blocks).
- The LoRA critic keeps its adapters on the teacher's own frozen weights (no third copy; a full critic adds {m.backbone * 4 / GIB:.1f} GiB).""" + _teacher_heads_note(m)


def _teacher_heads_note(m: Measurements) -> str:
    if not (th := m.teacher_heads):
        return ""
    return (f"\n- LADD: the GAN head column is its discriminator heads on the frozen teacher's blocks ({m.gan_head:,} parameters, own AdamW"
            f" state); the teacher's forward with grad to the student keeps {th.teacher.saved / GIB:.2f} GiB (never checkpointed), the"
            f" heads {th.heads / GIB:.2f} GiB, the tapped block outputs {th.features / GIB:.2f} GiB. The pool of teacher samples is not counted.")


# Command line.
def run_plan(args) -> int:
    """Prints the Markdown prediction; bad input raises ConfigError, one line naming the problem and the fix. The micro-batch per
    GPU defaults to batch_size / (gpus x grad_accum); the resolution to data.resolution, else the backbone's sample size."""
    cfg = load_recipe(args.recipe, args.overrides)
    size = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gb|gib|g)?\s*", str(args.gpu_memory), re.IGNORECASE)
    if not size or args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus} --gpu-memory {args.gpu_memory}: need at least one GPU and a size such as 80GB (read as GiB)")
    batch = args.batch or cfg.batch_size // (args.gpus * cfg.grad_accum)
    if batch < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} is smaller than gpus x grad_accum = {args.gpus * cfg.grad_accum}; pass --batch")
    pipe = read_pipeline_configs(cfg.teacher_config or cfg.teacher)
    sample = build_backbone(pipe.backbone, pipe.backbone_class).config.get("sample_size")  # the config's, or the class default
    resolution = args.resolution or cfg.data.resolution or (sample * pipe.vae_factor if isinstance(sample, int) else 1024)
    spec = PlanSpec(pipe.folder, dict(cfg.method), args.gpus, float(size.group(1)), batch, resolution, cfg.mixed_precision, cfg.teacher_dtype,
                    ema=cfg.ema_decay > 0, lora_rank=int(cfg.method.get("critic_lora_rank") or args.lora_rank), shard_teacher=not args.replicate_teacher)
    rows = plan_table(spec, measurements := measure_plan(spec))
    print(render_markdown(rows, spec, measurements))
    if cheapest := next((r for r in rows if r["cheapest"]), None):
        keys = " ".join(recipe_overrides(cheapest["config"], spec)) or "(the recipe as written)"
        print(f"\nCheapest that fits: {cheapest['tiers']}. Train with: {keys}")
    if not any(r["fits"] for r in rows):
        print(f"\nNothing fits {spec.gpu_memory_gib:g} GiB at micro-batch {batch} per GPU: raise grad_accum, pass --batch, or add GPUs.")
    return 0
