"""Test configuration: Triton runs on the CPU through its interpreter.

TRITON_INTERPRET must be set before any kernel module is imported, hence here, at the
top of conftest, before the package is imported by any test.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def gen():
    """A fresh, unseeded-per-run but reported generator: failures print the seed."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    print(f"[seed {seed}]")
    return g
