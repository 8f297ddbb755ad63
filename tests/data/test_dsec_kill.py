"""`data build-dsec` killed at random points (the parent alone, or with its workers) resumes to the same files."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from dsec_synth import synth_sequence
from processes import alive, kill_after

from specalign.data import open_dataset
from specalign.data.dsec import DsecBuildConfig, build_dsec, write_raw_sequence
from specalign.fsutil import TEMP_NAME

BUILD = "import sys; from specalign.data.dsec import DsecBuildConfig, build_dsec; " \
        "build_dsec(DsecBuildConfig(sys.argv[1], sys.argv[2], workers=2), progress=False)"  # fmt: skip


def files(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def raw_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsec")
    for k, name in enumerate(["interlaken_00_c", "thun_00_a", "zurich_city_01_a", "zurich_city_02_b"]):
        write_raw_sequence(root / "raw" / name, **synth_sequence(seconds=2, n_events=8_000, seed=k))
    build_dsec(DsecBuildConfig(root / "raw", root / "ref" / "split", workers=1), progress=False)
    return root / "raw", files(root / "ref" / "split")


@pytest.mark.parametrize("group", [False, True], ids=["parent", "parent+workers"])
def test_killed_builds_resume_to_the_same_files(raw_and_reference, tmp_path, group):
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc")
    raw, reference = raw_and_reference
    out = tmp_path / "split"
    rng = np.random.default_rng(41 + group)
    for k, n_files in enumerate(sorted(rng.uniform(0.05, 0.9, 2) * len(reference))):
        proc = subprocess.Popen([sys.executable, "-c", BUILD, str(raw), str(out)], start_new_session=True)
        workers = kill_after(proc, out, int(n_files), group)
        if k == 0:  # every sequence is left to build: it is killed while its pool works
            assert len(workers) >= 2
        deadline = time.time() + 5
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(w) for w in workers), "a killed build's workers go with it"
    summary = build_dsec(DsecBuildConfig(raw, out, workers=2), progress=False)
    assert summary["clips"] == 12
    got = files(out)
    assert got.keys() == reference.keys(), "nothing lost, nothing extra"
    assert got == reference
    assert not [p for p in out.rglob(".*") if TEMP_NAME.fullmatch(p.name)], "no temp file left"
    ids = [s.id for s in open_dataset(out)]
    assert len(ids) == len(set(ids)) == 12
    assert json.loads((out / "run_settings.json").read_text())["sequences"].keys() == {
        "interlaken_00_c", "thun_00_a", "zurich_city_01_a", "zurich_city_02_b"}  # fmt: skip
