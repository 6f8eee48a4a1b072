"""Checkpoints: digests, damaged steps falling back, read-only readers, the non-finite guard."""

import json
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from score_jax import checkpoint


def _state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"params": {"w": rng.normal(size=(64, 64)).astype(np.float32),
                     "b": rng.normal(size=(64,)).astype(np.float32)},
          "step": np.array(seed, np.int32)}


def _save_steps(workdir: pathlib.Path, steps=(1, 2)) -> None:
  manager = checkpoint.create_writer(str(workdir), async_save=False)
  for s in steps:
    checkpoint.save(manager, s, _state(s), data_state={"pos": s * 10},
                    config_json=json.dumps({"lr": 1e-3 * s, "name": "toy"}))
  checkpoint.wait(manager)
  manager.close()


def _restore_fn(manager):
  def read(step):
    config = checkpoint.restore_config(manager, step)
    state, data_state = checkpoint.restore(manager, step, _state(0))
    return config, jax.device_get(state), data_state
  return read


def _assert_is_step(result, step):
  config, state, data_state = result
  want = _state(step)
  assert config == {"lr": 1e-3 * step, "name": "toy"}
  assert data_state == {"pos": step * 10}
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("pristine")
  _save_steps(workdir)
  return workdir


def test_round_trip_and_reader_creates_nothing(pristine, tmp_path):
  before = sorted(p.relative_to(pristine) for p in pristine.rglob("*"))
  manager = checkpoint.open_reader(str(pristine))
  step, result = checkpoint.restore_newest(manager, _restore_fn(manager), move_damaged=False)
  manager.close()
  assert step == 2
  _assert_is_step(result, 2)
  assert sorted(p.relative_to(pristine) for p in pristine.rglob("*")) == before
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.open_reader(str(tmp_path / "missing"))
  assert not (tmp_path / "missing").exists()
  (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
    checkpoint.open_reader(str(tmp_path / "empty"))


def test_reader_leaves_an_in_flight_save_alone(pristine, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  tmp = workdir / "checkpoints" / "3.orbax-checkpoint-tmp-123"
  (tmp / "state").mkdir(parents=True)
  manager = checkpoint.open_reader(str(workdir))
  assert checkpoint.all_steps(manager) == [1, 2]
  manager.close()
  assert (tmp / "state").is_dir()


def _damage(path: pathlib.Path, kind: str) -> None:
  data = path.read_bytes()
  if kind == "truncate":
    path.write_bytes(data[:len(data) // 2])
  elif kind == "empty":
    path.write_bytes(b"")
  else:
    mid = len(data) // 2
    path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 16]) + data[mid + 16:])


def _array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted((p for p in (step_dir / "state").rglob("d/*") if p.is_file()),
                key=lambda p: -p.stat().st_size)


FILES = {
    "array data": lambda d: _array_files(d)[0],
    "array metadata": lambda d: d / "state" / "_METADATA",
    "array manifest": lambda d: d / "state" / "manifest.ocdbt",
    "step metadata": lambda d: d / "_CHECKPOINT_METADATA",
    "config": lambda d: d / "config" / "metadata",
    "data-iterator state": lambda d: d / "data" / "metadata",
    "digest": lambda d: d / "digest" / "metadata",
}


@pytest.mark.parametrize("kind", ["truncate", "empty", "flip"])
def test_damaged_newest_step_falls_back_or_fails_in_one_line(pristine, tmp_path, kind, capsys):
  outcomes = {}
  for name, pick in FILES.items():
    workdir = tmp_path / name.replace(" ", "_")
    shutil.copytree(pristine, workdir)
    _damage(pick(workdir / "checkpoints" / "2"), kind)
    for writer in (False, True):
      before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
      try:
        if writer:
          manager = checkpoint.create_writer(str(workdir), async_save=False)
        else:
          manager = checkpoint.open_reader(str(workdir))
        step, result = checkpoint.restore_newest(manager, _restore_fn(manager),
                                                 move_damaged=writer)
        manager.close()
      except checkpoint.CheckpointError as e:
        assert "\n" not in str(e)
        outcomes[name, writer] = "error"
        continue
      # Whatever step comes back holds exactly the values saved at it.
      _assert_is_step(result, step)
      outcomes[name, writer] = step
      moved = workdir / "checkpoints" / "damaged" / "2"
      if writer:
        assert moved.is_dir() == (step == 1)
      else:
        assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
  err = capsys.readouterr().err
  for line in err.splitlines():
    if "damaged" in line:
      assert line.startswith("warning: checkpoint 2 in ")
  # The step metadata holds only timestamps; every other file's damage is caught, never
  # passed off as step 2.
  for name in FILES:
    if name != "step metadata":
      assert outcomes[name, False] == 1 and outcomes[name, True] == 1, (name, outcomes)


def test_every_step_damaged_is_one_line(pristine, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  for s in ("1", "2"):
    _damage(_array_files(workdir / "checkpoints" / s)[0], "flip")
  manager = checkpoint.open_reader(str(workdir))
  with pytest.raises(checkpoint.CheckpointError, match="every checkpoint") as e:
    checkpoint.restore_newest(manager, _restore_fn(manager), move_damaged=False)
  manager.close()
  assert "\n" not in str(e.value)


def test_other_model_is_a_mismatch_not_damage(pristine):
  manager = checkpoint.open_reader(str(pristine))
  other = {"params": {"w": np.zeros((8, 8), np.float32), "b": np.zeros(8, np.float32)},
           "step": np.array(0, np.int32)}
  with pytest.raises(checkpoint.CheckpointError, match="does not match this model"):
    checkpoint.restore(manager, 2, other)
  manager.close()


def test_nonfinite_state_is_never_saved(tmp_path):
  manager = checkpoint.create_writer(str(tmp_path), async_save=False)
  checkpoint.save(manager, 1, _state(1), data_state={}, config_json="{}")
  bad = _state(2)
  bad["params"]["b"][3] = np.inf
  with pytest.raises(checkpoint.NonFiniteStateError, match=r"step 2 .*\['params'\]\['b'\]"):
    checkpoint.save(manager, 2, bad, data_state={}, config_json="{}")
  checkpoint.wait(manager)
  assert checkpoint.all_steps(manager) == [1]
  manager.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]


def test_writer_refuses_keep_zero(tmp_path):
  with pytest.raises(ValueError, match="keep_checkpoints=0"):
    checkpoint.create_writer(str(tmp_path), keep=0)
  assert not (tmp_path / "checkpoints").exists()


def _tree(root: pathlib.Path) -> list:
  return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_a_step_without_its_digest_is_damaged_unless_allowed(pristine, tmp_path, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  step2 = workdir / "checkpoints" / "2"
  shutil.rmtree(step2 / "digest")
  _damage(_array_files(step2)[0], "flip")
  # Removing the digest does not switch the check off: step 2 is skipped, never returned.
  manager = checkpoint.open_reader(str(workdir))
  step, result = checkpoint.restore_newest(manager, _restore_fn(manager), move_damaged=False)
  with pytest.raises(checkpoint.UndigestedCheckpointError, match="no digest/.*allow_undigested"):
    checkpoint.restore(manager, 2, _state(0))
  manager.close()
  assert step == 1
  _assert_is_step(result, 1)
  err = capsys.readouterr().err
  assert "checkpoint 2 in" in err and "is unverified" in err and len(err.splitlines()) == 1

  # A run where no step has a digest (older than digests, or every digest removed) is refused
  # before anything is moved, even by a writer.
  shutil.rmtree(workdir / "checkpoints" / "1" / "digest")
  before = _tree(workdir)
  manager = checkpoint.create_writer(str(workdir), async_save=False)
  with pytest.raises(checkpoint.UndigestedCheckpointError, match="no checkpoint in .* has a "
                     r"digest \(steps \[1, 2\]\).*--allow_undigested_checkpoints") as e:
    checkpoint.restore_newest(manager, _restore_fn(manager), move_damaged=True)
  manager.close()
  assert "\n" not in str(e.value)
  assert _tree(workdir) == before

  # The explicit opt-in reads an undigested step unverified.
  manager = checkpoint.open_reader(str(workdir))
  state, data_state = checkpoint.restore(manager, 1, _state(0), allow_undigested=True)
  assert checkpoint.restore_config(manager, 1, allow_undigested=True)["lr"] == 1e-3
  manager.close()
  assert data_state == {"pos": 10}
  np.testing.assert_array_equal(jax.device_get(state)["params"]["w"], _state(1)["params"]["w"])


def test_a_nonfinite_state_on_disk_is_damaged_even_with_a_valid_digest(pristine, tmp_path,
                                                                      monkeypatch, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  bad = _state(3)
  bad["params"]["b"][5] = np.nan
  manager = checkpoint.create_writer(str(workdir), async_save=False)
  # A state saved past the guard (by a version without it, or crafted), digest and all.
  with monkeypatch.context() as m:
    m.setattr(checkpoint, "nonfinite_leaves", lambda state: [])
    checkpoint.save(manager, 3, bad, data_state={"pos": 30}, config_json='{"lr": 0.003}')
  checkpoint.wait(manager)
  step, result = checkpoint.restore_newest(manager, _restore_fn(manager), move_damaged=True)
  manager.close()
  assert step == 2
  _assert_is_step(result, 2)
  assert (workdir / "checkpoints" / "damaged" / "3").is_dir()
  assert "holds non-finite values (['params']['b'])" in capsys.readouterr().err


def test_rotation_renames_steps_out_and_empties_them(tmp_path):
  manager = checkpoint.create_writer(str(tmp_path), keep=2, async_save=False)
  for s in (1, 2, 3, 4):
    checkpoint.save(manager, s, _state(s), data_state={}, config_json="{}")
    # Each rotated step left the listing by one rename and is deleted by the next save.
    if s >= 3:
      assert os.listdir(tmp_path / "checkpoints" / checkpoint.ROTATED_DIR) == [str(s - 2)]
  checkpoint.wait(manager)
  manager.close()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "4"]


def test_a_reader_whose_step_is_rotated_away_reads_the_newest(pristine, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(pristine, workdir)
  manager = checkpoint.open_reader(str(workdir))
  read = _restore_fn(manager)
  seen = []

  def rotating_read(step):
    seen.append(step)
    if step == 2:
      # The writer saves step 3 and rotates step 2 away while this reader reads step 2.
      writer = checkpoint.create_writer(str(workdir), keep=1, async_save=False)
      checkpoint.save(writer, 3, _state(3), data_state={"pos": 30},
                      config_json=json.dumps({"lr": 1e-3 * 3, "name": "toy"}))
      checkpoint.wait(writer)
      writer.close()
    return read(step)

  step, result = checkpoint.restore_newest(manager, rotating_read, move_damaged=False)
  assert (step, seen) == (3, [2, 3])
  _assert_is_step(result, 3)
  with pytest.raises(checkpoint.MissingStepError, match=r"no checkpoint at step 2 .* \[3\]"):
    checkpoint.restore_newest(manager, read, move_damaged=False, step=2)
  manager.close()


def _train_config(num_train_steps: int = 2):
  from configs import test as test_config
  config = test_config.get_config()
  config.training.eval_every_steps = None
  config.training.num_train_steps = num_train_steps
  config.training.ckpt_every_steps = 1
  config.training.log_every_steps = 1
  return config


def _contents(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
          for p in sorted(root.rglob("*"))}


def test_load_checkpoint_never_returns_a_step_whose_digest_was_removed(tmp_path):
  import score_jax
  from score_jax import experiment, train
  workdir = str(tmp_path)
  train.train_and_evaluate(experiment.build(_train_config()), workdir, num_devices=1)
  step2 = tmp_path / "checkpoints" / "2"
  shutil.rmtree(step2 / "digest")
  _damage(_array_files(step2)[0], "flip")
  _, state = score_jax.load_checkpoint(workdir)
  assert int(state.step) == 1
  with pytest.raises(checkpoint.UndigestedCheckpointError, match="checkpoint 2 in .* no digest/"):
    score_jax.load_checkpoint(workdir, step=2)
  # Without any digest left, nothing is read unless the caller says these steps predate digests.
  shutil.rmtree(tmp_path / "checkpoints" / "1" / "digest")
  with pytest.raises(checkpoint.UndigestedCheckpointError, match="allow_undigested=True"):
    score_jax.load_checkpoint(workdir)
  _, state = score_jax.load_checkpoint(workdir, step=1, allow_undigested=True)
  assert int(state.step) == 1


def test_a_nan_ema_checkpoint_is_never_resumed_nor_named_last_good(tmp_path, monkeypatch, capsys):
  from score_jax import experiment, train
  workdir = str(tmp_path)
  state = train.train_and_evaluate(experiment.build(_train_config()), workdir, num_devices=1)
  config = _train_config()
  # Step 3: finite parameters, NaN EMA, with a valid digest (saved past the guard).
  manager = checkpoint.create_writer(workdir, async_save=False)
  state, data_state = checkpoint.restore(manager, 2, state)
  nan_ema = jax.tree.map(lambda a: np.full(a.shape, np.nan, a.dtype), state.ema_params)
  with monkeypatch.context() as m:
    m.setattr(checkpoint, "nonfinite_leaves", lambda state: [])
    checkpoint.save(manager, 3, state.replace(step=state.step + 1, ema_params=nan_ema),
                    data_state=data_state, config_json=config.to_json())
  checkpoint.wait(manager)
  manager.close()
  capsys.readouterr()
  final = train.train_and_evaluate(experiment.build(_train_config(4)), workdir, num_devices=1)
  captured = capsys.readouterr()
  assert "resumed from checkpoint 2 " in captured.out
  assert "checkpoint 3 in" in captured.err
  assert re.search(r"non-finite values \(\.ema_params\[0\]", captured.err), captured.err
  assert (tmp_path / "checkpoints" / "damaged" / "3").is_dir()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(final.ema_params)))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3", "4", "damaged"]


def test_a_workdir_whose_steps_were_all_moved_aside_is_not_trained_into_again(tmp_path):
  from conftest import run_main
  from score_jax import experiment, train
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(experiment.build(_train_config()), workdir, num_devices=1)
  for s in ("1", "2"):
    _damage(_array_files(tmp_path / "run" / "checkpoints" / s)[0], "flip")
  with pytest.raises(checkpoint.CheckpointError, match="every checkpoint .* is damaged"):
    train.train_and_evaluate(experiment.build(_train_config()), workdir, num_devices=1)
  assert checkpoint.damaged_steps(workdir) == ["1", "2"]
  before = _contents(tmp_path / "run")
  assert before["metrics.jsonl"]
  # The same command again: refused in one line, nothing changed, the old run's logs kept.
  with pytest.raises(checkpoint.CheckpointError, match="--restart_from_scratch") as e:
    train.train_and_evaluate(experiment.build(_train_config()), workdir, num_devices=1)
  assert "\n" not in str(e.value)
  assert _contents(tmp_path / "run") == before
  result = run_main("--config=configs/test.py", f"--workdir={workdir}", timeout=300)
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert "was found damaged and moved" in lines[0] and "--restart_from_scratch" in lines[0]
  assert _contents(tmp_path / "run") == before
  # The explicit choice trains from step 0 here.
  state = train.train_and_evaluate(experiment.build(_train_config()), workdir, num_devices=1,
                                   restart_from_scratch=True)
  assert int(state.step) == 2
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["1", "2", "damaged"]


def test_closed_loop_callbacks_are_dropped_and_other_unraisables_passed_on():
  import asyncio
  import types
  passed = []
  hook = checkpoint._drop_closed_loop_callbacks(passed.append)
  loop = asyncio.new_event_loop()
  loop.close()
  for call in (lambda: loop.call_soon_threadsafe(print), lambda: loop.run_until_complete(None)):
    try:
      call()
    except (RuntimeError, TypeError) as e:
      hook(types.SimpleNamespace(exc_value=e, exc_traceback=e.__traceback__))
  # The late done-callback on Orbax's closed loop is dropped; the other error is passed on.
  assert len(passed) == 1 and passed[0].exc_value is not None
  assert "call_soon_threadsafe" not in str(passed[0].exc_value)


def test_a_step_vanishing_while_the_reader_lists_them_is_listed_again(pristine, monkeypatch):
  import orbax.checkpoint as ocp
  real = ocp.CheckpointManager._load_checkpoint_infos
  calls = []

  def listing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
      # What a listing raises when rotation removes a step between the directory listing and
      # the read of that step's metadata.
      raise FileNotFoundError(2, "No such file or directory",
                              str(pristine / "checkpoints" / "1" / "_CHECKPOINT_METADATA"))
    return real(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "_load_checkpoint_infos", listing)
  manager = checkpoint.open_reader(str(pristine))
  assert checkpoint.all_steps(manager) == [1, 2] and len(calls) == 2
  manager.close()


def test_eval_skips_a_checkpoint_rotated_away_before_its_turn(tmp_path, monkeypatch, capsys):
  from score_jax import evaluate, experiment, train
  workdir = str(tmp_path)
  config = _train_config(3)
  train.train_and_evaluate(experiment.build(config), workdir, num_devices=1)
  config.eval.num_samples = config.eval.batch_size = 64
  real = experiment.load_checkpoint

  def rotating_load(path, step=None, **kwargs):
    if step == 1:
      # The training run saves step 4 and rotates step 1 away just before step 1's turn.
      state = real(path, 3)[1]
      writer = checkpoint.create_writer(path, keep=3, async_save=False)
      checkpoint.save(writer, 4, state.replace(step=state.step + 1), data_state={"pos": 0},
                      config_json=config.to_json())
      checkpoint.wait(writer)
      writer.close()
    return real(path, step, **kwargs)

  monkeypatch.setattr(experiment, "load_checkpoint", rotating_load)
  rows = evaluate.evaluate_checkpoints(experiment.build(config), workdir)
  assert [r["step"] for r in rows] == [2, 3]
  assert ("note: checkpoint 1 was removed by the training run's rotation"
          in capsys.readouterr().err)
