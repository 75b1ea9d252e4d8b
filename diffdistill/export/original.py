"""The original Stable Diffusion (LDM) checkpoint layout, for tools that read single files.

ComfyUI, AUTOMATIC1111/Forge and Krita load one ``.safetensors`` in the layout of the original
CompVis/Stability code: the UNet under ``model.diffusion_model.``, the VAE under
``first_stage_model.``, the CLIP text encoder under ``cond_stage_model.transformer.``. This module
renames diffusers' keys into that layout, written from the two code bases' module structures:

* UNet: ``input_blocks`` number the down path's layers in order (``conv_in`` first, then each block's
  resnets with their attentions, then its downsampler), ``output_blocks`` the up path's, with the
  upsampler beside the block's last layer; resnets call their parts ``in_layers``, ``emb_layers``,
  ``out_layers``, ``skip_connection``; the transformer blocks inside keep diffusers' names.
* VAE: ``down.i.block.j`` / ``up.i.block.j`` (the up path numbered from the bottom), mid
  ``block_1``/``attn_1``/``block_2``, and the mid attention as 1x1 convolutions ``q, k, v, proj_out``.
* Text encoder: transformers' CLIP keys under the prefix, with their ``text_model.`` level.

SD1.5 / 2.x pipelines only (SDXL's second text encoder is stored in OpenCLIP's layout, not written
here). The check is diffusers' own reader: ``StableDiffusionPipeline.from_single_file(file,
config=teacher_folder)`` loads it back (tests/test_export.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from diffdistill.export.student import ExportError, Student

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
RESNET_PARTS = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
VAE_ATTENTION_PARTS = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


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
    if config.get("addition_embed_type"):
        raise ExportError("--format original writes SD1.5/2.x UNets; this one has SDXL's added conditioning: use --format diffusers")
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


def pipeline_to_original(pipe, unet_state: dict) -> dict:
    """One state dict in the original layout: the student's UNet, the teacher's VAE and text encoder."""
    if type(pipe).__name__ != "StableDiffusionPipeline":
        raise ExportError(f"--format original writes SD1.5/2.x checkpoints; {type(pipe).__name__} has no such layout here (for SD3, the layout "
                          "SD3Transformer2DModel.from_single_file reads is not written): use --format diffusers, or lora (load_lora_weights)")
    state = unet_to_original(unet_state, pipe.unet.config)
    state.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    # transformers >= 5.6 flattened CLIPTextModel (no ``text_model.`` level); the original layout has it
    state.update({TEXT + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in pipe.text_encoder.state_dict().items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_original(student: Student, out: Path, steps: int) -> dict:
    """The student's UNet with the teacher's VAE and text encoder, in the original layout, in one file.
    Tools sample it with their own scheduler: the metadata records the student's timesteps."""
    state = pipeline_to_original(student.teacher.pipe, student.backbone.state_dict())
    sampling = {"timesteps": [int(t) for t in student.timesteps], "steps": steps, "guidance_scale": 1.0, "method": student.method}
    save_file(state, str(out), metadata={"format": "pt", "diffdistill": json.dumps(sampling)})
    return {"format": "original", "steps": steps, "tensors": len(state), "sampling": sampling}


__all__ = ["pipeline_to_original", "unet_to_original", "vae_to_original", "write_original"]
