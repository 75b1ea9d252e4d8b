"""The reference layouts of the flow transformers, for ComfyUI's "Load Diffusion Model" (diffusion_models folder).

SD3/SD3.5 as Stability ships its MMDiT and Flux as Black Forest Labs ship theirs: the transformer
alone (those loaders take the text encoders and the VAE as separate files). The names are the
reference code's modules, the inverse of diffusers' single-file readers:

* SD3 / SD3.5, under ``model.diffusion_model.``: ``x_embedder.proj`` and ``pos_embed`` (the patch
  embedding and its position table), ``t_embedder.mlp.{0,2}`` (timestep), ``y_embedder.mlp.{0,2}``
  (pooled text), ``context_embedder``; ``joint_blocks.i.x_block`` (image) and ``.context_block`` (text)
  with ``attn.qkv`` (q, k, v stacked by rows), ``attn.proj``, ``attn.ln_q/ln_k`` (SD3.5's qk norms),
  ``adaLN_modulation.1``, ``mlp.fc1/fc2``; SD3.5 Medium's second image attention ``x_block.attn2``.
  The last block's text stream stops after attention ("pre-only"): it keeps qkv and its modulation.
* Flux, bare names: ``img_in``, ``txt_in``, ``time_in`` / ``guidance_in`` / ``vector_in`` (each
  ``in_layer``, ``out_layer``); ``double_blocks.i`` with ``img_mod.lin`` / ``txt_mod.lin``,
  ``img_attn.qkv`` / ``txt_attn.qkv``, ``*_attn.proj``, ``*_attn.norm.{query,key}_norm.scale``,
  ``img_mlp.{0,2}`` / ``txt_mlp.{0,2}``; ``single_blocks.i`` with ``modulation.lin``, ``linear1`` (q, k,
  v and the MLP's input stacked by rows), ``linear2``, ``norm.{query,key}_norm.scale``.
* Both: ``final_layer.linear`` and ``final_layer.adaLN_modulation.1``. Where a modulation ends in a
  continuous adaptive norm (the final layer; SD3's pre-only text stream) the reference splits it into
  (shift, scale) and diffusers into (scale, shift): the halves are swapped.

The check is diffusers' own reader, ``SD3Transformer2DModel / FluxTransformer2DModel.from_single_file``
(tests/test_export.py).
"""

from __future__ import annotations

import torch

from diffdistill.export.student import ExportError

WEIGHT_AND_BIAS = (".weight", ".bias")
QKV = ("to_q", "to_k", "to_v")
ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

# reference name <- diffusers name; a tuple is stacked by rows in its order
SD3_EMBEDDERS = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1", "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
SD3_JOINT_BLOCK = {
    "x_block.attn.qkv": tuple(f"attn.{p}" for p in QKV), "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
    "x_block.attn2.qkv": tuple(f"attn2.{p}" for p in QKV), "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.adaLN_modulation.1": "norm1.linear", "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2",
    "context_block.attn.qkv": tuple(f"attn.{p}" for p in ADDED_QKV), "context_block.attn.proj": "attn.to_add_out",
    "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
}

FLUX_EMBEDDERS = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1", "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1", "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
FLUX_DOUBLE_BLOCK = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": tuple(f"attn.{p}" for p in QKV), "txt_attn.qkv": tuple(f"attn.{p}" for p in ADDED_QKV),
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
FLUX_DOUBLE_NORMS = {  # RMSNorm's one parameter: diffusers' ``weight`` is the reference's ``scale``
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight", "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
FLUX_SINGLE_BLOCK = {"modulation.lin": "norm.linear", "linear1": (*(f"attn.{p}" for p in QKV), "proj_mlp"), "linear2": "proj_out"}
FLUX_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def gather(state: dict, table: dict, ours: str = "", theirs: str = "", params=WEIGHT_AND_BIAS) -> dict:
    """Moves each parameter ``table`` names out of ``state`` into the reference layout (``theirs`` + name);
    modules absent from this model (SD3.5's norms, a layer without attn2) are skipped."""
    out = {}
    for their_name, our_names in table.items():
        names = (our_names,) if isinstance(our_names, str) else our_names
        for p in params:
            if f"{ours}{names[0]}{p}" in state:
                out[f"{theirs}{their_name}{p}"] = torch.cat([state.pop(f"{ours}{n}{p}") for n in names])
    return out


def swap_shift_scale(state: dict, module: str) -> None:
    """diffusers' continuous adaptive norm splits its modulation into (scale, shift); the reference into (shift, scale)."""
    for p in WEIGHT_AND_BIAS:
        scale, shift = state[module + p].chunk(2)
        state[module + p] = torch.cat([shift, scale])


def all_moved(left: dict, name: str) -> None:
    if left:
        raise ExportError(f"{name} has weights the reference layout has no place for ({sorted(left)[:3]}): "
                          "use --format diffusers or single-file")


def sd3_to_original(state: dict, config) -> dict:
    """An SD3Transformer2DModel's state dict in Stability's MMDiT layout, under ``model.diffusion_model.``."""
    state = dict(state)
    out = gather(state, SD3_EMBEDDERS) | gather(state, {"pos_embed": "pos_embed.pos_embed"}, params=("",))
    swap_shift_scale(out, "final_layer.adaLN_modulation.1")
    for i in range(config["num_layers"]):
        out |= gather(state, SD3_JOINT_BLOCK, f"transformer_blocks.{i}.", f"joint_blocks.{i}.")
    # diffusers makes the last block's text stream pre-only: a continuous adaptive norm, (scale, shift)
    swap_shift_scale(out, f"joint_blocks.{config['num_layers'] - 1}.context_block.adaLN_modulation.1")
    all_moved(state, "SD3Transformer2DModel")
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def flux_to_original(state: dict, config) -> dict:
    """A FluxTransformer2DModel's state dict in Black Forest Labs' layout (bare names, as flux1-dev.safetensors)."""
    state = dict(state)
    out = gather(state, FLUX_EMBEDDERS)
    swap_shift_scale(out, "final_layer.adaLN_modulation.1")
    for i in range(config["num_layers"]):
        ours, theirs = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        out |= gather(state, FLUX_DOUBLE_BLOCK, ours, theirs) | gather(state, FLUX_DOUBLE_NORMS, ours, theirs, ("",))
    for i in range(config["num_single_layers"]):
        ours, theirs = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        out |= gather(state, FLUX_SINGLE_BLOCK, ours, theirs) | gather(state, FLUX_SINGLE_NORMS, ours, theirs, ("",))
    all_moved(state, "FluxTransformer2DModel")
    return out


TRANSFORMERS = {"SD3Transformer2DModel": sd3_to_original, "FluxTransformer2DModel": flux_to_original}  # backbone class -> writer


def transformer_to_original(backbone) -> dict:
    """The transformer alone in its reference layout (ComfyUI's diffusion_models format)."""
    state = TRANSFORMERS[type(backbone).__name__](backbone.state_dict(), backbone.config)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


__all__ = ["TRANSFORMERS", "flux_to_original", "sd3_to_original", "transformer_to_original"]
