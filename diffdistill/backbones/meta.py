"""A teacher pipeline built on the meta device from its folder's configs: every network the
pipeline holds (backbone, VAE, text encoders), with its weights' shapes and no memory behind them.

Under several processes only the main one reads a teacher's weight files; every other builds the
pipeline here and receives the weights from it (:mod:`diffdistill.engine.broadcast`), so a node's
host memory holds one disk copy of the teacher, not one per process.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, ModelMixin
from torch import nn
from transformers import PreTrainedModel


def empty_pipeline(path: Path, index: dict, trust_remote_code: bool = False):
    """The pipeline in ``path`` with its networks on meta; the rest (tokenizers, scheduler) loads
    as usual, since diffusers loads a component from disk only when none is passed in."""
    networks = {}
    for name, entry in index.items():
        if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None:
            network = empty_network(path, name, *entry)
            if network is not None:
                networks[name] = network
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code, **networks)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def empty_network(path: Path, name: str, library: str, class_name: str) -> nn.Module | None:
    """Component ``name`` built on meta from ``path/name``'s config, in eval mode as
    ``from_pretrained`` leaves it; None for a component without weights (tokenizer, scheduler)."""
    model_class = _component_class(library, class_name, name)
    if not issubclass(model_class, nn.Module):
        return None
    with init_empty_weights():  # parameters on meta and never initialized: a 12B backbone costs nothing
        if issubclass(model_class, ModelMixin):
            model = model_class.from_config(model_class.load_config(path, subfolder=name))
        elif issubclass(model_class, PreTrainedModel):
            model = model_class._from_config(model_class.config_class.from_pretrained(path / name))
        else:
            raise TypeError(f"{name} ({library}.{class_name}) is neither a diffusers nor a transformers model, so it cannot be "
                            "built on the meta device; set load_on_main_only=false to have every process read the teacher")
    if isinstance(model, PreTrainedModel):
        # As from_pretrained does (T5's input embedding is its shared one), so both hold the same tensors. Outside
        # init_empty_weights: it re-wraps every parameter assigned under it, which would untie them again.
        model.tie_weights()
    return model.eval()


def _component_class(library: str, class_name: str, name: str) -> type:
    try:
        return getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as e:
        raise TypeError(f"{name}: cannot find {library}.{class_name} (custom pipeline code?) to build it on the meta device; "
                        "set load_on_main_only=false to have every process read the teacher") from e


__all__ = ["empty_network", "empty_pipeline"]
