"""diffdistill: turn a many-step diffusion model into a one- or few-step generator.

Every network is reached through one :class:`~diffdistill.denoiser.Denoiser` (``x0 = D(x_t, t, cond)``),
every method is a file of losses on one fake-score / real-score engine, and one trainer on
``accelerate`` runs them all. Heavy modules are imported lazily so ``diffdistill --help`` is quick.
"""

__version__ = "0.1.0"
