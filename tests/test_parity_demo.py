"""The quickstart demo: inputs written on all cores, and it says what it wrote and how to
remove it (issue 11 item 15)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("PIL")

from edcache import demo  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def test_demo_inputs_are_written_by_several_processes(tmp_path, monkeypatch):
    from parity_datasets import recording_write_photo

    monkeypatch.setattr(demo, "_ORIGINAL_WRITE_PHOTO", demo._write_photo, raising=False)
    monkeypatch.setattr(demo, "_write_photo", recording_write_photo)
    ds = demo.DemoImages(str(tmp_path), n=128, progress=False, workers=2)
    writers = [name for name in os.listdir(tmp_path) if name.startswith("pid-")]
    assert len(writers) == 2 and f"pid-{os.getpid()}" not in writers
    written = sorted(int(i) for w in writers for i in open(tmp_path / w).read().split())
    assert written == list(range(128))
    assert ds[5]["image"].shape == (64, 64, 3)


def test_demo_says_what_it_wrote_and_how_to_remove_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "edcache.cli.main", "demo", "--root", str(tmp_path), "-n", "40",
         "--workers", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
    )
    assert proc.returncode == 0, proc.stderr
    assert f"remove it with: rm -r {tmp_path}" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == ["cached", "images"]
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert "rm -r ~/.cache/edcache-demo" in readme
