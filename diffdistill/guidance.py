"""Guidance styles for the real and the fake score, one small object every method can hold.

One convention throughout (``scores.cfg_combine``): ``D^w = D(uncond) + w (D(cond) - D(uncond))``,
so ``w = 1`` is the conditional model and ``w = 0`` the unconditional one. A style fixes three
scales, named as SiD-LSG names them (Zhou et al. 2025, "Guided Score identity Distillation",
Sec. 3, the "long and short guidance" kappas):

    real        w on the teacher in the generator loss                         kappa_4
    fake        w on the fake score in the generator loss                      kappa_2 = kappa_3
    fake_train  w on the fake score while it is trained by score matching      kappa_1

and may instead draw ``real`` (and ``fake``) per sample from a range (SNOOPI's Proper Guidance).
The styles, each a constructor below with its formula:

    cfg       real = w                        fake = 1          fake_train = 1   (DMD, DMD2, SiD-LSG kappa_4 only)
    fake_cfg  real = w                        fake = w_fake     fake_train = 1   (SwiftBrush: CFG on the fake score too)
    random    real ~ U[lo, hi] per sample     fake = 1 or ~ U   fake_train = 1   (SNOOPI, Proper Guidance)
    lsg       real = kappa_4                  fake = kappa_2    fake_train = kappa_1
    zero_cfg  real = 1                        fake = 0          fake_train = 0   (Few-Step SiD, 2025)
    anti_cfg  real = w (default 1)            fake = w_fake < 0 fake_train = 1   (Few-Step SiD, 2025)

Methods draw the scales with :meth:`Guidance.draw` and pass them to ``ScoreEngine.real`` /
``ScoreEngine.fake`` (a per-sample tensor is fine) and to ``fake_score_loss``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Guidance:
    real: float = 1.0                                  # teacher w in the generator loss (kappa_4)
    fake: float = 1.0                                  # fake-score w in the generator loss (kappa_2 = kappa_3)
    fake_train: float = 1.0                            # fake-score w while training it (kappa_1)
    real_range: tuple[float, float] | None = None      # per-sample teacher w ~ U[lo, hi], replacing ``real``
    fake_range: tuple[float, float] | None = None      # per-sample fake w ~ U[lo, hi], replacing ``fake``

    def draw(self, n: int, rng) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """(w_real, w_fake) for one generator loss: floats, or (n,) tensors where a range is set.

        Draws come from the batch's ``rng`` so every process and a resumed run draw the same scales.
        """
        w_real = _uniform(self.real_range, n, rng) if self.real_range else self.real
        w_fake = _uniform(self.fake_range, n, rng) if self.fake_range else self.fake
        return w_real, w_fake


def _uniform(bounds: tuple[float, float], n: int, rng) -> torch.Tensor:
    lo, hi = bounds
    return lo + rng.rand((n,)) * (hi - lo)


# ---- the styles --------------------------------------------------------------------------------


def standard_cfg(w: float) -> Guidance:
    """Classifier-free guidance on the teacher only (Ho & Salimans 2022): D_r^w, D_f(c)."""
    return Guidance(real=w)


def fake_cfg(w: float, w_fake: float | None = None) -> Guidance:
    """CFG on the fake score as well as the teacher (SwiftBrush, Nguyen & Tran, CVPR 2024, whose LoRA
    "student teacher" is queried with guidance): D_r^w and D_f^{w_fake}, w_fake = w unless given."""
    return Guidance(real=w, fake=w if w_fake is None else w_fake)


def proper_guidance(lo: float, hi: float, fake_lo: float | None = None, fake_hi: float | None = None) -> Guidance:
    """Random-scale CFG (SNOOPI, Nguyen et al. 2024, "Proper Guidance - SwiftBrush"): each sample's
    teacher scale w_i ~ U[lo, hi], and, if a fake range is given, the fake score's w'_i ~ U[fake_lo, fake_hi]
    (SNOOPI varies "the guidance scale of both teacher models"). Ranges: not verified."""
    if lo > hi:
        raise ValueError(f"guidance range [{lo}, {hi}] is empty")
    fake = None
    if fake_lo is not None or fake_hi is not None:
        if fake_lo is None or fake_hi is None or fake_lo > fake_hi:
            raise ValueError(f"fake guidance range [{fake_lo}, {fake_hi}] must be two increasing numbers")
        fake = (float(fake_lo), float(fake_hi))
    return Guidance(real_range=(float(lo), float(hi)), fake_range=fake)


def lsg(kappa1: float, kappa2: float, kappa4: float) -> Guidance:
    """SiD-LSG's long and short guidance: kappa_1 on the fake score while training it, kappa_2 = kappa_3
    on the fake score in the generator loss, kappa_4 on the teacher (``cfg_train_fake``,
    ``cfg_eval_fake``, ``cfg_eval_real`` in its official code)."""
    return Guidance(real=kappa4, fake=kappa2, fake_train=kappa1)


def zero_cfg() -> Guidance:
    """Zero-CFG (Zhou, Gu & Wang 2025, "Few-Step Diffusion via Score identity Distillation"): no CFG in
    the teacher (D_r = D_r(c)) and no text in the fake score, trained and evaluated on the empty prompt
    (D_f = D_f(uncond), i.e. w = 0). Read from the paper's abstract; formula details not verified."""
    return Guidance(real=1.0, fake=0.0, fake_train=0.0)


def anti_cfg(w_fake: float, w_real: float = 1.0) -> Guidance:
    """Anti-CFG (Few-Step SiD, 2025): negative CFG in the fake score, D_f^{w_fake} with w_fake < 0, which
    pushes the generator toward the text as a teacher CFG of scale 2 - w_fake would near the fixed point,
    but with the fake score's own conditional direction. The teacher's scale (default 1, no CFG) and
    the value of w_fake are not verified: the paper's abstract only says "negative CFG in the fake score
    network"."""
    if w_fake >= 0:
        raise ValueError(f"anti_cfg needs a negative fake-score scale, got method.fake_guidance={w_fake}")
    return Guidance(real=w_real, fake=w_fake, fake_train=1.0)


GUIDANCE_STYLES = ("cfg", "fake_cfg", "random", "lsg", "zero_cfg", "anti_cfg")

# the option fields each style reads; the others must keep their defaults
_READS = {
    "cfg": {"guidance"},
    "fake_cfg": {"guidance", "fake_guidance"},
    "random": {"guidance_range", "fake_guidance_range"},
    "lsg": {"guidance", "fake_guidance", "fake_train_guidance"},
    "zero_cfg": set(),
    "anti_cfg": {"guidance", "fake_guidance"},
}
_SCALES = ("guidance", "fake_guidance", "fake_train_guidance", "guidance_range", "fake_guidance_range")


def guidance_from_options(options) -> Guidance:
    """Builds a method's :class:`Guidance` from its flat options (``guidance_style``, ``guidance``,
    ``fake_guidance``, ``fake_train_guidance``, ``guidance_range``, ``fake_guidance_range``).

    A scale the chosen style does not read must stay at its default: setting it is an error, not a no-op.
    """
    style = options.guidance_style
    if style not in _READS:
        raise ValueError(f"method.guidance_style={style!r}: choose one of {', '.join(GUIDANCE_STYLES)}")
    defaults = {f.name: f.default for f in dataclasses.fields(options)}
    for name in _SCALES:
        if name not in _READS[style] and getattr(options, name) != defaults[name]:
            raise ValueError(f"method.{name}={getattr(options, name)!r} is not used by guidance_style={style}; "
                             f"it reads {', '.join(sorted(_READS[style])) or 'no scales'}")
    if style == "cfg":
        return standard_cfg(options.guidance)
    if style == "fake_cfg":
        return fake_cfg(options.guidance, options.fake_guidance)
    if style == "random":
        if not options.guidance_range or len(options.guidance_range) != 2:
            raise ValueError("guidance_style=random needs method.guidance_range=[lo, hi]")
        fake = options.fake_guidance_range or [None, None]
        if len(fake) != 2:
            raise ValueError("method.fake_guidance_range must be [lo, hi]")
        return proper_guidance(*options.guidance_range, *fake)
    if style == "lsg":
        return lsg(options.fake_train_guidance, options.fake_guidance, options.guidance)
    if style == "zero_cfg":
        return zero_cfg()
    return anti_cfg(options.fake_guidance, options.guidance)
