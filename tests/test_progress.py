"""Progress bars: XLA compilation is its own phase, and pauses stay out of the rate and ETA."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from score_jax import progress


def _new_program():
  """A jitted function no other test has compiled (its first call compiles)."""
  tag = float(id(object()))
  return jax.jit(lambda x: jnp.sin(x + tag) @ x.T)


def test_compile_phase_is_reported_before_the_first_rate(capsys):
  f, x = _new_program(), jnp.ones((64, 64))
  with progress.bar(4, "demo", unit="batch", compiling="demo step") as bar:
    assert bar.format_dict == {}  # nothing drawn while compiling
    for _ in range(4):
      f(x).block_until_ready()
      bar.update(1)
  err = capsys.readouterr().err
  phase = re.search(r"compiling demo step \.\.\. \d+(\.\d)? s\n", err)
  assert phase, err
  rate = re.search(r"\d[\d.]*batch/s", err)
  assert rate and phase.start() < rate.start(), err
  # The bar starts after the compiled first batch: its first drawing has no rate yet.
  assert re.search(r"1/4 \[00:00<\?, \?batch/s\]", err), err


def test_an_already_compiled_loop_says_so(capsys):
  f, x = _new_program(), jnp.ones((8, 8))
  f(x).block_until_ready()
  with progress.bar(2, "again", unit="batch") as bar:
    for _ in range(2):
      f(x).block_until_ready()
      bar.update(1)
  assert "compiling again ... already compiled\n" in capsys.readouterr().err


def test_paused_time_and_a_later_compile_stay_out_of_the_eta(capsys):
  now = [0.0]
  bar = progress.Bar(100, "train", unit="step", clock=lambda: now[0])
  for _ in range(10):
    now[0] += 1.0
    bar.update(1)
  with bar.paused():  # a checkpoint save
    now[0] += 1000.0
  now[0] += 1.0
  bar.update(1)
  f, x = _new_program(), jnp.ones((8, 8))
  with bar.paused(compiling="eval step"):
    now[0] += 500.0
    f(x).block_until_ready()
  now[0] += 1.0
  bar.update(1)
  stats = bar.format_dict
  bar.close()
  assert stats["n"] == 12
  assert stats["elapsed"] == pytest.approx(12.0)
  assert stats["rate"] == pytest.approx(1.0, rel=0.05)
  assert re.search(r"compiling eval step \.\.\. \d+(\.\d)? s\n", capsys.readouterr().err)


def test_disabled_bar_prints_nothing(capsys):
  with progress.bar(3, "quiet", enabled=False) as bar:
    bar.update(3)
  assert capsys.readouterr().err == ""


def test_training_reports_its_compile_phases_before_the_rate(tmp_path, capsys):
  from configs import test as test_config
  from score_jax import experiment, train
  config = test_config.get_config()
  config.training.progress_bar = True
  train.train_and_evaluate(experiment.build(config), str(tmp_path))
  err = capsys.readouterr().err
  phase = re.search(r"compiling train step \.\.\. \d+(\.\d)? s\n", err)
  assert phase, err
  rate = re.search(r"\d[\d.]*(step/s|s/step)", err)
  assert rate and phase.start() < rate.start(), err
  assert re.search(r"compiling eval step \.\.\. \d+(\.\d)? s\n", err), err


def test_a_compile_between_two_updates_is_reported_and_left_out_of_the_rate(capsys):
  now = [0.0]
  bar = progress.Bar(100, "sample als", clock=lambda: now[0])
  for _ in range(10):
    now[0] += 1.0
    bar.update(1)
  # The second program of the loop compiles for 100 s (an event as XLA's compiler records it),
  # then its batch runs for 1 s.
  jax.monitoring.record_event_duration_secs(progress._COMPILE_EVENT, 100.0)
  now[0] += 101.0
  bar.update(1)
  stats = bar.format_dict
  bar.close()
  assert stats["n"] == 11 and stats["elapsed"] == pytest.approx(11.0)
  assert stats["rate"] == pytest.approx(1.0, rel=0.05)
  assert "compiling sample als: one more program ... 100 s\n" in capsys.readouterr().err
