"""Latents encoded once (`diffdistill encode-latents`) and read back as a data source."""

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
    with pytest.raises(FileExistsError):
        main(["encode-latents", str(RECIPE), "--to", str(tmp_path / "latents")])
    with pytest.raises(FileNotFoundError, match="encode-latents"):
        build_trainer(load_recipe(RECIPE, ["data.source=latents", f"data.path={tmp_path}", f"out={tmp_path / 'run'}"]))
    index = tmp_path / "latents" / "index.json"
    index.write_text(index.read_text().replace('"latent_shape": [', '"latent_shape": [16, '))  # as from a VAE with other latents
    with pytest.raises(Exception, match="encode them with this teacher"):
        build_trainer(load_recipe(RECIPE, ["data.source=latents", f"data.path={tmp_path / 'latents'}", f"out={tmp_path / 'r'}"]))
