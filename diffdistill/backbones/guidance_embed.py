"""A guidance-distilled student without its guidance input (``student_guidance_embed: drop``).

Flux.1-dev embeds the guidance scale w like its timestep and adds the two embeddings
(``CombinedTimestepGuidanceTextProjEmbeddings``): ``temb = E_t(t) + E_g(w) + E_text(pooled)``. At one
fixed w the guidance term is a constant vector, so it folds into the bias of ``E_t``'s last Linear:
the folded network has Flux.1-schnell's shape (``guidance_embeds: false``; plain ``FluxPipeline``
passes it no guidance) and starts as the teacher at that w, exactly.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings


@torch.no_grad()
def fold_guidance_embedding(backbone: torch.nn.Module, w: float) -> torch.nn.Module:
    """Turns a guidance-embedding Flux transformer, in place, into one without that input that equals it at scale ``w``."""
    if type(backbone).__name__ != "FluxTransformer2DModel":
        raise ValueError(f"only Flux's guidance embedding can be folded away, not {type(backbone).__name__}'s; "
                         "set student_guidance_embed=keep")
    old = backbone.time_text_embed
    linear = old.timestep_embedder.linear_2
    scale = torch.full((1,), w * 1000.0, device=linear.weight.device)  # Flux multiplies its guidance input by 1000, as its timestep
    constant = old.guidance_embedder(old.time_proj(scale).to(linear.weight.dtype))[0]
    new = CombinedTimestepTextProjEmbeddings(linear.out_features, backbone.config.pooled_projection_dim).to(linear.weight)
    new.timestep_embedder, new.text_embedder = old.timestep_embedder, old.text_embedder
    linear.bias += constant
    backbone.time_text_embed = new
    backbone.register_to_config(guidance_embeds=False)
    return backbone
