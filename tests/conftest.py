"""Shared fixtures: tiny generated data sets in their real on-disk formats.

Nothing here reads ../shared or the network: every test makes the few images it needs.
`tests/__init__.py` makes pytest put the repository root on sys.path, so `import training` (and
`tests.helpers`) work without installing the project.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TreeFactory, make_image_tree


@pytest.fixture(scope="session")
def tree_factory() -> TreeFactory:
    """`make_image_tree(root, classes=..., n_train=..., n_test=..., formats=..., seed=...)`."""
    return make_image_tree


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only image-folder tree: 3 colour classes, 8 train + 2 test images each, in PNG,
    JPEG, BMP and WebP. It is the single folder inside its parent (an unpacked archive's layout).
    Tests must not modify it; make your own with `tree_factory` for that."""
    return make_image_tree(tmp_path_factory.mktemp("images") / "cifar10")


@pytest.fixture
def restore_numpy_rng() -> Iterator[None]:
    """Put NumPy's global RNG back as it was, whatever the test did to it."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)
