"""Test setup: Triton runs in interpreter mode on CPU tensors; `gpu` tests skip without CUDA."""
import os

# Must be set before triton is imported anywhere (docs/gpu.md, "Testing without a GPU").
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")
    # triton 3.6's interpreter converts 1-element arrays with a call numpy deprecates
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:triton.runtime.interpreter")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture
def read_only_dir(tmp_path):
    """tmp_path / "ro" holding an empty directory "empty", read-only (mode 555) during the test and
    writable again after it; the test is skipped for a user that permissions do not restrict (root)."""
    ro = tmp_path / "ro"
    (ro / "empty").mkdir(parents=True)
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that permissions do not restrict (root)")
        yield ro
    finally:
        ro.chmod(0o755)
