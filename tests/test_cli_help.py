"""`--help` on every entry point, and usage errors before the heavy imports.

Each command runs as a subprocess from a neutral directory with this checkout first on the path;
the timeouts only bound a hang.
"""

from __future__ import annotations

import pathlib
import re
import resource
import subprocess
import sys

import pytest

from conftest import HANG_TIMEOUT_S, REPO, main_env

# Every `python -m score_jax.X` command: the modules with a `__main__` block.
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__main__")
    for p in (REPO / "score_jax").rglob("*.py")
    if re.search(r'^if __name__ == "__main__":', p.read_text(), re.M))


def _run(cmd: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(main_env(), PYTHONPATH=str(REPO))
  return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT_S)


def test_the_commands_are_found():
  assert {"score_jax", "score_jax.cli", "score_jax.convert", "score_jax.prepare_data",
          "score_jax.eval.fid", "score_jax.eval.fetch_inception"} <= set(MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_command_prints_its_help_and_exits_0(module, tmp_path):
  out = _run([sys.executable, "-m", module, "--help"], tmp_path)
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("usage:"), out.stdout[:300]
  assert "--help" in out.stdout and "--helpfull" in out.stdout
  assert not list(tmp_path.iterdir())


def _main_commands() -> list[list[str]]:
  commands = [[sys.executable, str(REPO / "main.py")], [sys.executable, "-m", "score_jax"]]
  script = pathlib.Path(sys.executable).with_name("score-jax")
  if script.exists():
    commands.append([str(script)])
  return commands


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_main_help_shows_usage_modes_flags_and_the_config(flag, tmp_path):
  for command in _main_commands():
    out = _run([*command, flag], tmp_path)
    assert out.returncode == 0, (command, out.stderr)
    text = out.stdout
    assert text.startswith("usage: score-jax"), text[:300]
    for mode in ("train", "sample", "eval", "sampler_sweep", "sweep", "likelihood", "export"):
      assert re.search(rf"^  {mode} +\S", text, re.M), mode
    for name in ("--config", "--workdir", "--mode", "--num_devices"):
      assert re.search(rf"^  {name}\b", text, re.M), name
    assert "configs/default.py" in text and "--config.GROUP.FIELD=VALUE" in text
    # --helpfull adds absl's own flags; --help keeps to the command's.
    assert ("--verbosity" in text) == (flag == "--helpfull")
    assert not list(tmp_path.iterdir())


def test_help_after_other_flags_still_wins(tmp_path):
  out = _run([sys.executable, str(REPO / "main.py"), "--mode=sample", "--help"], tmp_path)
  assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr


def test_readme_shows_the_real_help(tmp_path):
  readme = (REPO / "README.md").read_text()
  shown = re.search(r"<!-- main\.py --help -->\n```text\n(.*?)```", readme, re.S)
  assert shown, "README.md lost its `main.py --help` block"
  out = _run([sys.executable, "main.py", "--help"], REPO)
  assert out.returncode == 0, out.stderr
  assert shown.group(1) == out.stdout, (
      "README.md's `main.py --help` block differs from the command's output; paste the output "
      "of `python main.py --help` (run in the checkout) into it")


# Imported only once a command is known to be valid: a usage error must not wait for them.
_HEAVY = ("flax", "orbax", "tensorflow_datasets", "tensorflow", "tensorboard", "grain",
          "matplotlib", "score_jax.models", "score_jax.experiment", "score_jax.train")

_REPORT_IMPORTS = """
import atexit, runpy, sys
heavy = {heavy!r}
atexit.register(lambda: print("imported:", [m for m in heavy if m in sys.modules], file=sys.stderr))
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("args, message", [
    (["--config.training.batch_size=-1"], "training.batch_size=-1 must be >= 1"),
    (["--config.noise.sigma_max=0.01"], "noise.sigma_max=0.01 must be > noise.sigma_min"),
    (["--config.training.batch_size=12"], "multiple of the 8 devices"),
    (["--config.training.num_train_steps=many"], "num_train_steps"),
    (["--mode=sample", "--workdir={tmp}/missing"], "does not exist"),
])
def test_usage_error_comes_before_the_library_imports(args, message, tmp_path):
  args = [a.format(tmp=tmp_path) for a in args]
  argv = [str(REPO / "main.py"), f"--workdir={tmp_path}/run", *args]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  out = _run([sys.executable, "-c", _REPORT_IMPORTS.format(heavy=_HEAVY, argv=argv)], tmp_path)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  assert out.returncode == 2, out.stderr
  error, imported = out.stderr.strip().splitlines()[-2:]
  assert error.startswith("error: ") and message in error, out.stderr
  assert imported == "imported: []", imported
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  assert cpu < 5, f"a usage error took {cpu:.1f} s of CPU time"
