"""`pip install .` builds through the PEP 517 backend and installs a working `djangoloadbalancer`."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import setuptools

from tests.support.lb import REPO

pytestmark = pytest.mark.slow
ENTRY_POINT = re.compile(r'"djangoloadbalancer = ([\w.]+):(\w+)"')


def test_pyproject_declares_the_setuptools_backend():
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"
    assert any(r.replace(" ", "").startswith("setuptools>=") for r in build["requires"])
    assert (REPO / "setup.py").exists()   # the metadata stays there


def test_the_console_script_entry_point_runs():
    module, function = ENTRY_POINT.search((REPO / "setup.py").read_text()).groups()
    # What pip's generated `djangoloadbalancer` does.
    code = f"import sys; from {module} import {function}; sys.argv[0] = 'djangoloadbalancer'; sys.exit({function}())"
    result = subprocess.run([sys.executable, "-c", code, "--help"], cwd="/", capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: djangoloadbalancer") and "status" in result.stdout


def _can_build_wheels_offline() -> bool:
    """setuptools builds wheels by itself from 70.1 on; before, it needs the `wheel` package."""
    version = tuple(int(p) for p in re.findall(r"\d+", setuptools.__version__)[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package installed with pip into a directory (built from a copy: pip builds in the tree)."""
    if not _can_build_wheels_offline():
        pytest.skip(f"setuptools {setuptools.__version__} without the `wheel` package cannot build a wheel "
                    "here without a package index (pip's build isolation would fetch them)")
    base = tmp_path_factory.mktemp("pip")
    source = base / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("bin", "django_lb_shm"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = base / "target"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-v", "--no-deps", "--no-build-isolation",
                             "--no-index", "--target", str(target), str(source)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "setup.py install" not in result.stdout and "(pyproject.toml)" in result.stdout
    return target


@pytest.mark.parametrize("script", ["djangoloadbalancer", "djangoloadbalancer.py"])
def test_the_installed_launchers_run(installed, script):
    path = installed / "bin" / script
    assert path.exists(), sorted(p.name for p in (installed / "bin").iterdir())
    result = subprocess.run([sys.executable, str(path), "--help"], env=dict(os.environ, PYTHONPATH=str(installed)),
                            cwd=str(installed), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: djangoloadbalancer") and "status" in result.stdout


def test_the_installed_package_has_every_folder_and_its_type_hints(installed):
    source, package = REPO / "django_lb_shm", installed / "django_lb_shm"
    folders = {p.parent.relative_to(source) for p in source.rglob("__init__.py")}
    assert {p.parent.relative_to(package) for p in package.rglob("__init__.py")} == folders
    assert (package / "py.typed").is_file()   # PEP 561


@pytest.mark.skipif("LB_TEST_VENV" not in os.environ, reason="run by scripts/test.sh only (it sets LB_TEST_VENV)")
def test_the_test_command_runs_in_the_checkouts_own_virtual_environment():
    """scripts/test.sh installs into .venv/ and runs from it, never from the system interpreter."""
    venv = Path(os.environ["LB_TEST_VENV"]).resolve()
    assert Path(sys.prefix).resolve() == venv, (sys.prefix, venv)
    assert sys.prefix != sys.base_prefix   # a virtual environment, not the system interpreter
    import django
    import django_lb_shm

    assert Path(django.__file__).resolve().is_relative_to(venv)
    assert Path(django_lb_shm.__file__).resolve().is_relative_to(REPO.resolve())
    launcher = shutil.which("djangoloadbalancer")
    assert launcher and Path(launcher).parent.resolve() == venv / "bin"
