"""Fixtures shared by the decode tests."""

import pytest

from specalign.world.build import WorldConfig, build_world


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """Three test clips (no train split)."""
    out = tmp_path_factory.mktemp("world")
    build_world(WorldConfig(out=str(out), train=0, test=3, clips_per_sequence=2, mp4=False), progress=False)
    return out
