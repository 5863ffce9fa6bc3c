import pytest
import torch

from ._tiny import TINY, make_npz


@pytest.fixture(autouse=True)
def _one_thread():
    # The pipeline's tiny models gain nothing from threads, and OpenMP barriers stall on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished in-process `lotus run` on 64 synthetic 16x16 images: (run dir, data file)."""
    from lotus.cli import main

    root = tmp_path_factory.mktemp("tiny")
    data = make_npz(root / "tiny.npz")
    out = root / "run"
    main(["run", "--data", str(data), "--out", str(out), *TINY])
    return out, data
