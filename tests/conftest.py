"""Shared fixtures: where the golden tensors from the reference implementation live."""

import os
from pathlib import Path

import pytest

# The golden tensors sit beside the repository, in the shared workspace, not inside it.
GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """../shared/golden, or a skip when the shared oracle is not there (a clone elsewhere).

    CI always has it, so there a missing oracle fails instead of letting the reference check go quiet.
    """
    if not GOLDEN_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{GOLDEN_DIR} not found: CI must run with ../shared/golden beside the repository")
        pytest.skip("../shared/golden not found; golden tests need the shared oracle")
    return GOLDEN_DIR
