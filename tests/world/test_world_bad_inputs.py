"""`world build` bad inputs: each refused on one line naming the flag or file; nothing already written is lost."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specalign.cli import build_parser, main
from specalign.errors import SpecalignError
from specalign.runs import exclusive
from specalign.world.build import WorldConfig

TINY = ["--duration", "500ms", "--sensor-size", "32x24", "--clips-per-sequence", "2", "--workers", "1", "--no-mp4",
        "--quiet"]  # fmt: skip
SPLIT = "my_egpt_dsec_train_500ms"


def cli_error(capsys, *args) -> str:
    """Run `specalign world build ARGS`; it must fail with exit 2 and one line on stderr. Returns the line."""
    assert main(["world", "build", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}  # fmt: skip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "world"
    assert main(["world", "build", "--out", str(out), "--train", "4", "--test", "0", *TINY]) == 0
    return out


@pytest.fixture
def world(built, tmp_path):
    """A private copy of a finished world (train 4 clips in 2 drives, no test clips) and its file digests."""
    out = shutil.copytree(built, tmp_path / "world")
    return out, digests(out)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--clips-per-sequence", "0"], "--clips-per-sequence: must be at least 1, got 0"),  # looped forever
        (["--clips-per-sequence", "-3"], "--clips-per-sequence: must be at least 1, got -3"),
        (["--train", "-5"], "--train: must be at least 0, got -5"),  # built nothing, exit 0
        (["--test", "-1"], "--test: must be at least 0, got -1"),
        (["--train", "0", "--test", "0"], "--train/--test: both are 0, nothing to build"),
        (["--seed", "-1"], "--seed: must be at least 0, got -1"),  # a traceback that left settings behind
        (["--workers", "0"], "--workers: must be at least 1, got 0"),
        (["--duration", "3s"], "--duration: unknown duration '3s'"),
        (["--sensor-size", "15x16"], "--sensor-size 15x16: need even sizes of 16 to 2048"),
        (["--sensor-size", "8192x8192"], "--sensor-size 8192x8192: need even sizes of 16 to 2048"),
        (["--frame-scale", "0"], "--frame-scale: must be at least 1, got 0"),
        (["--frame-scale", "9"], "--frame-scale: choose 1 to 8, got 9"),
        (["--tokenizer", "no/such/tokenizer.json"], "--tokenizer: no/such/tokenizer.json: file not found"),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(capsys, tmp_path, args, message):
    out = tmp_path / "w"
    base = ["--out", out, "--train", "2", "--test", "1"]
    assert message in cli_error(capsys, *base, *args)
    assert not out.exists(), "nothing written"


def test_zero_or_negative_sizes_are_refused(tmp_path):
    for w, h in ((0, 0), (-32, 24), (32, 0)):
        with pytest.raises(SpecalignError, match=rf"--sensor-size {w}x{h}: need even sizes"):
            WorldConfig(out=str(tmp_path / "w"), width=w, height=h)
    with pytest.raises(SpecalignError, match="--train: expected a whole number, got 2.5"):
        WorldConfig(out=str(tmp_path / "w"), train=2.5)
    assert not (tmp_path / "w").exists()


def test_corrupt_tokenizer_is_refused_before_any_work(capsys, tmp_path):
    tok = tmp_path / "tokenizer.json"
    tok.write_text('{"model": {"type": "BPE", "vocab": {"a": 0}, "merg')  # cut off mid-download
    err = cli_error(capsys, "--out", tmp_path / "w", "--train", "2", "--tokenizer", tok, *TINY)
    assert str(tok) in err and "cannot read a tokenizer" in err
    assert not (tmp_path / "w").exists()


def test_rerun_with_other_settings_is_refused_then_overwrite_starts_over(capsys, world):
    out, before = world
    err = cli_error(capsys, "--out", out, "--train", "4", "--test", "0", "--seed", "1", *TINY)
    assert f"{out / SPLIT}: holds a run with other settings (seed: 0 then, 1 now); pass --overwrite" in err
    assert digests(out) == before
    assert main(["world", "build", "--out", str(out), "--train", "2", "--test", "0", "--seed", "1", "--overwrite",
                 *TINY]) == 0  # fmt: skip
    assert len(json.loads((out / SPLIT / "EventGPT_Instruction_Subset.json").read_text())) == 2
    assert not (out / SPLIT / "video" / "interlaken_00_a").exists(), "the old drives are gone"


def test_split_of_an_older_renderer_is_refused(capsys, world):
    out, _ = world
    settings = out / SPLIT / "run_settings.json"
    old = json.loads(settings.read_text())
    old["render_version"] = 1
    settings.write_text(json.dumps(old))
    before = digests(out)
    err = cli_error(capsys, "--out", out, "--train", "4", "--test", "0", *TINY)
    assert "drawn by an older renderer (version 1" in err and "--overwrite" in err
    assert digests(out) == before


def test_folder_that_is_not_a_world_is_refused(capsys, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = cli_error(capsys, "--out", out, "--train", "2", *TINY)
    assert f"{out}: is not empty and holds no world" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]


def test_second_duration_of_another_sensor_size_is_refused(capsys, world):
    out, before = world
    err = cli_error(capsys, "--out", out, "--train", "2", "--duration", "1s", "--sensor-size", "48x32", "--no-mp4")
    assert "its 500ms build has the sensor size 32x24, not 48x32" in err
    assert digests(out) == before


def test_corrupt_or_foreign_marker_is_named(capsys, world):
    out, before = world
    marker = out / SPLIT / ".build" / "interlaken_00_a.json"
    marker.write_text('{"sequence": "interlaken_00_a", "entr')
    err = cli_error(capsys, "--out", out, "--train", "4", "--test", "0", *TINY)
    assert str(marker) in err and "not valid JSON" in err
    marker.write_text(json.dumps({"sequence": "interlaken_00_a", "entries": [], "texts": []}))
    err = cli_error(capsys, "--out", out, "--train", "4", "--test", "0", *TINY)
    assert str(marker) in err and "lists 0 clips, the drive has 2" in err
    after = digests(out)
    assert {k: v for k, v in after.items() if "interlaken_00_a.json" not in k} == {
        k: v for k, v in before.items() if "interlaken_00_a.json" not in k
    }


def test_two_builds_into_one_folder(capsys, world):
    out, before = world
    with exclusive(out):  # another process builds here (flock: a second open of the lock file conflicts)
        err = cli_error(capsys, "--out", out, "--train", "4", "--test", "0", *TINY)
    assert f"{out}: another specalign process is writing here" in err
    assert digests(out) == before


def test_a_second_process_stops_while_the_first_builds(capsys, tmp_path):
    build_parser()  # its imports are done before the race, so the second build meets the first at work
    out = tmp_path / "w"
    args = ["--out", out, "--train", "4", "--test", "2", *TINY]
    code = "import sys; from specalign.world.build import WorldConfig, build_world; build_world(WorldConfig(" \
           "out=sys.argv[1], duration='500ms', train=4, test=2, width=32, height=24, clips_per_sequence=2, " \
           "mp4=False, workers=1), progress=False)"  # fmt: skip
    first = subprocess.Popen([sys.executable, "-c", code, str(out)])
    deadline = time.time() + 60
    while not (out / SPLIT / "run_settings.json").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first build still runs"
    err = cli_error(capsys, *args)
    assert f"{out}: another specalign process is writing here" in err
    assert first.wait(timeout=120) == 0, "the first build is not disturbed"
    assert len(json.loads((out / SPLIT / "EventGPT_Instruction_Subset.json").read_text())) == 4


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = cli_error(capsys, "--out", blocker / "w", "--train", "2", *TINY)
    assert str(blocker / "w") in err and "cannot create directory" in err
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    err = cli_error(capsys, "--out", locked / "w", "--train", "2", *TINY)
    assert str(locked / "w") in err and "Permission denied" in err


def test_seed_refused_then_accepted(capsys, tmp_path):
    out = tmp_path / "w"
    cli_error(capsys, "--out", out, "--train", "2", "--seed", "-1", *TINY)  # left nothing that refuses --seed 0
    assert main(["world", "build", "--out", str(out), "--train", "2", "--test", "0", "--seed", "0", *TINY]) == 0
