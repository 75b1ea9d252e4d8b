"""Sharded training with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

``parallel: fsdp`` shards each trained net (student, critic, GAN head) per block, then at its root,
so a process holds 1/N of every weight, gradient, optimizer moment and EMA, and gathers one block's
weights at a time for compute. Parameters stay float32 (the optimizer's master weights); under
``mixed_precision: bf16`` blocks compute in bf16 and gradients are reduced in float32. The frozen
teacher is replicated (optionally in low precision, ``teacher_dtype``) or, with ``shard_teacher``,
sharded the same way. ``cpu_offload`` keeps the shards (and so the optimizer state) in host memory.

Checkpoints are written sharded (:mod:`diffdistill.engine.checkpoint`): each process writes its
own shards and no process ever holds a whole state. A checkpoint written by N processes resumes
on M, sharded or not, and ``diffdistill export`` reads it on one CPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

# Where diffusers backbones keep their repeated blocks: UNet down/up blocks' resnets and attentions
# and the mid block; DiT/MMDiT/Flux transformer blocks.
BLOCK_LISTS = ("resnets", "attentions", "transformer_blocks", "single_transformer_blocks")


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks sharded on their own (one all-gather each): the outermost listed block on each
    path (a UNet mid block whole, not its resnets again); the root is sharded after them."""
    units, taken = [], []
    for name, child in module.named_modules():  # parents come before their children
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        parent, _, last = name.rpartition(".")
        if last.isdigit() and parent.rsplit(".", 1)[-1] in BLOCK_LISTS or name.endswith("mid_block"):
            units.append(child)
            taken.append(name)
    return units


def precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def shard(module: nn.Module, mixed_precision: str = "no", cpu_offload: bool = False) -> nn.Module:
    """``fully_shard`` on each block and then the root (in place; the module keeps its class API)."""
    options = {"mp_policy": precision_policy(mixed_precision)}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for unit in shard_units(module):
        fully_shard(unit, **options)
    fully_shard(fsdp_root(module), **options)
    return module


def fsdp_root(module: nn.Module) -> nn.Module:
    """Where FSDP's root sits: a Denoiser's backbone (the Denoiser holds no weights of its own, and a
    LoRA critic's backbone is the teacher's, run by the teacher's Denoiser too), else the module."""
    backbone = getattr(module, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) else module


def reshard(module: nn.Module) -> None:
    """Frees a sharded root's gathered weights. FSDP keeps a root's weights whole after a forward
    for the backward that usually follows; after a no-grad forward (a target or a critic only read)
    none follows, and its parameters would stay whole, unlike those of the net it tracks."""
    root = fsdp_root(module)
    if isinstance(root, FSDPModule):
        root.reshard()


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def set_gradient_sync(module: nn.Module, sync: bool) -> None:
    """FSDP's no_sync: skip the reduce-scatter of all but the last micro-batch's gradients."""
    root = fsdp_root(module)
    if isinstance(root, FSDPModule):
        root.set_requires_gradient_sync(sync)


def full_tensor(value):
    """The whole tensor behind a shard (a collective: every process must call it, in the same order)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(full: torch.Tensor, reference):
    """``full`` split as ``reference`` is (a DTensor's mesh and placements), or unchanged: how an
    unsharded checkpoint resumes under FSDP (a collective when it splits)."""
    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.dtype), reference.device_mesh, reference.placements)
    return full


__all__ = ["full_tensor", "is_sharded", "reshard", "set_gradient_sync", "shard", "shard_like", "shard_units"]
