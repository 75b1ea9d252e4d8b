"""The original Stable Diffusion (LDM / SGM) checkpoint layout, for tools that read single files.

ComfyUI, AUTOMATIC1111/Forge and Krita load one ``.safetensors`` in the layout of the original
CompVis/Stability code: the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.``, the text encoder(s) under ``cond_stage_model.transformer.`` (SD1.5/2.x) or
``conditioner.embedders.{0,1}.`` (SDXL). This module renames diffusers' keys into that layout,
written from the code bases' module structures:

* UNet: ``input_blocks`` number the down path's layers in order (``conv_in`` first, then each block's
  resnets with their attentions, then its downsampler), ``output_blocks`` the up path's, with the
  upsampler beside the block's last layer; resnets call their parts ``in_layers``, ``emb_layers``,
  ``out_layers``, ``skip_connection``; the transformer blocks inside keep diffusers' names.
* VAE: ``down.i.block.j`` / ``up.i.block.j`` (the up path numbered from the bottom), mid
  ``block_1``/``attn_1``/``block_2``, and the mid attention as 1x1 convolutions ``q, k, v, proj_out``.
  SDXL's added (pooled text + size) embedding is ``label_emb.0.0`` / ``label_emb.0.2``.
* Text encoder: transformers' CLIP keys under the prefix, with their ``text_model.`` level; SDXL's
  first (CLIP ViT-L) the same way under ``conditioner.embedders.0.transformer.``.
* SDXL's second text encoder (OpenCLIP ViT-bigG) in OpenCLIP's own layout under
  ``conditioner.embedders.1.model.``: ``transformer.resblocks.i`` with ``ln_1``/``ln_2``,
  ``mlp.c_fc``/``mlp.c_proj``, and q, k, v fused into one ``attn.in_proj_weight`` (rows q, then k,
  then v); ``token_embedding``, a bare ``positional_embedding``, ``ln_final``, and ``text_projection``
  as the matrix P of ``pooled @ P`` (the transpose of transformers' Linear weight).

SD1.5/2.x and SDXL pipelines here; the flow transformers SD3/SD3.5 and Flux as their transformer alone
in the reference layout (:mod:`.original_transformers`). DiT, PixArt and SANA have no single-file layout
those tools load. The check is diffusers' own reader: ``StableDiffusion(XL)Pipeline.from_single_file(file,
config=teacher_folder)`` loads it back (tests/test_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffdistill.export.original_transformers import TRANSFORMERS, transformer_to_original
from diffdistill.export.student import ExportError, Student

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
RESNET_PARTS = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION_PARTS = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))
ADDED_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's text_time
OPEN_CLIP_NAMES = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final"}
OPEN_CLIP_PARTS = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                   ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def unet_module_names(config) -> dict:
    """diffusers module prefix -> LDM module prefix, for every block of a UNet2DConditionModel."""
    per_block, levels = config["layers_per_block"], len(config["block_out_channels"])
    names = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_norm_out": "out.0", "conv_out": "out.2", "mid_block.resnets.0": "middle_block.0",
             "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2"}
    for i in range(levels):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            names[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            names[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
        if i < levels - 1:
            names[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per_block + 1)}.0.op"
        attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            names[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            names[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
        if i < levels - 1:
            names[f"up_blocks.{i}.upsamplers.0"] = f"output_blocks.{i * (per_block + 1) + per_block}.{2 if attention else 1}"
    return names


def rename(key: str, modules: dict, parts=()) -> str:
    """``key`` with its longest matching module prefix replaced, then a resnet/attention part renamed."""
    prefix = max((m for m in modules if key == m or key.startswith(m + ".")), key=len, default=None)
    if prefix is None:
        raise ExportError(f"no original-layout name for {key!r}")
    rest = key[len(prefix):]
    for ours, theirs in parts:
        if rest.startswith(f".{ours}."):
            rest = f".{theirs}." + rest[len(ours) + 2:]
            break
    return modules[prefix] + rest


def unet_to_original(state: dict, config) -> dict:
    modules = unet_module_names(config)
    added = config.get("addition_embed_type")
    if added == "text_time":
        modules.update(ADDED_EMBEDDING)
    elif added or config.get("class_embed_type"):
        raise ExportError(f"--format original writes SD1.5/2.x and SDXL UNets; this one has a {added or config['class_embed_type']!r} "
                          "added embedding: use --format diffusers or single-file")
    if config.get("time_cond_proj_dim"):
        raise ExportError("this student has a guidance embedding (time_cond_proj), which the original layout has no place for: "
                          "use --format diffusers or single-file")
    out = {}
    for key, value in state.items():
        parts = RESNET_PARTS if ".resnets." in key else ()
        out[UNET + rename(key, modules, parts)] = value
    return out


def vae_module_names(config) -> dict:
    levels, per_block = len(config["block_out_channels"]), config["layers_per_block"]
    names = {}
    for side in ("encoder", "decoder"):
        names.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_norm_out": f"{side}.norm_out", f"{side}.conv_out": f"{side}.conv_out",
                      f"{side}.mid_block.resnets.0": f"{side}.mid.block_1", f"{side}.mid_block.attentions.0": f"{side}.mid.attn_1",
                      f"{side}.mid_block.resnets.1": f"{side}.mid.block_2"})
    for i in range(levels):
        for j in range(per_block):
            names[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        names[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        up = levels - 1 - i  # LDM numbers the decoder's levels from the bottom
        for j in range(per_block + 1):
            names[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{up}.block.{j}"
        names[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{up}.upsample"
    names.update({"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"})
    return names


def vae_to_original(state: dict, config) -> dict:
    modules, out = vae_module_names(config), {}
    resnet_parts = (("conv_shortcut", "nin_shortcut"),)
    for key, value in state.items():
        attention = ".attentions." in key
        name = rename(key, modules, VAE_ATTENTION_PARTS if attention else resnet_parts if ".resnets." in key else ())
        if attention and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's mid attention projections are 1x1 convolutions
        out[VAE + name] = value
    return out


def clip_to_original(encoder) -> dict:
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); the original layout has it
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in encoder.state_dict().items()}


def open_clip_to_original(encoder) -> dict:
    """A CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's bigG encoder): the names above."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {"positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "text_projection": state.pop("text_projection.weight").T}
    layers = encoder.config.num_hidden_layers
    for i in range(layers):
        for kind in ("weight", "bias"):  # OpenCLIP's nn.MultiheadAttention holds q, k, v as one matrix
            fused = [state.pop(f"encoder.layers.{i}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(fused)
    modules = {**OPEN_CLIP_NAMES, **{f"encoder.layers.{i}": f"transformer.resblocks.{i}" for i in range(layers)}}
    out.update({rename(k, modules, OPEN_CLIP_PARTS): v for k, v in state.items()})
    return out


# pipeline class -> (component, its writer, its prefix) for each text encoder
TEXT_ENCODERS = {
    "StableDiffusionPipeline": (("text_encoder", clip_to_original, TEXT),),
    "StableDiffusionXLPipeline": (("text_encoder", clip_to_original, "conditioner.embedders.0.transformer."),
                                  ("text_encoder_2", open_clip_to_original, "conditioner.embedders.1.model.")),
}


def pipeline_to_original(pipe, unet_state: dict) -> dict:
    """One state dict in the original layout: the student's UNet, the teacher's VAE and text encoder(s)."""
    name = type(pipe).__name__
    if name not in TEXT_ENCODERS:
        raise ExportError(f"--format original writes SD1.5/2.x and SDXL checkpoints and the SD3/SD3.5 and Flux transformers; {name} "
                          "has no original single-file layout that ComfyUI or A1111/Forge load: use --format diffusers or single-file")
    state = unet_to_original(unet_state, pipe.unet.config)
    state.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    for component, write, prefix in TEXT_ENCODERS[name]:
        state.update({prefix + k: v for k, v in write(getattr(pipe, component)).items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def sampling_note(student: Student, steps: int) -> dict:
    """What a tool needs to sample the student with its own scheduler: the timesteps (a flow student's
    are its sigmas), no CFG, and the scale a kept guidance input (Flux.1-dev's) was trained at."""
    flow = student.teacher.schedule.kind == "flow"
    sampling = {"timesteps": [float(t) if flow else int(t) for t in student.timesteps], "steps": steps, "guidance_scale": 1.0,
                "method": student.method}
    if student.backbone.config.get("guidance_embeds"):
        sampling["guidance"] = getattr(student.teacher, "student_guidance", None)
    return sampling


def write_original(student: Student, out: Path, steps: int) -> dict:
    """SD1.5/2.x and SDXL: the student's UNet with the teacher's VAE and text encoder(s), in the original
    layout, in one file. SD3/Flux: the student's transformer alone, in its reference layout (their loaders
    take the text encoders and VAE as separate files, and a file with them would be many GB).
    Tools sample it with their own scheduler: the metadata records the student's timesteps."""
    alone = type(student.backbone).__name__ in TRANSFORMERS
    if alone:
        state = transformer_to_original(student.backbone)
    else:
        state = pipeline_to_original(student.teacher.pipe, student.backbone.state_dict())
    sampling = sampling_note(student, steps)
    save_file(state, str(out), metadata={"format": "pt", "diffdistill": json.dumps(sampling)})
    contents = "transformer" if alone else "checkpoint"
    return {"format": "original", "contents": contents, "steps": steps, "tensors": len(state), "sampling": sampling}


__all__ = ["open_clip_to_original", "pipeline_to_original", "transformer_to_original", "unet_to_original", "vae_to_original",
           "write_original"]
