"""Which quality metric a run's ``eval_every`` uses: the one its data gives.

* ``teacher: zoo:digits``: the digit judge (digit-FID, prompt accuracy, digits covered);
* any other teacher, with ``eval_prompts`` and ``eval_reference``: FID-N and CLIP score on those captions;
* the 2-D toy builds its own (energy distance, share between modes: :mod:`diffdistill.toy`).
"""

from __future__ import annotations

from diffdistill.config import ConfigError, TrainConfig
from diffdistill.engine.quality import Evaluator
from diffdistill.eval import EvalInputError
from diffdistill.eval.in_training import CaptionQuality
from diffdistill.zoo.quality import DigitsQuality


def evaluator_for(cfg: TrainConfig, device: str = "cpu") -> Evaluator | None:
    """The evaluator for ``cfg`` (None when ``eval_every`` is 0); a ConfigError naming the missing setting otherwise."""
    if not cfg.eval_every:
        return None
    if cfg.teacher.startswith("zoo:digits"):
        return DigitsQuality.for_config(cfg)
    if not (cfg.eval_prompts and cfg.eval_reference):
        raise ConfigError(f"eval_every={cfg.eval_every}: teacher {cfg.teacher!r} has no built-in quality metric; set eval_prompts=FILE "
                          "(captions, one a line) and eval_reference=STATS.npz (Inception statistics of real images, as `diffdistill "
                          "eval` caches them) for FID and CLIP score, or eval_every=0")
    try:
        return CaptionQuality(cfg.eval_prompts, cfg.eval_reference, cfg.eval_samples, device)
    except (EvalInputError, ValueError) as e:
        raise ConfigError(f"eval_prompts / eval_reference: {e}") from None


__all__ = ["evaluator_for"]
