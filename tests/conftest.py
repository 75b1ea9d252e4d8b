import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The Makefile runs the suite on 2 xdist workers a file at a time, in collection order (--dist loadfile
# --no-loadscope-reorder). These files hold few tests that run for minutes (2-process runs, the quickstart's
# recipe): started first, they overlap the many short files instead of starting last beside an idle worker.
SLOW_FILES_FIRST = ("test_multiprocess.py", "test_zoo.py", "test_reliability.py", "test_trainer.py", "test_export.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other files keep their order


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
