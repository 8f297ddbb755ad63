"""Fixtures shared by the backend tests: a tiny minidsec world, for real Data API samples."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the tiny_* checkpoint writers sit beside the tests

from tiny_video_llava import build_test_world  # noqa: E402

from specalign.data import open_dataset  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_test_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def dataset(world):
    return open_dataset(world / "my_egpt_dsec_train_500ms")
