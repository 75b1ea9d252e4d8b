"""The methods learn: seeded runs against the exact ring8 teacher, with the project's own trainer,
held to absolute floors (:class:`diffdistill.toy.Floors`) that broken samples are shown to fail.

Each training test (here dmd and dmd2; sid, sim, f-distill and Diff-Instruct in their own files) runs
:func:`diffdistill.toy.repair_ring8`: the method at its shipped toy settings, warm-started from a kd
student of a ring shrunk to radius 1.8, which fails the floors (asserted), so the method itself has to
bring every sample out to the ring in a few hundred generator steps. sCM, rCM and Phased DMD (tests/test_scm.py,
test_phased_dmd.py) do the same from a consistency warm start (a kd student, the t = 999 map only, falls apart
under them), sCM and rCM held to CD's floors (toy.METHOD_FLOORS, tests/test_consistency.py), which still reject
every broken variant.
"""

import math

import pytest
import torch
from toy_repair import assert_repairs_shrunk_ring8

from diffdistill.toy import (
    METHOD_DEFAULTS,
    METHOD_FLOORS,
    WEAK_FLOORS_PASS,
    Floors,
    GaussianMixture,
    mode_report,
    ring8,
    sample_teacher_ode,
    toy_quality,
    toy_teacher,
    train_on_toy,
)

FLOORS = Floors()  # energy distance <= 0.012, <= 20% between modes, mass ratios and spread ratio in range, 8/8 modes


def broken_ring8_samples(n: int = 10000, seed: int = 7) -> dict[str, torch.Tensor]:
    """Issue 20's broken variants of ring8, and one more: sample sets a learning test must not accept."""
    mixture, g = ring8(), torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    return {
        "blur 5x std": GaussianMixture(mixture.means, 5 * mixture.std).sample(n, g),
        "uniform ring": (2 * torch.stack([angle.cos(), angle.sin()], 1) + mixture.std * torch.randn(n, 2, generator=g, dtype=torch.float64)).float(),
        "dropped mode": GaussianMixture(mixture.means[1:], mixture.std).sample(n, g),
        "ring shrunk to radius 1.8": ring8(1.8).sample(n, g),
        "modes collapsed to points": GaussianMixture(mixture.means, 0.2 * mixture.std).sample(n, g),
    }


DISTINCT_FLOORS = {}  # one method per distinct set of floors (sCM and rCM share CD's): each set is checked once
for _name, _floors in METHOD_FLOORS.items():
    DISTINCT_FLOORS.setdefault(_floors, _name)


@pytest.mark.parametrize("floors", ["default", *DISTINCT_FLOORS.values()])
def test_floors_reject_each_broken_variant_and_accept_the_teacher(floors):
    """The floors are discriminative: exact samples and the teacher's 50-step ODE pass, each broken variant fails;
    so do the looser per-method floors (toy.METHOD_FLOORS), except the variants toy.WEAK_FLOORS_PASS names, which pass."""
    name, floors, mixture = floors, METHOD_FLOORS.get(floors, FLOORS), ring8()
    assert not floors.failures(toy_quality(mixture.sample(10000, torch.Generator().manual_seed(3)), mixture))
    assert not floors.failures(toy_quality(sample_teacher_ode(toy_teacher(mixture), 10000), mixture))
    for variant, samples in broken_ring8_samples().items():
        quality = toy_quality(samples, mixture)
        if variant in WEAK_FLOORS_PASS.get(name, ()):
            assert not floors.failures(quality), f"{variant} fails {name}'s floors: {floors.failures(quality)}"
        else:
            assert floors.failures(quality), f"{variant} passes {name}'s floors: {quality}"


@pytest.mark.parametrize("name", ["dmd", "dmd2"])
def test_repairs_a_shrunk_ring_to_the_floors(name, tmp_path, one_thread):
    """Shipped toy settings (TRAIN_DEFAULTS), 360 generator steps from the shrunk-ring warm start (see the
    module docstring): dmd2 is at ED 0.0074 after 120 and 0.0053 after 360 (0.032 at the start). 360, not
    fewer: with its critic update a no-op dmd2 still passes at 120 (the teacher's score alone pulls the ring
    out), and fails only later as the untrained fake score drags it off (ED 0.017 at 240, 0.028 at 360)."""
    assert_repairs_shrunk_ring8(name, 360, tmp_path)


def test_train_on_toy_samples_from_the_generator_ema(tmp_path):
    """With a decay of ~1 the EMA stays at the initialization, so the returned generator must too."""
    def generator_params(**kwargs):
        out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        method = train_on_toy(ring8(), METHOD_DEFAULTS["dmd2"], 3, out, widths=(16, 1, 16, 1), **kwargs)
        return torch.cat([p.detach().flatten() for p in method.nets["generator"].parameters()])

    untrained = generator_params(fit=False)
    assert not torch.equal(generator_params(), untrained)
    torch.testing.assert_close(generator_params(ema_decay=1 - 1e-12), untrained)


def test_mode_report_tells_sharp_from_blurry_and_dropped():
    mixture = ring8()
    g = torch.Generator().manual_seed(0)
    sharp = mixture.sample(4000, g)
    report = mode_report(sharp, mixture)
    assert report["modes_covered"] == 8 and report["between_modes"] < 0.01 and 0.8 < report["mass_ratio_min"]
    blurry = sharp + 0.5 * torch.randn(sharp.shape, generator=g)
    assert mode_report(blurry, mixture)["between_modes"] > 0.5
    dropped = sharp[torch.cdist(sharp.double(), mixture.means).argmin(1) != 0]
    report = mode_report(dropped, mixture)
    assert report["modes_covered"] == 7 and report["mass_ratio_min"] == 0.0


def test_unknown_warm_start_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="warm_start_kind='sft', choose one of kd, consistency"):
        train_on_toy(ring8(), METHOD_DEFAULTS["scm"], 1, tmp_path, widths=(16, 1, 16, 1), warm_start=1, warm_start_kind="sft")


def test_endpoint_targets_step_onto_the_teacher_path():
    """The consistency warm start's targets: Phased DMD's expert step with output D = endpoint_target lands on the
    teacher's ODE path at the boundary; the path ends where the teacher's own DDIM sampler does."""
    from diffdistill.methods.phased_dmd import expert_step
    from diffdistill.sampling import ddim_sample
    from diffdistill.toy import endpoint_target, teacher_ode_trajectories

    teacher = toy_teacher(ring8(), generator_width=16, generator_depth=1, critic_width=16, critic_depth=1)
    grid = teacher.schedule.sampling_timesteps(20)  # 999, 949, ..., 749, ...
    path, x0 = teacher_ode_trajectories(teacher, 64, grid, seed=5)
    t, s = grid.index(999.0), grid.index(749.0)
    target = endpoint_target(teacher.schedule, path[t], 999.0, path[s], 749.0)
    landed = expert_step(lambda x, t_vec, cond: target, teacher.schedule, path[t], 999.0, 749.0, {})
    torch.testing.assert_close(landed, path[s], atol=1e-5, rtol=1e-5)
    assert torch.equal(endpoint_target(teacher.schedule, path[s], 749.0, x0, None), x0)
    torch.testing.assert_close(x0, ddim_sample(teacher.denoiser(), path[0], grid, {}), atol=1e-5, rtol=1e-5)
