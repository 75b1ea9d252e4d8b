"""Image-caption pairs from a local Hugging Face ``datasets`` folder, read offline.

``data.path`` names one of:

* a folder written by ``Dataset.save_to_disk`` (``state.json`` beside its ``.arrow`` files), or by
  ``DatasetDict.save_to_disk`` (``dataset_dict.json``; ``data.split`` picks the split);
* a folder of data files, e.g. a downloaded dataset repository's ``data/train-00000-of-00004.parquet``:
  read with ``load_dataset(folder, split=data.split)``, which takes the format from the suffixes
  (parquet, arrow, ...) and the split from the file names (all files are ``train`` when none is named).

``data.image_column`` holds the images (an ``Image`` feature, or image bytes/paths that cast to one),
``data.caption_column`` the captions. Rows keep the dataset's order; the data source shuffles per
epoch from there, so the order is still a function of (seed, step). Captions are read once; images
are decoded when asked for.
"""

from __future__ import annotations

from pathlib import Path

from diffdistill.config import ConfigError


def _datasets():
    try:
        import datasets  # optional: only this data source needs it
    except ImportError:
        raise ConfigError("data.source=hf_dataset needs the datasets package: pip install datasets") from None
    return datasets


def load_hf_dataset(path: str | None, split: str):
    """The dataset (one split) at ``path``: a save_to_disk folder, or a folder of data files."""
    datasets = _datasets()
    root = Path(path or "")
    if not path or not root.is_dir():
        raise FileNotFoundError(f"data.source=hf_dataset needs data.path: a folder written by Dataset.save_to_disk, or a folder of "
                                f".parquet/.arrow files; {path!r} is not a folder")
    if (root / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(root))
        if split not in splits:
            raise ConfigError(f"data.split={split!r} is not a split of {str(root)!r} (its splits: {', '.join(splits)}); set data.split")
        return splits[split]
    if (root / "state.json").is_file():
        return datasets.load_from_disk(str(root))
    try:
        return datasets.load_dataset(str(root), split=split)
    except (FileNotFoundError, ValueError) as e:  # no data files; no such split
        raise FileNotFoundError(f"data.path={str(root)!r} is no datasets folder (save_to_disk output, or .parquet/.arrow files "
                                f"with split {split!r}): {str(e).splitlines()[0]}") from None


class HFDatasetImages:
    """Every (image, caption) row of the dataset: ``captions`` in order, ``images(a, b)`` on demand."""

    def __init__(self, path: str | None, split: str, image_column: str, caption_column: str):
        datasets = _datasets()
        dataset = load_hf_dataset(path, split)
        for option, column, what in (("data.caption_column", caption_column, "captions"), ("data.image_column", image_column, "images")):
            if column not in dataset.column_names:
                raise ConfigError(f"{option}={column!r} is not a column of the dataset at {path!r} (its columns: "
                                  f"{', '.join(dataset.column_names)}); set {option} to the column that holds the {what}")
        if not isinstance(dataset.features[image_column], datasets.Image):
            try:  # bytes or paths stored without the Image feature (parquet written by other tools)
                dataset = dataset.cast_column(image_column, datasets.Image())
            except (TypeError, ValueError) as e:
                raise ConfigError(f"data.image_column={image_column!r} holds {dataset.features[image_column]}, not images "
                                  f"({str(e).splitlines()[0]}); set data.image_column to the column that holds the images") from None
        if len(dataset) == 0:
            raise ValueError(f"data.path={path!r}: the dataset (split {split!r}) has no rows")
        self.captions = [str(caption) for caption in dataset[caption_column]]
        self.dataset, self.image_column = dataset.select_columns([image_column]), image_column

    def __len__(self) -> int:
        return len(self.captions)

    def images(self, a: int, b: int) -> list:
        """The PIL images of rows a .. b-1 (clipped to the dataset)."""
        return list(self.dataset[a : min(b, len(self))][self.image_column])


__all__ = ["HFDatasetImages", "load_hf_dataset"]
