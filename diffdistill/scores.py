"""The fake-score / real-score engine that every distribution-matching method stands on.

* **real score** -- the frozen teacher Denoiser, no gradients by default (SiD and SIM ask for
  gradients through its *input*), optionally held in a lower precision;
* **fake score** -- a trainable critic initialized from the teacher (a full copy, or LoRA
  adapters on a frozen copy) and trained by denoising score matching on generator samples;
* **guidance** -- classifier-free guidance in x0 space with one convention,
  ``D_w = D(uncond) + w * (D(cond) - D(uncond))``, so ``w = 1`` is the conditional model
  (DMD2, SiD-LSG, rCM; LCM's "w" is our ``w - 1``); a guidance-distilled network (Flux.1-dev, whose
  transformer embeds the scale) is guided at w by one pass with its guidance input at w, never a pair;
* **GAN head** -- an optional classifier on features of the critic (DMD2) or of the teacher
  (FastGen), read with a forward hook on the backbone's bottleneck.

Scores are returned as x0 predictions; ``param.score_from_x0`` turns one into a score.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from diffdistill.backbones import feature_module, feature_modules
from diffdistill.denoiser import Denoiser, add_lora, base_copy, native_from_x0
from diffdistill.sampling import guided_x0
from diffdistill.schedules import add_noise

guided = guided_x0  # the score engine's name for it


def make_critic(teacher, lora_rank: int = 0, lora_alpha: float | None = None, share_teacher: bool = True, adapter: str = "default"):
    """The fake score's Denoiser: a trainable full copy of the teacher, or LoRA adapters.

    A LoRA critic keeps its adapters on the teacher's own frozen weights (``share_teacher``), so no
    third copy of the network exists: the real score is the same module with the adapters off
    (``Teacher.denoiser()``), the fake score with them on. ``share_teacher=False`` puts them on a
    frozen copy instead (Phased DMD's several critics, one per expert)."""
    if lora_rank <= 0:  # (not teacher.denoiser: that is the student's, whose guidance input may see another scale)
        backbone = teacher.make_critic() if teacher.make_critic is not None else base_copy(teacher.backbone)
        return Denoiser(backbone.train().float().requires_grad_(True), teacher.schedule, teacher.prediction_type)
    if teacher.make_critic is not None:  # a toy teacher builds its critic fresh
        backbone = teacher.make_critic()
    else:
        backbone = teacher.backbone if share_teacher else base_copy(teacher.backbone)
    if backbone is not teacher.backbone:
        backbone.train()
    add_lora(backbone, lora_rank, adapter, lora_alpha)
    return Denoiser(backbone, teacher.schedule, teacher.prediction_type, adapter=adapter)


class FeaturesRead(Exception):
    """Raised by a stopping FeatureTap once it holds the features: the rest of the forward is skipped."""


class FeatureTap:
    """Captures the output of a backbone's feature module during a forward pass.

    ``reading(stop=True)`` ends the forward right after the feature module: a GAN head needs only the
    bottleneck, so the UNet's up path (or a transformer's final norm and projection) is never run.
    """

    def __init__(self, backbone: nn.Module):
        self.module = feature_module(getattr(backbone, "module", backbone))
        self.value = None

    @contextlib.contextmanager
    def reading(self, stop: bool = False):
        def hook(module, args, output):
            self.value = block_output(output)
            if stop:
                raise FeaturesRead

        handle = self.module.register_forward_hook(hook)
        try:
            yield self
        except FeaturesRead:
            pass
        finally:
            handle.remove()  # whole forwards that follow (the fake-score loss, a checkpoint recomputation) run whole


def can_stop_early(net: nn.Module) -> bool:
    """Whether a forward through ``net`` may be cut short. A DDP wrapper prepares its gradient
    reduction after the forward returns, and FSDP reshards after it; neither happens when the
    forward raises, so wrapped or sharded nets run whole."""
    return not hasattr(net, "module") and not any(isinstance(m, FSDPModule) for m in (net, getattr(net, "backbone", net)))


def block_output(output):
    """A block's image features: SD3's and Flux's joint blocks return (text tokens, image tokens), SD3's
    last block (None, image tokens), a UNet down block (hidden states, skip connections): the last tensor."""
    if isinstance(output, tuple):
        return [o for o in output if torch.is_tensor(o)][-1]
    return output


class LayerTaps:
    """Captures the outputs of several of a backbone's blocks (``backbones.feature_modules``) in one
    forward pass, in block order, with their graph: LADD's heads read the frozen teacher this way."""

    def __init__(self, backbone: nn.Module, indices: list[int] | None = None):
        self.modules = feature_modules(getattr(backbone, "module", backbone), indices)
        self.values: list = [None] * len(self.modules)

    @contextlib.contextmanager
    def reading(self):
        def hook_for(i):
            def hook(module, args, output):
                self.values[i] = block_output(output)
            return hook

        handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(self.modules)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


class GANHead(nn.Module):
    """A small classifier on backbone features: one logit per sample (``pooled``) or per patch (``patch``).

    ``pooled`` (the default; any feature shape): on image features (B, C, H, W), strided convs,
    GroupNorm and SiLU as DMD2 stacks them on the SD UNet's bottleneck, then global pooling; on
    token features (B, N, C) or vectors (B, C), an MLP, averaged over tokens.
    ``patch`` (image features): DMD2's SD1.5 head itself (``cls_pred_branch`` in its
    ``main/sd_guidance.py``): a 4x4 stride-2 conv, a 4x4 stride-4 conv, each with GroupNorm and
    SiLU, and a 1x1 conv to one logit per patch, no pooling. On SD1.5's 8x8 bottleneck that is one
    patch; on a map under 8 the second kernel shrinks to the map (stride equal to it).
    """

    def __init__(self, channels: int, ndim: int, width: int = 256, kind: str = "pooled", size: int | None = None):
        super().__init__()
        if kind not in GAN_HEADS or (kind == "patch" and (ndim != 4 or size is None or size < 2)):
            raise ValueError(f"gan_head={kind!r}: choose one of {', '.join(GAN_HEADS)}; patch needs image features of side >= 2")
        self.ndim = ndim
        groups = 32 if channels % 32 == 0 else 8 if channels % 8 == 0 else 1
        conv_norm = lambda k, stride, pad: [nn.Conv2d(channels, channels, k, stride, pad), nn.GroupNorm(groups, channels), nn.SiLU()]
        if kind == "patch":
            second = min(4, size // 2)
            self.net = nn.Sequential(*conv_norm(4, 2, 1), *conv_norm(second, second, 0), nn.Conv2d(channels, 1, 1), nn.Flatten())
        elif ndim == 4:
            self.net = nn.Sequential(*conv_norm(3, 1, 1), *conv_norm(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))
        else:
            self.net = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B,) or, for ``patch``, (B, patches)."""
        out = self.net(features.float())
        if self.ndim == 3:
            return out.mean(1).squeeze(-1)
        return out.squeeze(-1) if out.shape[-1] == 1 else out


GAN_HEADS = ("pooled", "patch")


def build_gan_head(denoiser, example_x: torch.Tensor, t: torch.Tensor, cond: dict, kind: str = "pooled") -> GANHead:
    """Sizes a head by running the backbone once on an example batch and reading its features."""
    tap = FeatureTap(denoiser.backbone)
    with torch.no_grad(), tap.reading():
        denoiser(example_x, t, cond)
    features = tap.value
    channels = features.shape[-1] if features.ndim == 3 else features.shape[1]
    return GANHead(channels, features.ndim, kind=kind, size=min(features.shape[-2:]) if features.ndim == 4 else None)


class ScoreEngine:
    """Real and fake x0 predictions, guidance and GAN logits, for a method's losses.

    Holds references, not copies: ``nets`` is the method's dict, so DDP-wrapped critics are used.
    """

    def __init__(self, teacher, nets: dict, critic_name: str = "critic", gan_name: str | None = None, gan_features: str = "critic"):
        if gan_features not in ("critic", "teacher"):
            raise ValueError(f"gan_features={gan_features!r}: choose critic or teacher")
        self.teacher_denoiser = teacher.denoiser()
        self.nets, self.critic_name, self.gan_name, self.gan_features = nets, critic_name, gan_name, gan_features

    def real(self, x_t, t, cond, uncond=None, guidance=1.0, grad: bool = False):
        """The teacher's (guided) x0. ``grad=True`` keeps the graph to x_t (never to the teacher's weights)."""
        with torch.set_grad_enabled(grad):
            return guided(self.teacher_denoiser, x_t, t, cond, uncond, guidance)

    def fake(self, x_t, t, cond, uncond=None, guidance=1.0, grad: bool = True):
        with torch.set_grad_enabled(grad):
            return guided(self.nets[self.critic_name], x_t, t, cond, uncond, guidance)

    def gan_logits(self, x_t, t, cond):
        """Logits of the GAN head on features of (critic or teacher) at (x_t, t); graph kept to x_t."""
        net = self.nets[self.critic_name] if self.gan_features == "critic" else self.teacher_denoiser
        tap = FeatureTap(net.module.backbone if hasattr(net, "module") else net.backbone)
        with tap.reading(stop=can_stop_early(net)):
            net(x_t, t, cond)
        return self.nets[self.gan_name](tap.value)


def fake_score_loss(critic, schedule, prediction_type: str, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: dict, space: str = "native",
                    uncond: dict | None = None, guidance=1.0) -> torch.Tensor:
    """Denoising score matching of the critic on (detached) generator samples, per sample.

    ``native``: MSE in the backbone's own prediction type (eps-MSE for SD, as DMD2 trains its fake
    UNet); ``x0``: MSE on x0 (DMD2's ImageNet critic, FastGen's SD critic).
    ``guidance`` (with ``uncond``): the critic's output is guided while it is trained, SiD-LSG's
    kappa_1, e.g. ``||eps_f^w(x_t) - eps||^2``; guidance is affine, so guiding x0 and converting
    equals guiding the native output.
    """
    x = x.detach()
    x_t = add_noise(schedule, x, eps, t)
    if uncond is not None and (torch.is_tensor(guidance) or guidance != 1.0):
        if space not in ("native", "x0"):
            raise ValueError(f"critic loss space {space!r}: choose native or x0")
        x0_hat = guided(critic, x_t, t, cond, uncond, guidance)
        if space == "x0":
            return (x0_hat - x).square().flatten(1).mean(1)
        pred, target = (native_from_x0(schedule, prediction_type, x_t, t, v) for v in (x0_hat, x))
        return (pred - target).square().flatten(1).mean(1)
    if space == "native":
        target = native_from_x0(schedule, prediction_type, x_t, t, x)
        return (critic(x_t, t, cond, output="native") - target).square().flatten(1).mean(1)
    if space == "x0":
        return (critic(x_t, t, cond) - x).square().flatten(1).mean(1)
    raise ValueError(f"critic loss space {space!r}: choose native or x0")


def critic_phase_loss(critic, teacher, times, x: torch.Tensor, batch: dict, space: str = "native", guidance=1.0,
                      uncond_prob: float = 0.0) -> torch.Tensor:
    """The fake-score update every distribution-matching method shares: denoising score matching on
    detached generator samples ``x`` at t ~ ``times`` with the batch's own noise, per sample.
    ``uncond_prob``: the share of samples whose prompt is replaced by the unconditional input for
    this update only (SiD-LSG's fake-side dropout, so a guided fake score has an unconditional branch)."""
    rng, cond = batch["rng"], batch["cond"]
    if uncond_prob > 0:
        keep = rng.rand((x.shape[0],)).to(x.device) >= uncond_prob
        cond = {k: torch.where(keep.view(-1, *[1] * (v.ndim - 1)), v, batch["uncond"][k]) for k, v in cond.items()}
    t = times(teacher.schedule, x.shape[0], rng).to(x.device)
    return fake_score_loss(critic, teacher.schedule, teacher.prediction_type, x, t, rng.randn_like(x), cond, space,
                           batch["uncond"], guidance)
