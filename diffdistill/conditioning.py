"""Conditioning as a plain dict of tensors, built by the pipeline's own text encoder(s).

Keys: ``encoder_hidden_states`` (all text models), ``text_embeds`` + ``time_ids`` (SDXL),
``pooled_projections`` (SD3, Flux), ``encoder_attention_mask`` (PixArt, Sana), ``class_labels`` (DiT),
``timestep_cond`` (LCM's guidance embedding), ``guidance`` (a guidance-distilled network's scale, added
by the score engine, not here). Every value is per sample (batch first): Flux's text and image
position ids are not, so its adapter builds them. The empty prompt (or DiT's null class) is the
unconditional input for classifier-free guidance; SDXL pipelines with ``force_zeros_for_empty_prompt``
(SDXL's default) encode it as zeros, as they do at inference.
"""

from __future__ import annotations

import inspect

import torch

from diffdistill.config import ConfigError


def _sd(pipe, prompts, device):
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"encoder_hidden_states": embeds}


def _sdxl(pipe, prompts, device):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, do_classifier_free_guidance=False)
    if pipe.config.get("force_zeros_for_empty_prompt", False):
        # SDXL's unconditional input is zeros, not the encoded "": its pipeline's default
        # (force_zeros_for_empty_prompt), and what DMD2's SDXL training guides against
        empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
        embeds, pooled = (torch.where(empty.view(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v) for v in (embeds, pooled))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    proj_dim = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), embeds.dtype, proj_dim)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1).to(device)}


def sd3_text_length(pipe) -> int:
    """The T5 length SD3 prompts are padded to here: the tokenizer's own maximum (exports pass it as max_sequence_length)."""
    return pipe.tokenizer_3.model_max_length if pipe.tokenizer_3 is not None else 256


def _sd3(pipe, prompts, device):
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts, None, None, device=device, do_classifier_free_guidance=False, max_sequence_length=sd3_text_length(pipe)
    )
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


FLUX_DEFAULT_TEXT_LENGTH = 512  # FluxPipeline's max_sequence_length default (FLUX.1-dev's)


def flux_text_length(pipe) -> int:
    """T5 runs unmasked, so its padded length changes the embedding: the tokenizer's own, at most FLUX.1's 512 (exports pass it)."""
    return min(pipe.tokenizer_2.model_max_length, FLUX_DEFAULT_TEXT_LENGTH) if pipe.tokenizer_2 is not None else FLUX_DEFAULT_TEXT_LENGTH


def _flux(pipe, prompts, device):
    embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, max_sequence_length=flux_text_length(pipe))
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _sana(pipe, prompts, device):
    """As ``SanaPipeline.__call__`` encodes by default: a prompt behind its complex human instruction, of which
    the first and the last ``max_sequence_length - 1`` tokens are kept (Sana Sec. 3.1); the empty prompt, its
    unconditional input, without the instruction."""
    defaults = inspect.signature(type(pipe).__call__).parameters
    length, instruction = defaults["max_sequence_length"].default, defaults["complex_human_instruction"].default

    def encode(group: list[str], with_instruction: bool):
        embeds, mask, _, _ = pipe.encode_prompt(group, do_classifier_free_guidance=False, device=device, max_sequence_length=length,
                                                complex_human_instruction=instruction if with_instruction else None)
        return list(zip(embeds, mask))

    rows = {kind: iter(encode([p for p in prompts if bool(p) == kind], kind)) for kind in {bool(p) for p in prompts}}
    embeds, masks = zip(*(next(rows[bool(p)]) for p in prompts))  # back in the prompts' order
    return {"encoder_hidden_states": torch.stack(embeds), "encoder_attention_mask": torch.stack(masks)}


def _pixart(pipe, prompts, device):
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device)
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


def _dit(pipe, prompts, device):
    """DiT is class-conditional: a 'prompt' is a class id, an id2label name, or '' for the null class."""
    labels = []
    names = getattr(pipe, "labels", None) or {}  # DiTPipeline maps each label name to its id
    for p in prompts:
        if p == "" or p is None:
            labels.append(pipe.transformer.config.num_embeds_ada_norm)  # DiT's null class for CFG
        elif str(p).isdigit():
            labels.append(int(p))
        elif str(p) in names:
            labels.append(names[str(p)])
        else:
            raise ConfigError(f"DiT is class-conditional; {p!r} is neither a class id nor a label name: give class ids or label "
                              "names as prompts (e.g. data.prompts=[\"1\",\"7\"]); captioned data needs a text-conditioned teacher")
    return {"class_labels": torch.tensor(labels, device=device, dtype=torch.long)}


_ENCODERS = {
    "StableDiffusionPipeline": _sd,
    "StableDiffusionXLPipeline": _sdxl,
    "StableDiffusion3Pipeline": _sd3,
    "FluxPipeline": _flux,
    "SanaPipeline": _sana,
    "PixArtAlphaPipeline": _pixart,
    "PixArtSigmaPipeline": _pixart,
    "DiTPipeline": _dit,
}


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device="cpu") -> dict:
    """Runs the pipeline's own text encoder(s) once; results are float32 and cacheable."""
    name = type(pipe).__name__
    if name not in _ENCODERS:
        raise ValueError(f"no prompt encoder for {name}; supported pipelines: {', '.join(_ENCODERS)}")
    cond = _ENCODERS[name](pipe, list(prompts), device)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in cond.items()}


def cond_index(cond: dict, index) -> dict:
    return {k: v[index] for k, v in cond.items()}


def cond_cat(*conds: dict) -> dict:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_to(cond: dict, device) -> dict:
    return {k: v.to(device) for k, v in cond.items()}


class PromptCache:
    """Encodes each distinct prompt once (text encoders dominate a tiny model's step otherwise)."""

    def __init__(self, pipe, device="cpu"):
        self.pipe, self.device, self._cache = pipe, device, {}

    def __call__(self, prompts: list[str]) -> dict:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            encoded = encode_prompts(self.pipe, missing, self.device)
            for i, p in enumerate(missing):
                self._cache[p] = cond_index(encoded, slice(i, i + 1))
        return cond_cat(*(self._cache[p] for p in prompts))


def embeds_guidance(net) -> bool:
    """Whether a denoiser (or its DDP wrapper) is guidance-distilled: it takes the guidance scale as an input."""
    return getattr(getattr(net, "module", net), "embeds_guidance", False)


def with_embedded_guidance(cond: dict, w, n: int, device) -> dict:
    """``cond`` with the guidance scale ``w`` (a float, or one per sample) for a guidance-embedding network."""
    w = w.to(device, torch.float32) if torch.is_tensor(w) else torch.full((n,), float(w), device=device)
    return {**cond, "guidance": w.expand(n)}
