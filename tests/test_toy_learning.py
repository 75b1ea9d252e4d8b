"""The methods learn: seeded runs against the exact ring8 teacher, with the project's own trainer.

Small from-scratch MLPs (width 128) keep each run within about a minute on two CPU cores.
"""

import torch

from diffdistill.toy import METHOD_DEFAULTS, energy_distance, mode_report, ring8, sample_method, train_on_toy

WIDTHS = (128, 3, 128, 3)


def test_dmd_covers_all_eight_modes_with_balanced_mass(tmp_path):
    mixture = ring8()
    method = train_on_toy(mixture, METHOD_DEFAULTS["dmd"], 300, tmp_path, widths=WIDTHS, batch_size=256)
    report = mode_report(sample_method(method, 4000), mixture)
    assert report["modes_covered"] == 8, report
    assert 0.5 <= report["mass_ratio_min"] and report["mass_ratio_max"] <= 2.0, report


def test_dmd2_energy_distance_falls_twentyfold(tmp_path):
    mixture = ring8()
    reference = mixture.sample(2000, torch.Generator().manual_seed(5))
    untrained = train_on_toy(mixture, METHOD_DEFAULTS["dmd2"], 300, tmp_path, widths=WIDTHS, fit=False)
    start = energy_distance(sample_method(untrained, 2000), reference)
    method = train_on_toy(mixture, METHOD_DEFAULTS["dmd2"], 300, tmp_path, widths=WIDTHS, batch_size=256)
    end = energy_distance(sample_method(method, 2000), reference)
    assert end * 20 <= start, (start, end)


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
