import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory):
    from diffdistill.backbones.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "unet", "unet")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_unet_dir):
    from diffdistill.backbones.tiny import write_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-all")
    return {"unet": tiny_unet_dir, "dit": write_tiny_pipeline(root / "dit", "dit"), "sd3": write_tiny_pipeline(root / "sd3", "sd3")}


@pytest.fixture
def one_thread():
    """Small MLPs run fastest (and reproducibly) on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
