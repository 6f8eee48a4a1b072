"""Progress of the long host loops (training, sampling, features, likelihood), in terminals and
notebooks, with XLA compilation reported as its own phase.

A loop's first batch runs its compiled functions for the first time, and XLA compiles them then:
seconds to minutes on a CPU, which a bar would count as work (a first ETA of hours). So a bar
starts as one line `compiling <what> ...`, closed by the compile time when the first units are
done, and only then draws the `tqdm.auto` bar (the notebook widget under Jupyter/Colab, the text
bar elsewhere), whose rate and ETA count the loop's work alone. `Bar.paused()` keeps other
pauses out of the rate in the same way: a checkpoint save, or the first call of another compiled
function (reported as its own `compiling ...` line). Only the main process prints.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator

from tqdm import auto

from score_jax import parallel

# The event JAX records after each XLA compilation (`jax.monitoring`, duration in seconds).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class _CompileClock:
  """Counts XLA compilations and when the latest one ended (a `jax.monitoring` listener)."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.last_end = 0.0
    self._lock = threading.Lock()
    self._registered = False

  def register(self) -> None:
    if not self._registered:
      import jax.monitoring
      jax.monitoring.register_event_duration_secs_listener(self._on_event)
      self._registered = True

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == _COMPILE_EVENT:
      with self._lock:
        self.count += 1
        self.seconds += duration
        self.last_end = time.perf_counter()


_COMPILES = _CompileClock()
# A later compilation inside a loop gets its own line from this many seconds on (shorter ones are
# the small programs of eager array operations).
_REPORTED_COMPILE_S = 1.0


def _seconds(s: float) -> str:
  return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


class Bar:
  """A progress bar whose rate and ETA skip compilation and other pauses.

  Args:
    total: the number of units the loop will have done at the end.
    desc: the label in front of the bar.
    unit: the name of one unit.
    initial: units already done (a resumed loop).
    compiling: what the first units compile (the `compiling <what> ...` line); None: nothing.
    enabled: False draws nothing (as on processes other than the main one).
    clock: the bar's clock, seconds since any origin (tests pass their own); the compile phases
      are timed with `time.perf_counter`, as `jax.monitoring` events are.
  """

  def __init__(self, total: int, desc: str, *, unit: str = "sample", initial: int = 0,
               compiling: str | None = None, enabled: bool = True,
               clock: Callable[[], float] = time.perf_counter):
    self._total, self._desc, self._unit, self._initial = total, desc, unit, initial
    self._enabled = enabled and parallel.is_main_process()
    self._clock = clock
    self._tqdm: auto.tqdm | None = None
    self._postfix: dict = {}
    self._done = initial
    self._phase: tuple[str, float, int] | None = None
    self._what = compiling or desc
    self._seen = (_COMPILES.count, _COMPILES.seconds)
    _COMPILES.register()
    if compiling is not None and total > initial:
      self._start_phase(compiling)
    else:
      self._ensure_tqdm()

  # The compile phase: one line, `compiling <what> ... <seconds> s`.
  def _start_phase(self, what: str) -> None:
    self._phase = (what, time.perf_counter(), _COMPILES.count)
    if self._enabled:
      print(f"compiling {what} ...", end="", file=sys.stderr, flush=True)

  def _end_phase(self) -> None:
    what, start, count = self._phase
    self._phase = None
    if self._enabled:
      # Up to the end of the last compilation: what ran after it is the loop's work.
      print(f" {_seconds(_COMPILES.last_end - start)}" if _COMPILES.count > count
            else " already compiled", file=sys.stderr, flush=True)

  def _ensure_tqdm(self) -> None:
    self._seen = (_COMPILES.count, _COMPILES.seconds)
    if self._tqdm is None and self._enabled:
      self._tqdm = auto.tqdm(total=self._total, desc=self._desc, unit=self._unit,
                             initial=self._done, dynamic_ncols=True, smoothing=0.1,
                             postfix=self._postfix or None)
      self._tqdm._time = self._clock  # noqa: SLF001  (tests pass their own clock)
      self._tqdm.last_print_t = self._tqdm.start_t = self._clock()

  def update(self, n: int, **postfix) -> None:
    """`n` more units done; `postfix` values (e.g. `loss=...`) are shown after the bar."""
    self._done += n
    if postfix:
      self._postfix.update(postfix)
    if self._phase is not None:
      if n:
        self._end_phase()
        self._ensure_tqdm()  # from the units done so far: its rate counts what follows
      return
    if self._tqdm is None:
      return
    if postfix:
      self._tqdm.set_postfix(self._postfix, refresh=False)
    if _COMPILES.count == self._seen[0]:
      self._tqdm.update(n)
      return
    # Another program compiled since the last update (the loop's second jitted function): its
    # compile time is taken out of the interval, so the rate stays the loop's.
    seconds = _COMPILES.seconds - self._seen[1]
    self._seen = (_COMPILES.count, _COMPILES.seconds)
    if seconds >= _REPORTED_COMPILE_S:
      self._tqdm.clear()
      print(f"compiling {self._what}: one more program ... {_seconds(seconds)}",
            file=sys.stderr, flush=True)
    now = self._clock()
    shift = min(seconds, now - self._tqdm.last_print_t)
    self._tqdm.start_t += shift
    self._tqdm.last_print_t += shift
    self._tqdm.update(n)

  @contextlib.contextmanager
  def paused(self, compiling: str | None = None) -> Iterator[None]:
    """The time inside is not counted as work (a checkpoint save, an evaluation).

    Args:
      compiling: what the block compiles the first time it runs (e.g. "eval step"); when an
        XLA compilation happens inside, its own `compiling <what> ... <seconds> s` line.
    """
    count, start = _COMPILES.count, time.perf_counter()
    try:
      yield
    finally:
      if compiling is not None and _COMPILES.count > count and self._enabled:
        if self._tqdm is not None:
          self._tqdm.clear()
        print(f"compiling {compiling} ... {_seconds(_COMPILES.last_end - start)}", file=sys.stderr,
              flush=True)
      if self._tqdm is not None:
        self._tqdm.unpause()
      self._seen = (_COMPILES.count, _COMPILES.seconds)

  @property
  def format_dict(self) -> dict:
    """The drawn bar's numbers (`n`, `elapsed`, `rate`, ...; tqdm's), {} before it is drawn."""
    return dict(self._tqdm.format_dict) if self._tqdm is not None else {}

  def close(self) -> None:
    if self._phase is not None:
      self._end_phase()
    if self._tqdm is not None:
      self._tqdm.close()

  def __enter__(self) -> "Bar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def bar(total: int, desc: str, *, unit: str = "sample", initial: int = 0,
        compiling: str | None = None, enabled: bool = True) -> Bar:
  """A `Bar` of `total` units (drawn only on the main process).

  Args:
    total: the number of units the loop will have done at the end.
    desc: the label in front of the bar.
    unit: the name of one unit.
    initial: units already done (a resumed evaluation).
    compiling: what the loop's first units compile; default: `desc`.
    enabled: False draws nothing.
  """
  return Bar(total, desc, unit=unit, initial=initial,
             compiling=desc if compiling is None else compiling, enabled=enabled)
