"""FID / KID maths and the clean-mode Inception features, checked against closed forms,
clean-fid and torchmetrics. Every network here is randomly initialised and written
to a temporary file: nothing is downloaded (any attempt fails the test)."""

import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from diffdistill.eval import MissingWeightsError
from diffdistill.eval.fid import (
    TORCH_FIDELITY_FILE,
    TORCH_FIDELITY_URL,
    TORCHSCRIPT_FILE,
    TORCHSCRIPT_URL,
    FeatureStatistics,
    InceptionFeatureExtractor,
    clean_resize,
    fid_label,
    frechet_distance,
    kernel_inception_distance,
    load_statistics,
    resolve_inception_path,
)
from diffdistill.eval.inception import write_random_torch_fidelity_weights, write_random_torchscript_inception


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the evaluation tried to download something")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def gaussian_features(rng, n, dim, shift=0.0):
    mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mixing + shift


def stats_of(features):
    return features.mean(axis=0), np.cov(features, rowvar=False)


def relative_difference(a, b):
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_to_a_standard_gaussian_is_the_closed_form():
    # With S1 = I: d = |mu1 - mu2|^2 + dim + tr(S2) - 2 tr(S2^(1/2)), for any rotated S2.
    rng = np.random.default_rng(1)
    dim = 8
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eigenvalues = rng.uniform(0.05, 4, size=dim)
    s2 = rotation @ np.diag(eigenvalues) @ rotation.T
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + dim + eigenvalues.sum() - 2 * np.sqrt(eigenvalues).sum()
    assert frechet_distance(mu1, np.eye(dim), mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_agrees_with_clean_fid():
    from cleanfid.fid import frechet_distance as clean_fid_frechet_distance

    rng = np.random.default_rng(2)
    a, b = gaussian_features(rng, 800, 64), gaussian_features(rng, 700, 64, shift=0.3)
    ours = frechet_distance(*stats_of(a), *stats_of(b))
    theirs = clean_fid_frechet_distance(*stats_of(a), *stats_of(b))
    assert relative_difference(ours, theirs) < 1e-6


def test_frechet_distance_agrees_with_torchmetrics_on_the_same_features():
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Features(torch.nn.Module):  # hands the features through, so both sides see the same numbers
        num_features = 64

        def forward(self, x):
            return x

    rng = np.random.default_rng(3)
    real, fake = gaussian_features(rng, 600, 64), gaussian_features(rng, 500, 64, shift=0.2)
    metric = FrechetInceptionDistance(feature=Features())
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    theirs = float(metric.compute())

    ours_real, ours_fake = FeatureStatistics(64), FeatureStatistics(64)
    for chunk in np.array_split(real, 7):
        ours_real.update(chunk)
    ours_fake.update(fake)
    ours = frechet_distance(ours_real.mean, ours_real.covariance, ours_fake.mean, ours_fake.covariance)
    assert relative_difference(ours, theirs) < 1e-6


def test_fewer_samples_than_dimensions_gives_the_exact_finite_distance():
    # With n < dim the covariances are singular. Then tr((S1 S2)^(1/2)) is the nuclear norm of
    # A B^T / (n - 1), A and B the centred samples: an independent exact value.
    rng = np.random.default_rng(4)
    n, dim = 12, 256
    a, b = rng.normal(size=(n, dim)), rng.normal(size=(n, dim)) + 0.5
    mu1, s1 = stats_of(a)
    mu2, s2 = stats_of(b)
    ac, bc = a - mu1, b - mu2
    nuclear = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / (n - 1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(ours)
    assert ours == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9 * np.trace(s1))


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------- streaming statistics


def test_streaming_statistics_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(5)
    # A large common offset is where one-pass sums lose digits; the shifted sums must not.
    features = (gaussian_features(rng, 1000, 48) + 500.0).astype(np.float32)
    stats = FeatureStatistics(48)
    start = 0
    for size in (1, 7, 300, 2, 690):
        stats.update(features[start : start + size])
        start += size
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, features.astype(np.float64).mean(axis=0), rtol=1e-12)
    expected = np.cov(features.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(stats.covariance, expected, rtol=1e-9, atol=1e-12)


def test_statistics_round_trip_through_npz(tmp_path):
    rng = np.random.default_rng(6)
    stats = FeatureStatistics(5)
    stats.update(rng.normal(size=(10, 5)))
    stats.save(tmp_path / "s.npz", split="val2014")
    mu, sigma, count, metadata = load_statistics(tmp_path / "s.npz")
    np.testing.assert_array_equal(mu, stats.mean)
    np.testing.assert_array_equal(sigma, stats.covariance)
    assert count == 10 and metadata == {"split": "val2014"}


# ---------------------------------------------------------------- KID


def test_kid_agrees_with_clean_fid_kernel_distance():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(7)
    reference, generated = gaussian_features(rng, 150, 32), gaussian_features(rng, 120, 32, shift=0.1)
    np.random.seed(11)  # clean-fid draws from numpy's global legacy generator
    theirs = kernel_distance(reference, generated, num_subsets=20, max_subset_size=50)
    ours = kernel_inception_distance(reference, generated, num_subsets=20, max_subset_size=50, seed=11)
    assert relative_difference(ours, theirs) < 1e-9


def test_kid_uses_clean_fid_defaults_and_reads_memmaps(tmp_path):
    import inspect

    from cleanfid.fid import kernel_distance

    ours = inspect.signature(kernel_inception_distance).parameters
    theirs = inspect.signature(kernel_distance).parameters
    for name in ("num_subsets", "max_subset_size"):
        assert ours[name].default == theirs[name].default
    rng = np.random.default_rng(8)
    features = gaussian_features(rng, 40, 16).astype(np.float32)
    np.save(tmp_path / "f.npy", features)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert kernel_inception_distance(mapped, features, num_subsets=5) == kernel_inception_distance(
        features, features, num_subsets=5
    )


def test_kid_needs_two_samples():
    with pytest.raises(ValueError):
        kernel_inception_distance(np.zeros((1, 4)), np.zeros((5, 4)))


def test_fid_labels_name_the_sample_count():
    assert fid_label(30_000) == "FID-30k"
    assert fid_label(5_000) == "FID-5k"
    assert fid_label(1234) == "FID-1234"
    assert fid_label(4) == "FID-4"


# ---------------------------------------------------------------- clean-mode features


def random_images(rng, sizes):
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_clean_resize_is_clean_fids_resize():
    from cleanfid.resize import build_resizer

    theirs = build_resizer("clean")
    for image in random_images(np.random.default_rng(9), [(37, 53), (299, 299), (512, 384), (8, 8)]):
        np.testing.assert_array_equal(clean_resize(image), theirs(image))


@pytest.fixture(scope="module")
def torchscript_inception(tmp_path_factory):
    return write_random_torchscript_inception(tmp_path_factory.mktemp("inception") / TORCHSCRIPT_FILE, seed=0)


def test_clean_mode_features_equal_clean_fids_pipeline(torchscript_inception, tmp_path):
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    from diffdistill.eval.protocol import extract_features

    folder = tmp_path / "images"
    folder.mkdir()
    images = random_images(np.random.default_rng(10), [(40, 57), (50, 31)])  # odd margins exercise the crop's rounding
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i}.png")
        Image.fromarray(image).save(paths[-1])

    def gigagan_transform(array):  # GigaGAN's evaluation: torchvision centre crop, PIL LANCZOS to 256
        from torchvision.transforms.functional import center_crop

        image = Image.fromarray(array)
        return np.array(center_crop(image, min(image.size)).resize((256, 256), Image.LANCZOS))

    clean_fid_model = InceptionV3W(str(torchscript_inception.parent), download=False, resize_inside=False)
    theirs = get_folder_features(
        str(folder), clean_fid_model, num_workers=0, batch_size=2, device=torch.device("cpu"),
        mode="clean", verbose=False, custom_image_tranform=gigagan_transform,
    )
    extractor = InceptionFeatureExtractor.load(torchscript_inception)
    assert extractor.kind == "torchscript"
    ours_path = tmp_path / "features.npy"
    stats = extract_features(paths, extractor, batch_size=2, features_path=ours_path)
    ours = np.load(ours_path)

    assert ours.shape == theirs.shape == (2, 2048)
    assert np.abs(theirs).max() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())
    np.testing.assert_allclose(stats.mean, theirs.astype(np.float64).mean(axis=0), rtol=1e-5, atol=1e-7)


def test_torch_fidelity_weights_give_torchmetrics_features(tmp_path):
    pytest.importorskip("torch_fidelity")
    from torchmetrics.image.fid import NoTrainInceptionV3

    weights = write_random_torch_fidelity_weights(tmp_path / TORCH_FIDELITY_FILE, seed=1)
    reference = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights),
        antialias=False,
    )
    images = random_images(np.random.default_rng(11), [(299, 299)])
    with torch.no_grad():
        theirs = reference(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()).numpy()
    extractor = InceptionFeatureExtractor.load(weights)
    assert extractor.kind == "torch-fidelity"
    # At 299 px the clean resize is the identity, as torchmetrics' resize is: the networks meet on equal inputs.
    ours = extractor(torch.stack([torch.from_numpy(clean_resize(im).transpose(2, 0, 1).copy()) for im in images]))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * np.abs(theirs).max())


def test_torch_fidelity_weights_are_never_unpickled_as_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"Conv2d_1a_3x3.conv.weight": Payload()}, tmp_path / TORCH_FIDELITY_FILE)
    with pytest.raises(Exception):
        InceptionFeatureExtractor.load(tmp_path / TORCH_FIDELITY_FILE)
    assert not marker.exists()


def test_missing_inception_names_the_files_where_published_and_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFDISTILL_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(MissingWeightsError) as error:
        resolve_inception_path()
    message = str(error.value)
    for text in (TORCHSCRIPT_FILE, TORCHSCRIPT_URL, TORCH_FIDELITY_FILE, TORCH_FIDELITY_URL,
                 "--inception", "DIFFDISTILL_INCEPTION", str(tmp_path)):
        assert text in message
    with pytest.raises(MissingWeightsError):
        resolve_inception_path(tmp_path / "nowhere.pt")


def test_inception_path_from_env_folder(tmp_path, monkeypatch, torchscript_inception):
    monkeypatch.setenv("DIFFDISTILL_INCEPTION", str(torchscript_inception.parent))
    assert resolve_inception_path() == torchscript_inception
