"""Frechet Inception Distance and Kernel Inception Distance, exact and streaming.

- FID (Heusel et al., 2017, "GANs trained by a two time-scale update rule"): the
  Frechet distance between Gaussians fitted to Inception pool features,
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``.
- KID (Binkowski et al., 2018, "Demystifying MMD GANs"): the unbiased squared MMD
  with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``, averaged over
  random subsets, with clean-fid's defaults (100 subsets of at most 1000).
- Preprocessing: clean-fid's "clean" mode (Parmar et al., 2022, "On aliased
  resizing and surprising subtleties in GAN evaluation"): each uint8 channel is
  resized to 299x299 by PIL bicubic in float mode ('F'), without re-quantising,
  then the network sees ``(x - 128) / 128``.

Statistics are accumulated in float64 batch by batch, so no feature matrix has to
fit in memory. The Frechet distance uses symmetric eigendecompositions in float64
instead of ``scipy.linalg.sqrtm`` of a non-symmetric product: it stays real and
finite when there are fewer samples than feature dimensions, and at 2048 dimensions
on two CPU cores takes about 3 s where clean-fid's ``sqrtm`` path takes about 14 s.
"""

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg

from diffdistill.eval import MissingWeightsError
from diffdistill.eval.inception import load_torch_fidelity_inception

CLEAN_RESIZE = 299

TORCHSCRIPT_FILE = "inception-2015-12-05.pt"
TORCHSCRIPT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_ENV = "DIFFDISTILL_INCEPTION"


# ---------------------------------------------------------------- statistics


class FeatureStatistics:
    """Running mean and unbiased covariance of feature vectors, in float64.

    Sums are taken about a fixed shift (the first batch's mean) rather than about
    zero, so ``sum(x x^T) - n mu mu^T`` does not cancel catastrophically when the
    mean is large next to the spread. The covariance matches
    ``np.cov(features, rowvar=False)`` (ddof=1), which clean-fid uses.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self._shift = np.zeros(dim)
        self._sum = np.zeros(dim)
        self._outer = np.zeros((dim, dim))

    def update(self, features) -> None:
        x = np.asarray(features, dtype=np.float64).reshape(-1, self.dim)
        if len(x) == 0:
            return
        if self.count == 0:
            self._shift = x.mean(axis=0)
        centred = x - self._shift
        self.count += len(x)
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred

    @property
    def mean(self) -> np.ndarray:
        return self._shift + self._sum / self.count

    @property
    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.count}")
        offset = self._sum / self.count
        cov = (self._outer - self.count * np.outer(offset, offset)) / (self.count - 1)
        return (cov + cov.T) / 2

    def save(self, path: str | Path, **metadata) -> None:
        """Write ``mu``, ``sigma`` and ``count`` (the names clean-fid's .npz files use, plus the count)."""
        save_statistics(path, self.mean, self.covariance, self.count, **metadata)


def save_statistics(path: str | Path, mu, sigma, count: int, **metadata) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial.npz")  # atomic: an interrupted write leaves no cache
    np.savez(partial, mu=mu, sigma=sigma, count=count, metadata=json.dumps(metadata, sort_keys=True))
    os.replace(partial, path)


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray, int, dict]:
    with np.load(path, allow_pickle=False) as data:
        metadata = json.loads(str(data["metadata"])) if "metadata" in data else {}
        count = int(data["count"]) if "count" in data else -1
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64), count, metadata


# ---------------------------------------------------------------- distances


def _significant(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise set to 0.

    Below ``max * dim * eps`` (numpy's ``matrix_rank`` tolerance) an eigenvalue cannot
    be told from zero, and its square root would turn noise of 1e-16 into 1e-8 per
    dimension: with fewer samples than dimensions hundreds of them are exactly zero.
    """
    tolerance = max(float(eigenvalues.max()), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix."""
    # LAPACK's MRRR driver: several times faster at 2048 dimensions than numpy's divide and conquer.
    eigenvalues, eigenvectors = linalg.eigh(matrix, driver="evr")
    return (eigenvectors * np.sqrt(_significant(eigenvalues))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((S1 S2)^{1/2})`` through the symmetric ``S1^{1/2} S2 S1^{1/2}``.

    Both products have the same eigenvalues (AB and BA share their non-zero
    spectrum), but the symmetric one can be solved by ``eigvalsh``: real
    eigenvalues, no complex round-off, and a singular S1 or S2 (fewer samples
    than dimensions) costs nothing.
    """
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = linalg.eigh((middle + middle.T) / 2, eigvals_only=True, driver="evr")
    return float(np.sqrt(_significant(eigenvalues)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al., 2017), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    # A true distance is >= 0; rounding can leave an exact match at -1e-12.
    return max(float(distance), 0.0)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel ``(x.y / d + 1)^3``: degree 3, gamma 1/d, coef0 1 (Binkowski et al., 2018)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 between equal-size samples: kernel means over distinct pairs within, minus twice across."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    features1, features2, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> float:
    """KID: the mean of ``unbiased_mmd2`` over random subsets (clean-fid's ``kernel_distance`` defaults).

    Subsets are drawn without replacement from numpy's legacy generator seeded by
    ``seed``, a subset of ``features2`` first and then one of ``features1``: the
    order clean-fid draws in, so ``np.random.seed(seed)`` before clean-fid's
    ``kernel_distance(features1, features2)`` gives the same subsets. Features
    may be ``np.memmap`` arrays: only the drawn rows are read.
    """
    n1, n2 = len(features1), len(features2)
    m = min(n1, n2, max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {n1} and {n2}")
    rng = np.random.RandomState(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = np.asarray(features2[rng.choice(n2, m, replace=False)], dtype=np.float64)
        y = np.asarray(features1[rng.choice(n1, m, replace=False)], dtype=np.float64)
        total += unbiased_mmd2(x, y)
    return total / num_subsets


def fid_label(count: int) -> str:
    """``FID-30k`` for 30,000 samples, ``FID-5k`` for 5,000, otherwise the exact count: ``FID-1234``."""
    return f"FID-{count // 1000}k" if count >= 1000 and count % 1000 == 0 else f"FID-{count}"


# ---------------------------------------------------------------- clean-fid preprocessing


def clean_resize(image: np.ndarray) -> np.ndarray:
    """clean-fid's "clean" resize of a uint8 HxWx3 image: PIL bicubic to 299x299 per channel in
    float ('F') mode, clipped to [0, 255] and left unquantised (float32, HxWxC)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    channels = []
    for c in range(3):
        plane = Image.fromarray(image[:, :, c].astype(np.float32))  # float32 2-D -> mode 'F'
        plane = plane.resize((CLEAN_RESIZE, CLEAN_RESIZE), resample=Image.BICUBIC)
        channels.append(np.asarray(plane).clip(0, 255))
    return np.stack(channels, axis=2).astype(np.float32)


# ---------------------------------------------------------------- feature extractors


def default_weights_dir() -> Path:
    """Where weight files are looked for when no path is given: ``$XDG_CACHE_HOME/diffdistill/weights``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "diffdistill" / "weights"


def missing_inception_message(tried: list[str]) -> str:
    where = default_weights_dir() / TORCHSCRIPT_FILE
    return "\n".join(
        [
            "No Inception weights found; FID and KID need one of these files (nothing is downloaded):",
            f"  {TORCHSCRIPT_FILE}  (clean-fid's TorchScript TF-Inception: the protocol's extractor)",
            f"      published at {TORCHSCRIPT_URL}",
            f"  {TORCH_FIDELITY_FILE}  (torch-fidelity / torchmetrics port of the same network)",
            f"      published at {TORCH_FIDELITY_URL}",
            f"Put it at {where}, or pass --inception PATH, or set {INCEPTION_ENV}=PATH",
            "(PATH may be the file or a folder holding it).",
            "Looked in: " + ("; ".join(tried) if tried else "nowhere"),
        ]
    )


def _weights_in(path: Path) -> Path | None:
    if path.is_file():
        return path
    if path.is_dir():
        for name in (TORCHSCRIPT_FILE, TORCH_FIDELITY_FILE):
            if (path / name).is_file():
                return path / name
    return None


def resolve_inception_path(explicit: str | Path | None = None) -> Path:
    """The Inception weight file: ``explicit``, else ``$DIFFDISTILL_INCEPTION``, else the default folder."""
    if explicit:
        found = _weights_in(Path(explicit).expanduser())
        if found is None:
            raise MissingWeightsError(missing_inception_message([f"--inception {explicit} (not found)"]))
        return found
    env = os.environ.get(INCEPTION_ENV)
    if env:
        found = _weights_in(Path(env).expanduser())
        if found is None:
            raise MissingWeightsError(missing_inception_message([f"{INCEPTION_ENV}={env} (not found)"]))
        return found
    found = _weights_in(default_weights_dir())
    if found is None:
        raise MissingWeightsError(missing_inception_message([str(default_weights_dir())]))
    return found


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_torchscript_archive(path: str | Path) -> bool:
    """TorchScript archives carry their code (``*/code/...``); a plain ``torch.save`` zip does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


class InceptionFeatureExtractor:
    """Inception pool features of clean-resized images.

    Call it on a float tensor ``(N, 3, 299, 299)`` with values in [0, 255] (the
    output of :func:`clean_resize`); it returns float32 features ``(N, 2048)``.
    Two weight formats load, both from a local file:

    - ``torchscript``: clean-fid's ``inception-2015-12-05.pt``. Like clean-fid's
      ``InceptionV3W`` in clean mode, it calls the file's ``layers`` on ``(x - 128) / 128``.
    - ``torch-fidelity``: ``weights-inception-2015-12-05-6726825d.pth``, loaded into
      :class:`~diffdistill.eval.inception.TFInceptionV3` with ``weights_only=True``.
    """

    def __init__(self, network, kind: str, path: Path, device="cpu"):
        self.network, self.kind, self.path, self.device = network, kind, Path(path), device
        self.sha256 = file_sha256(path)
        self.dim = 2048

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "InceptionFeatureExtractor":
        path = Path(path)
        if is_torchscript_archive(path):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.load is deprecated; the published file is TorchScript
                module = torch.jit.load(str(path), map_location=device).eval()
            if not hasattr(module, "layers"):
                raise ValueError(f"{path} is TorchScript but not clean-fid's Inception (it has no 'layers')")
            return cls(module.layers, "torchscript", path, device)
        return cls(load_torch_fidelity_inception(path).to(device), "torch-fidelity", path, device)

    def __call__(self, images) -> np.ndarray:
        with torch.inference_mode():
            x = images.to(self.device, torch.float32)
            features = self.network((x - 128) / 128).reshape(len(x), -1)
        return features.float().cpu().numpy()

    @property
    def key(self) -> str:
        """Names the weights in cache keys: the kind and the file's hash."""
        return f"{self.kind}-{self.sha256[:12]}"

    def describe(self) -> dict:
        names = {
            "torchscript": "clean-fid TorchScript TF-Inception (the protocol's extractor)",
            "torch-fidelity": "torch-fidelity TF-Inception port (same network; not the file the papers used)",
        }
        return {"kind": self.kind, "name": names[self.kind], "file": str(self.path), "sha256": self.sha256}
