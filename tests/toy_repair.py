"""The toy repair check shared by the methods' learning tests.

From a warm start on ring8 shrunk to radius 1.8 (a kd student, or for sCM, rCM and Phased DMD a consistency
warm start: a broken variant that fails the floors, asserted), the method at its shipped toy settings
(``diffdistill.toy.TRAIN_DEFAULTS``) must bring ring8's samples within its floors (default
:class:`diffdistill.toy.Floors`: energy distance <= 0.012 over 5 x 2,000 samples, <= 20% between modes,
mass and spread ratios in range, 8/8 modes; ``toy.METHOD_FLOORS`` where a method has its own) in ``steps``
generator steps. Why not from scratch: DM students need minutes to pass the floors there
(benchmarks/toy2d.py); see ``repair_ring8``.
"""

from diffdistill.toy import METHOD_FLOORS, Floors, repair_ring8


def assert_repairs_shrunk_ring8(name: str, steps: int, out) -> None:
    floors = METHOD_FLOORS.get(name, Floors())
    start, end = repair_ring8(name, steps, out)
    assert floors.failures(start), start  # the warm start alone is a broken variant
    assert not floors.failures(end), (floors.failures(end), end)
