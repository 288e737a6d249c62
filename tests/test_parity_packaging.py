"""What users install pins nothing that CI needs pinned; CI runs the README's command
(issue 11 item 16)."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_no_exact_pins_in_what_users_install():
    pyproject = _read("pyproject.toml")
    section = pyproject[pyproject.index("[project]"):pyproject.index("[project.scripts]")]
    pins = re.findall(r'"([A-Za-z0-9_.-]+)\s*==', section)
    assert not pins, f"dependencies or extras pin {pins}: a user's install would replace their own"


def test_ci_pins_torch_and_runs_the_readme_test_command():
    assert re.search(r"^torch==\d", _read(".ci", "constraints.txt"), re.M)
    run = _read(".ci", "run")
    assert 'export PIP_CONSTRAINT="$PWD/.ci/constraints.txt"' in run
    readme = _read("README.md")
    command = re.search(r"^(python3 -m pip install -e \"\.\[test\]\" && python3 -m pytest -q)$",
                        readme, re.M).group(1)
    assert command in run.splitlines()
