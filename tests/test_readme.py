"""The README and docs say only what runs: every `specalign` command in them parses, every relative link
resolves, the README stays short, and the Python example runs to a token-identical answer."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from specalign.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(text: str) -> list[str]:
    """`specalign ...` command lines inside fenced blocks (a `$ ` prompt optional; `\\` continues a line)."""
    out, in_block, pending = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        line = line.removeprefix("$ ")
        if line.startswith("specalign "):
            out.append(line.split("  #")[0].split(" # ")[0])
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_parses(page):
    found = commands(page.read_text())
    for line in found:
        argv = shlex.split(line)[1:]
        if "--help" in argv or "--version" in argv or any(a in ("...", "…") for a in argv):
            continue
        try:
            build_parser(argv).parse_args(argv)
        except SystemExit:
            pytest.fail(f"{page.name}: this command does not parse: {line}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


@pytest.mark.slow
def test_python_example_runs(tmp_path):
    from specalign.world.build import WorldConfig, build_world

    build_world(WorldConfig(out=str(tmp_path), train=0, test=2, clips_per_sequence=2, mp4=False, workers=1),
                progress=False)  # fmt: skip
    split = next(tmp_path.glob("my_egpt_dsec_seq_*"))
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "speculate.py"), str(split), "--sample", "1"],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "token-identical to the target alone: yes" in run.stdout
    assert re.search(r"alpha \d\.\d{3} .* tau \d\.\d{2}", run.stdout)
