"""Fixtures of the data tests."""

import pytest
from dsec_synth import synth_sequence

from specalign.data.dsec import write_raw_sequence


@pytest.fixture
def make_raw(tmp_path):
    """make_raw(name="seqA", parent="raw", **synth_kwargs) -> (seq_dir, the synthetic inputs)."""

    def make(name: str = "seqA", parent: str = "raw", **kw):
        spec = synth_sequence(**kw)
        seq_dir = write_raw_sequence(tmp_path / parent / name, **spec)
        return seq_dir, spec

    return make
