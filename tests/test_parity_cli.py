"""Command-line rough edges (issue 11 items 10-12)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from edcache import CachedDataset

from parity_datasets import Images

TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def edcache_cmd(tmp_path):
    """Runs ``edcache ...`` as the console script does: from a launcher in a folder of
    its own (so the working directory is not on ``sys.path`` by accident)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "edcache"
    launcher.write_text("import sys\nfrom edcache.cli.main import main\nsys.exit(main())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

    def run(*args, cwd=None, **kwargs):
        kwargs.setdefault("capture_output", True)
        return subprocess.run([sys.executable, str(launcher), *args], cwd=cwd or tmp_path, env=env,
                              text=True, timeout=120, **kwargs)

    return run


def _no_traceback(proc):
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_dataset_module_in_the_working_directory(edcache_cmd, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodule.py").write_text(textwrap.dedent(f"""
        from parity_datasets import Images
        def factory():
            return Images({str(tmp_path / "data")!r}, n=6)
    """))
    proc = edcache_cmd("--dataset", "mymodule.factory", "--workers", "1", "--no-progress", cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "cache complete" in proc.stdout
    missing = edcache_cmd("--dataset", "nomodule.factory", cwd=project)
    assert missing.returncode == 1
    _no_traceback(missing)
    assert "current directory" in missing.stderr


@pytest.fixture
def pickled_cache(tmp_path):
    class WithSet(Images):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "tags": {i, i + 1}}

    ds = CachedDataset(WithSet(str(tmp_path / "data"), n=5, name="p"), allow_pickle=True,
                       num_workers=0, progress=False)
    return ds.path


def test_info_verify_convert_take_allow_pickle(edcache_cmd, pickled_cache, tmp_path):
    refused = edcache_cmd("info", pickled_cache)
    assert refused.returncode == 1
    _no_traceback(refused)
    assert "--allow-pickle" in refused.stderr
    info = edcache_cmd("info", "--allow-pickle", pickled_cache)
    assert info.returncode == 0, info.stderr
    assert "examples:    5" in info.stdout and "pickles:     allowed" in info.stdout
    deep = edcache_cmd("verify", "--deep", "--allow-pickle", pickled_cache)
    assert deep.returncode == 0, deep.stderr
    assert "--allow-pickle" in edcache_cmd("convert", "--help").stdout


def test_verify_deep_says_what_it_did(edcache_cmd, tmp_path):
    path = CachedDataset(Images(str(tmp_path), n=5), num_workers=0, progress=False).path
    plain, deep = edcache_cmd("verify", path), edcache_cmd("verify", "--deep", path)
    assert plain.returncode == deep.returncode == 0
    assert plain.stdout != deep.stdout
    assert "every record decoded" in deep.stdout and "checksums only" in plain.stdout


def test_python_dash_m_edcache_is_the_command(edcache_cmd, tmp_path):
    path = CachedDataset(Images(str(tmp_path), n=5), num_workers=0, progress=False).path
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    module = subprocess.run([sys.executable, "-m", "edcache", "info", path], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)
    assert module.returncode == 0, module.stderr
    assert module.stdout == edcache_cmd("info", path).stdout


def test_convert_onto_an_existing_destination_is_one_line(edcache_cmd, tmp_path):
    path = CachedDataset(Images(str(tmp_path), n=5), num_workers=0, progress=False).path
    dst = tmp_path / "out.zip"
    dst.write_bytes(b"something")
    proc = edcache_cmd("convert", path, str(dst))
    assert proc.returncode == 1
    _no_traceback(proc)
    assert "out.zip" in proc.stderr and "delete" in proc.stderr


def test_info_into_a_closed_pipe_is_quiet(edcache_cmd, tmp_path):
    path = CachedDataset(Images(str(tmp_path), n=5), num_workers=0, progress=False).path
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -3` that has already exited
    try:
        proc = edcache_cmd("info", path, stdout=write_end, stderr=subprocess.PIPE, capture_output=False)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_bare_edcache_lists_the_commands(edcache_cmd):
    proc = edcache_cmd()
    assert proc.returncode == 0
    for command in ("info", "verify", "convert", "demo", "--dataset", "--server"):
        assert f"edcache {command}" in proc.stdout
