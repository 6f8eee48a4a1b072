"""`--help` (`-h`, `--helpshort`) and `--helpfull` for the commands that parse absl flags.

absl defines its help flags only inside `absl.app.run`, which score_jax's commands do not use:
they call `FLAGS(argv)` themselves so that every bad flag becomes a one-line error and an exit
status. These flags print the command's usage to stdout and exit with status 0 while the flags are
parsed, so `--help` works next to any other flag and before anything heavy is imported.
"""

from __future__ import annotations

import os
import pathlib
import sys
import textwrap
from typing import Callable, Iterable

from absl import flags

# The names these flags take; `define` skips those already defined in the FlagValues.
NAMES = ("help", "helpshort", "helpfull")


class _HelpFlag(flags.BooleanFlag):
  """A boolean flag that prints `text()` and exits 0 when given."""

  def __init__(self, name: str, short_name: str | None, description: str,
               text: Callable[[], str]):
    super().__init__(name, False, description, short_name=short_name, allow_hide_cpp=True)
    self._text = text

  def parse(self, argument) -> None:
    super().parse(argument)
    if self.value:
      sys.stdout.write(self._text())
      sys.stdout.flush()
      raise SystemExit(0)


def format_flags(flag_list: Iterable[flags.Flag], width: int = 100) -> str:
  """One entry per flag: `--name` (with `-x` and the default), then its help, indented."""
  lines = []
  for flag in sorted(flag_list, key=lambda f: f.name):
    name = f"--{flag.name}" + (f", -{flag.short_name}" if flag.short_name else "")
    default = flag.default_as_str if flag.default not in (None, False) else ""
    path = default.strip("'")
    if os.path.isabs(path) and pathlib.Path(path).is_relative_to(os.getcwd()):
      default = repr(os.path.relpath(path))  # a shipped file, named as from the checkout
    lines.append(f"  {name}" + (f" (default: {default})" if default else ""))
    lines.extend(textwrap.wrap(" ".join(str(flag.help).split()), width,
                               initial_indent="      ", subsequent_indent="      "))
  return "\n".join(lines) + "\n"


def define(usage: Callable[[], str], module_flags: Callable[[], Iterable[flags.Flag]],
           flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines `--help`/`-h`, `--helpshort` and `--helpfull` on `flag_values`.

  Args:
    usage: the command's usage text (what it does, its modes, examples, the config pointer).
    module_flags: the command's own flags, listed by `--help`; `--helpfull` adds every flag
      defined in the process (absl's logging flags and the like).
    flag_values: where to define them.
  """
  def own() -> list[flags.Flag]:
    return [*module_flags(), *(flag_values[n] for n in NAMES)]

  def short() -> str:
    return f"{usage().rstrip()}\n\nflags:\n{format_flags(own())}"

  def full() -> str:
    listed = {id(f) for f in own()}
    others = {id(f): f for f in (flag_values[n] for n in flag_values) if id(f) not in listed}
    return f"{short().rstrip()}\n\nall other flags:\n{format_flags(others.values())}"

  for name, short_name, description, text in (
      ("help", "h", "show this help and exit", short),
      ("helpshort", None, "the same as --help", short),
      ("helpfull", None, "--help, then every other flag of the process", full)):
    if name not in flag_values:
      flags.DEFINE_flag(_HelpFlag(name, short_name, description, text), flag_values)
