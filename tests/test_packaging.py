"""The wheel that `pip install .` builds (flit_core, the build backend pyproject.toml names).

The suite imports mlx_manager from the checkout, so a file the wheel leaves out (the dashboard's
static files, say) would pass every other test and break only for users who installed it.
"""

from __future__ import annotations

import subprocess
import tomllib
import zipfile
from collections.abc import Iterator

import pytest
from flit_core import buildapi
from packaging.requirements import Requirement

from mlx_manager import __version__, docs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    out = tmp_path_factory.mktemp("wheel")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(docs.ROOT)  # the backend reads ./pyproject.toml, as under pip
        name = buildapi.build_wheel(str(out))
    with zipfile.ZipFile(out / name) as built:
        assert built.testzip() is None
        yield built


def test_the_backend_is_the_one_pyproject_names() -> None:
    build = tomllib.loads((docs.ROOT / "pyproject.toml").read_text())["build-system"]
    assert build["build-backend"] == "flit_core.buildapi"


def test_the_wheel_holds_every_file_of_the_package_that_git_tracks(wheel: zipfile.ZipFile) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "mlx_manager"], cwd=docs.ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert any(path.endswith("dashboard/static/index.html") for path in tracked)
    missing = sorted(set(tracked) - set(wheel.namelist()))
    assert not missing, f"left out of the wheel: {missing}"
    assert not [name for name in wheel.namelist() if "__pycache__" in name or name.endswith(".pyc")]


def test_the_wheel_installs_the_console_script_and_the_dependencies(wheel: zipfile.ZipFile) -> None:
    info = f"mlx_manager-{__version__}.dist-info"
    scripts = wheel.read(f"{info}/entry_points.txt").decode()
    assert "mlx-manager=mlx_manager.cli:main" in scripts.replace(" ", "")
    metadata = wheel.read(f"{info}/METADATA").decode()
    project = tomllib.loads((docs.ROOT / "pyproject.toml").read_text())["project"]
    required = {
        str(Requirement(line.removeprefix("Requires-Dist: ")))
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist: ")
    }
    assert {str(Requirement(dependency)) for dependency in project["dependencies"]} <= required
    assert f"Version: {__version__}" in metadata
