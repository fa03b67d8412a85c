import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


@pytest.fixture
def cache_dir(tmp_path):
    """A private cache per test so tests never share or pollute ~/.cache/vad."""
    d = tmp_path / "cache"
    d.mkdir()
    return str(d)


def real_ped2_root():
    """The data root holding UCSDped2 when VAD_DATA_ROOT points at it, else None."""
    root = os.environ.get("VAD_DATA_ROOT")
    if root and os.path.isdir(os.path.join(root, "UCSDped2")):
        return root
    return None


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for the whole session: the synthetic dataset and its decoded frames/flows are built once
    and reused by every end-to-end test."""
    return str(tmp_path_factory.mktemp("vad_cache"))
