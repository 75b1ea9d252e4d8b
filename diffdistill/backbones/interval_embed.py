"""A second time input on a transformer's timestep embedding (MeanFlow's h = t - r), zero at first.

diffusers' ``TimestepEmbedding`` already has the hook for it: with ``cond_proj`` set it computes
``linear_2(act(linear_1(proj(t) + cond_proj(c))))``, which is how LCM's UNet takes its guidance
embedding (``time_cond_proj_dim``). SD3, Flux, SANA and PixArt embed the timestep with one such
module (``*.timestep_embedder``) but never pass it a ``condition``; here it gets a ``cond_proj``
(zero-initialized: the network is exactly the teacher until it trains) and a forward pre-hook that
feeds it the embedding held in ``interval_input`` for the duration of one backbone call
(:func:`interval_input`; the adapters in :mod:`diffdistill.backbones` pass ``cond["timestep_cond"]``).

At one fixed h the added term is a constant vector before ``linear_1``, so it folds into that
layer's bias (:func:`fold_interval_input`): the folded network is the teacher's class and config,
which a plain diffusers pipeline runs (as :mod:`.guidance_embed` folds Flux's guidance scale).
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn


def timestep_embedder_path(backbone: nn.Module) -> str:
    """The one ``TimestepEmbedding`` a transformer embeds its timestep with (``...timestep_embedder``), outside its
    blocks: DiT embeds it again in every block (AdaLayerNormZero), which has no one place for a second input."""
    paths = [name for name, m in backbone.named_modules()
             if name.endswith("timestep_embedder") and isinstance(m, TimestepEmbedding) and "transformer_blocks" not in name]
    if len(paths) != 1:
        raise ValueError(f"a second time input goes on a transformer's one timestep embedder, and {type(backbone).__name__} has "
                         f"{len(paths)} outside its blocks ({', '.join(paths[:3]) or 'none'}); use a UNet, SD3, Flux, SANA or PixArt teacher")
    return paths[0]


def _feed_interval(module, args, kwargs):
    """Forward pre-hook: the held embedding becomes ``TimestepEmbedding``'s ``condition`` (added before linear_1)."""
    if module.cond_proj is None:  # folded away
        return None
    if module.interval_input is None:
        raise ValueError("this student has a second time input (h = t - r) and was called without it: pass cond['timestep_cond']")
    return args, {**kwargs, "condition": module.interval_input}


def add_interval_input(backbone: nn.Module, embedding_dim: int) -> nn.Module:
    """Gives a transformer's timestep embedder, in place, a zero ``cond_proj`` (embedding_dim -> its input width)."""
    path = timestep_embedder_path(backbone)
    embedder = backbone.get_submodule(path)
    linear = embedder.linear_1
    embedder.cond_proj = nn.Linear(embedding_dim, linear.in_features, bias=False).to(linear.weight)
    nn.init.zeros_(embedder.cond_proj.weight)
    embedder.interval_input = None
    embedder.register_forward_pre_hook(_feed_interval, with_kwargs=True)  # a module-level function: deepcopy keeps it working
    backbone.interval_embedder = path
    return backbone


@contextlib.contextmanager
def interval_input(model: nn.Module, embedding: torch.Tensor | None):
    """Holds ``embedding`` (B, dim) where the backbone's timestep embedder reads it, for one call; no-op without that input."""
    path = getattr(model, "interval_embedder", None)
    if path is None:
        yield
        return
    embedder = model.get_submodule(path)
    embedder.interval_input = embedding
    try:
        yield
    finally:
        embedder.interval_input = None


@torch.no_grad()
def fold_interval_input(backbone: nn.Module, embedding: torch.Tensor) -> nn.Module:
    """The backbone without its second time input, equal to it at the one input ``embedding`` (1, dim):
    ``linear_1(s + cond_proj(e)) = linear_1(s) + W cond_proj(e)``, so ``W cond_proj(e)`` joins linear_1's bias.
    A UNet is rebuilt without ``time_cond_proj_dim``; a transformer's ``cond_proj`` is removed in place."""
    unet = getattr(getattr(backbone, "config", None), "time_cond_proj_dim", None) is not None
    if not unet and getattr(backbone, "interval_embedder", None) is None:
        raise ValueError(f"this {type(backbone).__name__} has no second time input to fold")
    embedder = backbone.time_embedding if unet else backbone.get_submodule(backbone.interval_embedder)
    linear = embedder.linear_1
    linear.bias += linear.weight @ embedder.cond_proj(embedding.to(linear.weight))[0]
    if not unet:
        embedder.cond_proj = None
        del backbone.interval_embedder
        return backbone
    config = {k: v for k, v in backbone.config.items() if not k.startswith("_")}  # _use_default_values would restore the key
    plain = type(backbone).from_config({**config, "time_cond_proj_dim": None}).to(linear.weight)
    missing, unexpected = plain.load_state_dict(backbone.state_dict(), strict=False)
    if missing or unexpected != ["time_embedding.cond_proj.weight"]:
        raise ValueError(f"unexpected UNet layout when folding its second time input: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return plain
