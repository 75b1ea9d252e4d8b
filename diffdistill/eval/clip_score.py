"""CLIP score as GigaGAN, DMD2 and their successors report it.

The number is the mean raw cosine similarity (about 0.3 for good text-to-image
models, not x100 and not clipped at 0 as torchmetrics' ``CLIPScore`` does)
between an image embedding and the embedding of ``"A photo depicts " + caption``
(the prefix of Hessel et al., 2021, "CLIPScore"). Images are the protocol's
256 px LANCZOS images, then the CLIP model's own preprocessing. The protocol's
model is open_clip ViT-g/14 trained on LAION-2B (``laion2b_s12b_b42k``).

Two back-ends, both from local files only:

- a file (or a folder holding ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``):
  open_clip ViT-g/14, which needs the ``open_clip_torch`` package;
- a folder with ``config.json``: any transformers ``CLIPModel``, with its tokenizer
  and image processor. Its numbers are comparable only with the same folder.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from diffdistill.eval import MissingWeightsError

PROMPT_PREFIX = "A photo depicts "
OPEN_CLIP_ARCH = "ViT-g-14"
OPEN_CLIP_PRETRAINED = "laion2b_s12b_b42k"
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_URL = "https://huggingface.co/laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
CLIP_ENV = "DIFFDISTILL_CLIP"
PAPERS = "GigaGAN (Kang et al., 2023) and DMD2 (Yin et al., 2024), COCO-2014 30k"


def missing_clip_message(detail: str) -> str:
    return "\n".join(
        [
            f"CLIP weights not found ({detail}). The protocol's CLIP score uses open_clip {OPEN_CLIP_ARCH} "
            f"({OPEN_CLIP_PRETRAINED}):",
            f"  {OPEN_CLIP_FILES[0]} or {OPEN_CLIP_FILES[1]}, published at {OPEN_CLIP_URL}",
            "  (that repository also holds a transformers CLIPModel folder: config.json, tokenizer, weights).",
            f"Pass --clip PATH or set {CLIP_ENV}=PATH (the file, or the folder holding it). Nothing is downloaded.",
        ]
    )


def resolve_clip_path(explicit: str | Path | None = None) -> Path | None:
    """``explicit``, else ``$DIFFDISTILL_CLIP``; ``None`` when neither is set (the CLIP score is skipped)."""
    value = explicit or os.environ.get(CLIP_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise MissingWeightsError(missing_clip_message(f"{path} does not exist"))
    if path.is_dir() and not (path / "config.json").is_file():
        found = [path / name for name in OPEN_CLIP_FILES if (path / name).is_file()]
        if not found:
            raise MissingWeightsError(missing_clip_message(f"{path} holds neither config.json nor open_clip weights"))
        return found[0]
    return path


def check_clip_backend(path: Path) -> None:
    """Fail before any generation if the back-end for ``path`` cannot load."""
    if path.is_file():
        try:
            import open_clip  # noqa: F401  (optional dependency open_clip_torch: only this back-end needs it)
        except ImportError as error:
            raise ImportError(
                f"{path} is an open_clip weight file, which needs the open_clip package: "
                "pip install open_clip_torch (or pass a transformers CLIPModel folder to --clip)"
            ) from error


def _pooled(output):
    """transformers 4.x returns the projected embedding, 5.x an output object holding it."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClipScorer:
    """Cosine similarity of images and prefixed captions; subclasses embed."""

    description: str
    comparable_with: str

    def similarities(self, images: list[np.ndarray], captions: list[str]) -> np.ndarray:
        with torch.inference_mode():
            image_embeddings = self.embed_images(images).double()
            text_embeddings = self.embed_texts([PROMPT_PREFIX + c for c in captions]).double()
            cosine = torch.nn.functional.cosine_similarity(image_embeddings, text_embeddings, dim=1)
        return cosine.cpu().numpy()

    def describe(self) -> dict:
        return {"model": self.description, "prefix": PROMPT_PREFIX, "comparable_with": self.comparable_with}


class TransformersClipScorer(ClipScorer):
    def __init__(self, folder: Path, device="cpu"):
        # transformers takes seconds to import and only this back-end needs it
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        self.device = device
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if (folder / "preprocessor_config.json").is_file():
            self.processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
        else:  # CLIP's standard preprocessing at the model's input size
            size = self.model.config.vision_config.image_size
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.max_length = min(77, self.model.config.text_config.max_position_embeddings)
        self.description = f"transformers CLIPModel {folder}"
        self.comparable_with = "only numbers computed with this same model folder (not the papers' ViT-g/14)"

    def embed_images(self, images):
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def embed_texts(self, texts):
        tokens = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return _pooled(features)


class OpenClipScorer(ClipScorer):
    """open_clip ViT-g/14 built without ``pretrained`` (which could download) and filled from the local file."""

    def __init__(self, path: Path, device="cpu"):
        import open_clip  # optional dependency (open_clip_torch): only this back-end needs it

        model, _, preprocess = open_clip.create_model_and_transforms(OPEN_CLIP_ARCH, pretrained=None)
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model, self.preprocess, self.device = model.float().to(device).eval(), preprocess, device
        self.tokenizer = open_clip.get_tokenizer(OPEN_CLIP_ARCH)
        self._to_pil = Image.fromarray
        self.description = f"open_clip {OPEN_CLIP_ARCH} {OPEN_CLIP_PRETRAINED} ({path.name})"
        self.comparable_with = PAPERS

    def embed_images(self, images):
        batch = torch.stack([self.preprocess(self._to_pil(im)) for im in images]).to(self.device)
        return self.model.encode_image(batch)

    def embed_texts(self, texts):
        # open_clip truncates to 77 tokens and ends the sequence with the end-of-text token, which is
        # what GigaGAN's token splicing of the prefix produces.
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def load_clip_scorer(path: Path, device="cpu") -> ClipScorer:
    if path.is_dir():
        return TransformersClipScorer(path, device)
    check_clip_backend(path)
    return OpenClipScorer(path, device)


class RunningMean:
    """Mean of a stream of numbers, without keeping them."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, values) -> None:
        values = np.asarray(values, dtype=np.float64)
        self.total += float(values.sum())
        self.count += values.size

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None
