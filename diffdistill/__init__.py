"""diffdistill: turn a many-step diffusion model into a one- or few-step generator.

Every network is reached through one :class:`~diffdistill.denoiser.Denoiser` (``x0 = D(x_t, t, cond)``),
every method is a file of losses on one fake-score / real-score engine, and one trainer on
``accelerate`` runs them all. Importing the package loads nothing heavy.

Layers, lowest first (``LAYERS``). A module imports only modules of lower layers, or of its own
package (``methods.dmd2`` uses ``methods.dmd``); ``tests/test_layers.py`` checks every import.
A dotted name places a submodule apart from its package (``backbones.loading`` builds Denoisers,
so it sits above ``denoiser``, while the backbone adapters sit below it).

    0  config, param, randomness, ema, kernels, data.digits,   leaves: types, maths, seeds, raw data, figures
       plots
    1  schedules, backbones, conditioning                       noise schedules, backbone adapters, prompt encoding
    2  denoiser, sampling, data                                 x0 = D(x_t, t, cond); samplers; data sources
    3  backbones.loading, generator, guidance, scores           teachers from disk; the student; the score engine
    4  teachers, methods                                        resolving `teacher:`; one paper a file
    5  engine                                                   the training loop, checkpoints, logging
    6  run                                                      assembly: teacher + data + method -> trainer
    7  export, eval, toy, plan                                  what users do with a run
    8  zoo, cli_errors                                          the bundled teacher, its judge, the quickstart; errors as one line
    9  quality                                                  the in-training metric a run's data gives (eval_every)
   10  cli                                                      the command line
   11  __main__                                                 python -m diffdistill
"""

__version__ = "0.1.0"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "param", "randomness", "ema", "kernels", "data.digits", "plots"),
    ("schedules", "backbones", "conditioning"),
    ("denoiser", "sampling", "data"),
    ("backbones.loading", "generator", "guidance", "scores"),
    ("teachers", "methods"),
    ("engine",),
    ("run",),
    ("export", "eval", "toy", "plan"),
    ("zoo", "cli_errors"),
    ("quality",),
    ("cli",),
    ("__main__",),
)


def layer_of(module: str) -> int | None:
    """The layer of ``diffdistill.X.Y``: that of the longest listed prefix of ``X.Y``."""
    name = module.removeprefix("diffdistill").lstrip(".")
    if not name:
        return 0
    best = None
    for level, entries in enumerate(LAYERS):
        for entry in entries:
            if (name == entry or name.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (level, entry)
    return None if best is None else best[0]
