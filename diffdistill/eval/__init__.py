"""Evaluation harness: FID, KID and CLIP score on the COCO text-to-image protocol.

The protocol is GigaGAN's (Kang et al., 2023), the one DMD2 and SiD-LSG report:
one image per caption, centre-crop on the long edge, PIL LANCZOS to 256 px, then
clean-fid's "clean" mode (Parmar et al., 2022) with the TF-Inception pool features.
See the README's section "Evaluation: FID, KID and CLIP score on the papers' COCO protocol".

Nothing here downloads anything: every weight file is read from a local path and
a missing one raises :class:`MissingWeightsError` naming the file, where it is
published, and where to put it.

Submodules (not imported by this package: they pull in torch):

- ``fid``: streaming statistics, Frechet distance, KID, Inception feature extractors
- ``inception``: the TF-Inception network with torch-fidelity's parameter names
- ``clip_score``: CLIP score (open_clip ViT-g/14, or any transformers ``CLIPModel`` folder)
- ``coco``: the COCO benchmarks and their caption selection (or a prompts file)
- ``protocol``: the protocol's image transform, and feature extraction through it
- ``reference_stats``: the cached reference statistics of a COCO validation split
- ``generation``: resumable, timed generation of one image per caption
- ``run``: the ``diffdistill eval`` command
"""


class MissingWeightsError(FileNotFoundError):
    """A weight file the evaluation needs is not on disk (nothing is ever downloaded)."""


class EvalInputError(ValueError):
    """An input of ``diffdistill eval`` that is missing or wrong (every problem found, listed at once)."""


__all__ = ["MissingWeightsError"]
