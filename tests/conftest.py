"""Shared fixtures: where the golden tensors from the reference implementation live."""

from pathlib import Path

import pytest

# The golden tensors sit beside the repository, in the shared workspace, not inside it.
GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """../shared/golden, or a skip when the shared oracle is not there."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip("../shared/golden not found; golden tests need the shared oracle")
    return GOLDEN_DIR
