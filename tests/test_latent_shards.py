"""Latents encoded once (`diffdistill encode-latents`) and read back as a data source."""

import sys
from pathlib import Path

import pytest
import torch

from diffdistill.cli import main
from diffdistill.config import load_recipe
from diffdistill.data.sources import build_data_source, encode_images, image_source
from diffdistill.run import build_trainer

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "zoo" / "digits_dmd2_gan.yaml"


def test_encoded_shards_are_the_vae_in_memory_and_train_as_the_images_do(tmp_path, capsys):
    assert main(["encode-latents", str(RECIPE), "--to", str(tmp_path / "latents"), "--shard-size", "500"]) == 0
    cfg = load_recipe(RECIPE, [f"out={tmp_path / 'a'}"])
    images = build_data_source(cfg, trainer_teacher := build_trainer(cfg).teacher)
    shards = build_data_source(load_recipe(RECIPE, ["data.source=latents", f"data.path={tmp_path / 'latents'}"]), trainer_teacher)
    prompts, load = image_source(cfg, trainer_teacher)
    assert len(shards.latents.index["shards"]) == -(-len(prompts) // 500) and shards.prompts == images.prompts == prompts
    assert torch.equal(shards.latents[torch.arange(len(prompts))], encode_images(trainer_teacher, load(0, len(prompts))))
    for start in (0, 37, 2 * len(prompts) - 3):  # any step's batch, epochs and shard boundaries included
        a, b = images.items(start, 8), shards.items(start, 8)
        assert a["prompts"] == b["prompts"] and torch.equal(a["x0"], b["x0"])


def test_latents_from_another_teacher_or_no_index_are_refused(tmp_path):
    main(["encode-latents", str(RECIPE), "--to", str(tmp_path / "latents")])
    assert main(["encode-latents", str(RECIPE), "--to", str(tmp_path / "latents")]) == 2  # one error line: never overwrites
    with pytest.raises(FileNotFoundError, match="encode-latents"):
        build_trainer(load_recipe(RECIPE, ["data.source=latents", f"data.path={tmp_path}", f"out={tmp_path / 'run'}"]))
    index = tmp_path / "latents" / "index.json"
    index.write_text(index.read_text().replace('"latent_shape": [', '"latent_shape": [16, '))  # as from a VAE with other latents
    with pytest.raises(Exception, match="encode them with this teacher"):
        build_trainer(load_recipe(RECIPE, ["data.source=latents", f"data.path={tmp_path / 'latents'}", f"out={tmp_path / 'r'}"]))


def write_images(root: Path, count: int = 12) -> list[tuple[str, bytes, str]]:
    """An imagefolder and the same samples as two WebDataset tar shards."""
    import io
    import json
    import tarfile

    from PIL import Image

    g, samples = torch.Generator().manual_seed(0), []
    (root / "folder").mkdir(parents=True)
    for i in range(count):
        pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        samples.append((f"{i:06d}", buffer.getvalue(), f"picture number {i}"))
        (root / "folder" / f"{i:06d}.png").write_bytes(buffer.getvalue())
    (root / "folder" / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{k}.png", "text": c}) + "\n" for k, _, c in samples))
    (root / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(root / "shards" / f"{shard:05d}.tar", "w") as tar:
            for key, png, caption in samples[shard * count // 2 : (shard + 1) * count // 2]:
                for name, data in ((f"{key}.png", png), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return samples


def write_hf_datasets(root: Path, samples: list[tuple[str, bytes, str]]) -> None:
    """The same samples as Hugging Face datasets: save_to_disk of a Dataset and of a DatasetDict (a 'test' split
    beside), and parquet files written by plain pyarrow (no datasets metadata: the image column is bytes)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"image": [{"bytes": png, "path": None} for _, png, _ in samples], "text": [caption for _, _, caption in samples]}
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    dataset.save_to_disk(str(root / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select([3, 1])}).save_to_disk(str(root / "splits"))
    (root / "parquet" / "data").mkdir(parents=True)
    half = len(samples) // 2
    for name, part in (("train-00000-of-00002", samples[:half]), ("train-00001-of-00002", samples[half:]),
                       ("test-00000-of-00001", samples[:2])):
        table = pa.table({"image": [{"bytes": png, "path": None} for _, png, _ in part], "text": [caption for _, _, caption in part]})
        pq.write_table(table, root / "parquet" / "data" / f"{name}.parquet")
    dataset.rename_column("text", "caption").save_to_disk(str(root / "no-text"))


def test_webdataset_shards_and_hf_datasets_give_the_imagefolders_items(tmp_path, monkeypatch):
    import datasets

    from diffdistill.config import ConfigError
    from diffdistill.teachers import resolve_teacher

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # load_dataset's arrow cache, not ~/.cache
    write_hf_datasets(tmp_path, write_images(tmp_path))
    teacher, tiny = resolve_teacher("tiny:unet"), load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "sft.yaml")
    sources = {}
    for source, path in (("imagefolder", "folder"), ("webdataset", "shards/*.tar"), ("hf_dataset", "saved"), ("hf_dataset", "splits"),
                         ("hf_dataset", "parquet")):
        tiny.data.source, tiny.data.path = source, str(tmp_path / path)
        sources[path] = build_data_source(tiny, teacher)
    for path, other in sources.items():
        assert len(other) == 12, path  # the 'test' split is not read
        for start in (0, 5, 17):
            a, b = sources["folder"].items(start, 4), other.items(start, 4)
            assert a["prompts"] == b["prompts"] and torch.equal(a["x0"], b["x0"]), (path, start)
    tiny.data.source, tiny.data.path = "webdataset", str(tmp_path / "nothing" / "*.tar")
    with pytest.raises(FileNotFoundError, match="matches no .tar shard"):
        build_data_source(tiny, teacher)
    tiny.data.source, tiny.data.path = "hf_dataset", str(tmp_path / "no-text")
    no_caption = r"data.caption_column='text' is not a column .*\(its columns: image, caption\); set data.caption_column to"
    with pytest.raises(ConfigError, match=no_caption):
        build_data_source(tiny, teacher)
    tiny.data.path, tiny.data.split = str(tmp_path / "splits"), "validation"
    with pytest.raises(ConfigError, match="data.split='validation' is not a split .* train, test"):
        build_data_source(tiny, teacher)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ConfigError, match="pip install datasets"):
        build_data_source(tiny, teacher)
