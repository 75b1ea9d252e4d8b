"""The toy repair check shared by the methods' learning tests.

From a kd student of ring8 shrunk to radius 1.8 (a broken variant that fails the floors: asserted), the
method at its shipped toy settings (``diffdistill.toy.TRAIN_DEFAULTS``) must bring ring8's samples within
:class:`diffdistill.toy.Floors` (energy distance <= 0.012 over 5 x 2,000 samples, <= 20% between modes,
mass and spread ratios in range, 8/8 modes) in ``steps`` generator steps. Why not from scratch: DM
students need minutes to pass the floors there (benchmarks/toy2d.py); see ``repair_ring8``.
"""

from diffdistill.toy import Floors, repair_ring8


def assert_repairs_shrunk_ring8(name: str, steps: int, out) -> None:
    floors = Floors()
    start, end = repair_ring8(name, steps, out)
    assert floors.failures(start), start  # the warm start alone is a broken variant
    assert not floors.failures(end), (floors.failures(end), end)
