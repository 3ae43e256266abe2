"""Shared test helpers: seeded synthetic images, and the optional ../shared reference data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """Return ``make(path, size=(W, H), seed=0)``: write a seeded random RGB image, creating parent folders."""
    from PIL import Image

    def make(path: Path, size: tuple[int, int] = (12, 10), seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        return path

    return make


@pytest.fixture
def shared_dir() -> Path:
    """The read-only ../shared folder of reference data; the test is skipped where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"reference data {SHARED} is absent (only on developer machines and CI)")
    return SHARED
