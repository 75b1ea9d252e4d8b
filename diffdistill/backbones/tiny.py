"""Tiny pipelines built from configs, offline: tests, recipes and demos need no download.

``write_tiny_pipeline(out, arch)`` saves a complete diffusers folder (backbone, VAE, text
encoder(s) and tokenizer(s), scheduler) that plain ``DiffusionPipeline.from_pretrained`` loads:

* ``unet`` -- ``StableDiffusionPipeline`` (UNet2DConditionModel, epsilon prediction, DDIM).
* ``dit``  -- ``DiTPipeline`` (class-conditional DiTTransformer2DModel with learned sigma).
* ``sd3``  -- ``StableDiffusion3Pipeline`` (SD3Transformer2DModel, rectified flow, two CLIP encoders).
* ``sdxl`` -- ``StableDiffusionXLPipeline`` (UNet with SDXL's pooled-text and size conditioning, two CLIP
  encoders, zeros as the unconditional input as SDXL's own pipeline has it).
* ``sd35`` -- ``StableDiffusion3Pipeline`` with SD3.5's transformer: RMS qk norms and dual attention layers.
* ``flux`` -- ``FluxPipeline`` (guidance-distilled FluxTransformer2DModel as FLUX.1-dev: ``guidance_embeds``,
  a CLIP pooled and a T5 text encoder, FLUX.1-dev's resolution-dependent scheduler shift). Flux has no
  sample_size: ``FluxPipeline`` samples 128 x 128 latents by default, so the in-memory ``tiny:flux`` sets the
  pipeline's ``default_sample_size`` to 8; a tiny flux folder trains at ``data.resolution=16`` likewise.
* ``sana`` -- ``SanaPipeline`` (SanaTransformer2DModel, a deep-compression autoencoder, a Gemma 2 text
  encoder, DPM-Solver with flow sigmas as Sana ships).

The tokenizers are character-level (CLIP BPE, T5 Unigram, Gemma BPE); the CLIP one is a BPE (no merges), written as vocab.json/merges.txt and
re-loaded with ``CLIPTokenizer.from_pretrained``: in transformers 5.x the ``vocab_file=`` /
``merges_file=`` constructor arguments are silently ignored.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

TINY_ARCHS = ("unet", "dit", "sd3", "sd35", "sdxl", "flux", "sana")
TEXT_LENGTH = 32      # characters are tokens here; long enough for "a handwritten digit 7"
TEXT_DIM = 32


def _bytes_to_unicode() -> list[str]:
    """The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_tokenizer(max_length: int = TEXT_LENGTH):
    chars = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab))
        Path(tmp, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, pad_token="<|endoftext|>")


def tiny_text_encoder(tokenizer, seed: int, with_projection: bool = False, hidden: int = TEXT_DIM):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_t5_tokenizer(max_length: int = TEXT_LENGTH):
    """A character-level Unigram tokenizer in T5's format (pad 0, eos 1, unk 2)."""
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"] + list(string.printable[:95])
    backend = Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=max_length)


def tiny_t5_encoder(seed: int, d_model: int = TEXT_DIM):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=128, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2)
    return T5EncoderModel(config).eval()


def tiny_gemma_tokenizer():
    """A character-level Gemma BPE (no merges) that puts <bos> first as Gemma's does; saved and re-loaded so the
    in-memory one and a written folder's encode alike."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\u2581"] + list(string.printable[:94]))}
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], model_max_length=300)
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return GemmaTokenizer.from_pretrained(tmp)


def tiny_gemma2_encoder(tokenizer, seed: int, hidden: int = TEXT_DIM):
    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return Gemma2Model(config).eval()


def tiny_vae(seed: int, latent_channels: int = 4, image_size: int = 16, **extra):
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=image_size, **extra,
    )


def tiny_unet(seed: int, sample_size: int = 8, cross_attention_dim: int = TEXT_DIM, **extra):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8, **extra,
    )


def _unet_pipeline(seed: int):
    tokenizer = tiny_tokenizer()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", timestep_spacing="trailing",
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(seed + 1), text_encoder=tiny_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
        unet=tiny_unet(seed), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _dit_pipeline(seed: int):
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",  # DiTPipeline hard-codes null class 1000
    )
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="trailing")
    return DiTPipeline(transformer=transformer, vae=tiny_vae(seed + 1), scheduler=scheduler, id2label={i: str(i) for i in range(10)})


def _sd3_pipeline(seed: int):
    torch.manual_seed(seed)
    # Two CLIP encoders of width 16 concatenate to joint_attention_dim 32; pooled 16 + 16 = 32.
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    tok1, tok2 = tiny_tokenizer(), tiny_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed + 1, shift_factor=0.0, scaling_factor=1.0),
        text_encoder=tiny_text_encoder(tok1, seed + 2, with_projection=True, hidden=16), tokenizer=tok1,
        text_encoder_2=tiny_text_encoder(tok2, seed + 3, with_projection=True, hidden=16), tokenizer_2=tok2,
        text_encoder_3=tiny_t5_encoder(seed + 4), tokenizer_3=tiny_t5_tokenizer(),
    )


def _sd35_pipeline(seed: int):
    """SD3.5's additions to SD3 (SD3.5 Large/Medium): RMS norms on q and k, and MMDiT-X dual attention layers."""
    pipe = _sd3_pipeline(seed)
    torch.manual_seed(seed)
    pipe.transformer = SD3Transformer2DModel.from_config(pipe.transformer.config, qk_norm="rms_norm", dual_attention_layers=(0,))
    pipe.register_modules(transformer=pipe.transformer)
    return pipe


def _flux_pipeline(seed: int):
    torch.manual_seed(seed)
    # 4 latent channels packed 2x2 make 16 token channels; rotary axes (2, 2, 4) sum to the head width 8;
    # CLIP's pooled 32 and T5's 32 are the pooled and joint widths.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's: shift by resolution, exp(mu), mu from 0.5 (256 tokens) to 1.15 (4096)
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    tokenizer = tiny_tokenizer()
    pipe = FluxPipeline(
        transformer=transformer, scheduler=scheduler, vae=tiny_vae(seed + 1, shift_factor=0.0, scaling_factor=1.0),
        text_encoder=tiny_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
        text_encoder_2=tiny_t5_encoder(seed + 3), tokenizer_2=tiny_t5_tokenizer(),
    )
    pipe.default_sample_size = 8  # latents 8 x 8 (FluxPipeline's own default, 128, is FLUX.1's 1024 px)
    return pipe


def _sana_pipeline(seed: int):
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_cross_attention_heads=2,
        cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT_DIM, sample_size=8, patch_size=1,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(  # three levels, 4x: SanaPipeline takes only image sides divisible by 32, so 32 px and 8 x 8 latents
        in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16), encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
    )
    scheduler = DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")  # as Sana ships
    tokenizer = tiny_gemma_tokenizer()
    return SanaPipeline(tokenizer=tokenizer, text_encoder=tiny_gemma2_encoder(tokenizer, seed + 2), vae=vae,
                        transformer=transformer, scheduler=scheduler)


def _sdxl_pipeline(seed: int):
    # Two CLIP encoders of widths 12 and 20 concatenate to cross_attention_dim 32; the second's pooled 20 and six
    # size/crop ids embedded at 8 each make the added embedding's input 20 + 6 x 8 = 68. The widths differ as
    # SDXL's do (768 and 1280): diffusers' single-file reader tells the two encoders apart by width.
    tok1, tok2 = tiny_tokenizer(), tiny_tokenizer()
    unet = tiny_unet(seed, addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=68)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon", timestep_spacing="trailing",
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(seed + 1), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        text_encoder=tiny_text_encoder(tok1, seed + 2, hidden=12), tokenizer=tok1,
        text_encoder_2=tiny_text_encoder(tok2, seed + 3, with_projection=True, hidden=20), tokenizer_2=tok2,
    )


_BUILDERS = {"unet": _unet_pipeline, "dit": _dit_pipeline, "sd3": _sd3_pipeline, "sd35": _sd35_pipeline, "sdxl": _sdxl_pipeline,
             "flux": _flux_pipeline, "sana": _sana_pipeline}


def tiny_pipeline(arch: str = "unet", seed: int = 0):
    if arch not in _BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    pipe = _BUILDERS[arch](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_tiny_pipeline(out, arch: str = "unet", seed: int = 0) -> Path:
    """Writes a tiny, randomly initialized pipeline folder (safetensors) and returns its path."""
    out = Path(out)
    tiny_pipeline(arch, seed).save_pretrained(out, safe_serialization=True)
    return out
