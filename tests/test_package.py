"""The package: its supported range, its dependencies against Colab's versions, the configs it
ships and its command line run from outside a checkout. Runs in seconds; CI also runs it against
the installed package in the Colab-like environment (.ci/colab)."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest
from conftest import HANG_TIMEOUT_S
from packaging.requirements import Requirement

import score_jax

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
COLAB = REPO / ".ci" / "colab-requirements.txt"


def _pyproject() -> dict:
  return tomllib.loads(PYPROJECT.read_text())


def _colab_versions() -> dict[str, str]:
  lines = [l.strip() for l in COLAB.read_text().splitlines()]
  return dict(l.split("==") for l in lines if l and not l.startswith("#"))


def test_unsupported_python_or_jax_is_refused_with_the_supported_range():
  installed = {"jax": "0.7.2", "jaxlib": "0.7.2"}
  score_jax._check_versions((3, 11, 7), installed.get)
  score_jax._check_versions((3, 13, 15), {"jax": "0.12.0.1", "jaxlib": "0.12.0"}.get)
  with pytest.raises(ImportError, match=r"Python 3\.11 to 3\.13, not 3\.10\.13"):
    score_jax._check_versions((3, 10, 13), installed.get)
  with pytest.raises(ImportError, match=r"Python 3\.11 to 3\.13, not 3\.14\.0"):
    score_jax._check_versions((3, 14, 0), installed.get)
  with pytest.raises(ImportError, match=r"jax 0\.7\.2 and newer, not 0\.6\.2"):
    score_jax._check_versions((3, 12, 0), {"jax": "0.6.2", "jaxlib": "0.6.2"}.get)
  with pytest.raises(ImportError, match=r"jaxlib 0\.7\.2 and newer, not 0\.7\.1"):
    score_jax._check_versions((3, 12, 0), {"jax": "0.7.2", "jaxlib": "0.7.1"}.get)

  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  with pytest.raises(ImportError, match="needs jax 0.7.2 or newer, which is not installed"):
    score_jax._check_versions((3, 12, 0), missing)


def test_pyproject_range_matches_the_import_check():
  project = _pyproject()["project"]
  assert project["requires-python"] == ">=3.11,<3.14"
  assert score_jax.PYTHON_RANGE == ((3, 11), (3, 13))
  bounds = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
  assert str(bounds["jax"]) == str(bounds["jaxlib"]) == ">=" + ".".join(map(str, score_jax.MIN_JAX))


def test_runtime_dependencies_admit_colabs_versions_and_are_lower_bounds():
  project = _pyproject()["project"]
  requirements = [Requirement(r) for r in project["dependencies"]]
  names = {r.name.lower() for r in requirements}
  for name, version in _colab_versions().items():
    for r in requirements:
      if r.name.lower() == name:
        assert r.specifier.contains(version), f"{r} rejects Colab's {name} {version}"
  assert {"ml-collections", "jaxtyping"} <= names  # Colab lacks them
  assert not names & {"clu", "ipykernel", "tensorflow", "tensorflow-cpu", "pytest"}
  for r in requirements:  # lower bounds only, except the oneDNN release the C++ is written for
    assert all(s.operator == ">=" for s in r.specifier) or r.name.startswith("onednn"), r
  extras = project["optional-dependencies"]
  assert extras["cuda12"] == ["jax[cuda12]>=0.7.2"] and extras["tpu"] == ["jax[tpu]>=0.7.2"]
  assert any(Requirement(r).name == "ipykernel" for r in extras["test"])


def test_the_shipped_configs_are_found_and_import_each_other():
  folder = score_jax.configs_dir()
  assert (folder / "default.py").is_file() and (folder / "mnist_cpu.py").is_file()
  assert {p.name for p in (REPO / "configs").glob("*.py")} <= {p.name for p in folder.glob("*.py")}
  from ml_collections import config_flags

  from score_jax import cli
  from score_jax.stored_config import _DEFAULT_CONFIG
  assert _DEFAULT_CONFIG == folder / "default.py"
  assert config_flags.get_config_filename(cli.FLAGS["config"]) == str(folder / "default.py")


def test_every_source_folder_is_a_package_that_setup_py_ships():
  # setup.py lists `find_packages(include=["score_jax", "score_jax.*"])`, which skips a folder
  # without an __init__.py: its modules would be missing from an installed package.
  assert 'find_packages(include=["score_jax", "score_jax.*"])' in (REPO / "setup.py").read_text()
  folders = {p.parent for p in (REPO / "score_jax").rglob("*.py")}
  assert {"eval", "models", "cpu"} <= {f.name for f in folders}
  for folder in folders:
    assert (folder / "__init__.py").is_file(), f"{folder} has no __init__.py; setup.py skips it"


def _run_cli(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
  # The folder holding the imported score_jax: the checkout, or site-packages when installed.
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(score_jax.__file__).parents[1]),
         "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "-m", "score_jax", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=HANG_TIMEOUT_S)


def test_python_m_score_jax_resolves_shipped_configs_outside_a_checkout(tmp_path):
  # Bad values stop before any work, so this checks the config resolved without training.
  proc = _run_cli(["--config=configs/two_d.py:swiss_roll", "--config.noise.sigma_min=-1",
                   f"--workdir={tmp_path / 'run'}"], tmp_path)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: noise.sigma_min=-1.0 must be > 0")
  assert not (tmp_path / "run").exists()
  proc = _run_cli(["--config=configs/no_such_config.py"], tmp_path)
  assert proc.returncode == 2 and "no_such_config.py" in proc.stderr, proc.stderr


def test_every_package_lives_where_its_name_says_so_editable_installs_are_one_pth_entry():
  # setuptools installs an editable checkout as one .pth entry only when package-dir is {"": "."}
  # and each package sits at its dotted path; any other mapping gets a meta path finder and a
  # warning on every `pip install -e .` (setuptools/command/editable_wheel.py, _simple_layout).
  import setuptools
  assert _pyproject()["tool"]["setuptools"]["package-dir"] == {"": "."}
  packages = setuptools.find_packages(str(REPO), include=["score_jax", "score_jax.*"])
  assert {"score_jax", "score_jax.configs", "score_jax.eval"} <= set(packages)
  for name in packages:
    assert (REPO.joinpath(*name.split(".")) / "__init__.py").is_file(), name
  assert (REPO / "score_jax" / "configs").resolve() == (REPO / "configs").resolve()
