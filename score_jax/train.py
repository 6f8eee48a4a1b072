"""Training: the host loop: restore or initialize, train, log, evaluate, save.

The per-device steps are in `steps.py`; it takes the `experiment.Experiment` that
`experiment.build` made from the config (the training spec, data spec, model and noise ladder).
Re-running the same command in the same workdir resumes from the newest intact checkpoint. One
writer per workdir (`workdir_lock`); a state that is not finite is never saved.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np

from score_jax import checkpoint, parallel, steps, stored_config, workdir_lock
from score_jax import progress as progress_lib
from score_jax.experiment import Experiment, TrainSpec
from score_jax.metric_writers import MetricWriter
from score_jax.train_state import TrainState, param_count


class TrainingError(RuntimeError):
  """Training cannot go on (for example a non-finite loss)."""


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint at a step every process agreed on."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"stopped at step {step} on SIGTERM (preemption); checkpoint {step} saved "
                     f"in {workdir}; rerun the same command to resume")
    self.step = step



def _reduce_interval(history: list[dict]) -> dict[str, Any]:
  """Averages a logging interval's metrics (per step, or stacked `[k]` per fused dispatch).

  Scalars are averaged over steps; the per-level loss is the interval's sum over count per level.
  """
  host = jax.device_get(history)
  out = {k: float(np.mean(np.concatenate([np.ravel(h[k]) for h in host])))
         for k in host[0] if not k.startswith("level_")}
  for name, sum_key, count_key in (("loss", "level_loss_sum", "level_count"),
                                   ("d_acc_fake", "level_d_acc_fake_sum", "level_d_count")):
    if sum_key in host[0]:
      num_scales = np.shape(host[0][sum_key])[-1]
      total = sum(np.reshape(h[sum_key], (-1, num_scales)).sum(0) for h in host)
      count = sum(np.reshape(h[count_key], (-1, num_scales)).sum(0) for h in host)
      out[f"{name}_per_level"] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
  return out


def _level_scalars(loss_per_level: np.ndarray, max_tags: int = 10,
                   tag: str = "loss") -> dict[str, float]:
  """Per-level values as at most `max_tags` TensorBoard scalars (contiguous level groups)."""
  groups = np.array_split(np.arange(len(loss_per_level)), min(max_tags, len(loss_per_level)))
  out = {}
  for g in groups:
    vals = loss_per_level[g]
    vals = vals[np.isfinite(vals)]
    if vals.size:
      out[f"{tag}_by_level/{g[0]:04d}-{g[-1]:04d}"] = float(vals.mean())
  return out


def _check_intervals(t: TrainSpec) -> None:
  k = t.steps_per_dispatch
  for name in ("num_train_steps", "log_every_steps", "ckpt_every_steps", "eval_every_steps"):
    v = getattr(t, name)
    if v is not None and v % k:
      raise ValueError(f"training.{name}={v} must be a multiple of "
                       f"training.steps_per_dispatch={k}")


def train_and_evaluate(exp: Experiment, workdir: str, *,
                       num_devices: int | None = None, allow_undigested: bool = False,
                       restart_from_scratch: bool = False) -> TrainState:
  """Restores the latest checkpoint in `workdir` (or initializes), trains, logs, evaluates, saves.

  Re-running the same command in the same workdir resumes. Returns the final state.

  Args:
    exp: the run (`experiment.build` of its config).
    workdir: the run's directory.
    num_devices: use only the first N devices (None: all).
    allow_undigested: resume from a step without a digest, unverified (checkpoints written
      before digests existed).
    restart_from_scratch: train from step 0 in a workdir whose every step was found damaged and
      moved into `checkpoints/damaged/` (otherwise refused); the old run's logs are replaced.
  """
  t = exp.train
  _check_intervals(t)
  mesh = parallel.make_mesh(num_devices)
  local_batch = parallel.check_batch_size(t.batch_size, mesh)

  # The data source first: a missing dataset fails before anything is written to the workdir.
  train_iter = exp.data.iterator(split=exp.data.split, seed=exp.seed, batch_size=local_batch)
  # One writer per workdir, locked before anything is written there (a refused run changes
  # nothing); the lock goes with the process, so a crash releases it. Process 0 alone takes it,
  # and its decision reaches every process: a refused lock ends all of them the same way.
  lock = None

  def take_lock():
    nonlocal lock
    lock = workdir_lock.WorkdirLock(workdir).acquire()

  parallel.from_main(take_lock)
  try:
    return _train_locked(exp, workdir, mesh=mesh, local_batch=local_batch,
                         train_iter=train_iter, allow_undigested=allow_undigested,
                         restart_from_scratch=restart_from_scratch)
  finally:
    if lock is not None:
      lock.release()


def _train_locked(exp: Experiment, workdir: str, *, mesh, local_batch: int, train_iter,
                  allow_undigested: bool, restart_from_scratch: bool) -> TrainState:
  """`train_and_evaluate` once the workdir lock is held: restore-or-init, loop, log, save."""
  t = exp.train
  manager = checkpoint.create_writer(workdir, keep=t.keep_checkpoints,
                                     keep_every_steps=t.keep_every_steps,
                                     async_save=t.async_checkpoint)
  state = parallel.replicate(t.init_state(), mesh)

  def read(s: int):
    stored_config.check_compatible(
        checkpoint.restore_config(manager, s, allow_undigested=allow_undigested),
        exp.config_json, workdir)
    return checkpoint.restore(manager, s, state, allow_undigested=allow_undigested)

  try:
    # The newest step that verifies; damaged newer ones are moved into checkpoints/damaged/.
    found = checkpoint.restore_newest(manager, read, move_damaged=True,
                                      allow_undigested=allow_undigested)
    moved = checkpoint.damaged_steps(workdir) if found is None else []
    if moved and not restart_from_scratch:
      # An earlier run found every step damaged: training here would start from step 0 and
      # replace that run's logs, which only the user may choose.
      raise checkpoint.CheckpointError(
          f"every checkpoint of --workdir={workdir} was found damaged and moved to "
          f"{checkpoint.checkpoint_dir(workdir)}/{checkpoint.DAMAGED_DIR}/ (steps {moved}); "
          "nothing was changed. Restore a copy of the checkpoints, use another --workdir, or "
          "pass --restart_from_scratch to train from step 0 here (replacing this run's logs)")
  except BaseException:
    manager.close()
    raise
  last_saved = None  # the newest step on disk that holds a finite, verified state
  if found is not None:
    last_saved, (state, data_state) = found
    train_iter.set_state(data_state)
    if parallel.is_main_process():
      print(f"resumed from checkpoint {last_saved} in {workdir}")

  main = parallel.is_main_process()
  # Logs continue from the restored step: rows and events past it are dropped.
  writer = MetricWriter(workdir, start_step=last_saved or 0) if main else None
  n_params = param_count(state.params)
  if main:
    print(f"model {exp.model_name}: {n_params:,} parameters; {mesh.size} device(s), "
          f"global batch {t.batch_size}")

  k = t.steps_per_dispatch
  fused = None if k == 1 else k
  # The adversarial step reads one batch per discriminator update (steps.py). The data state
  # saved with step k is past all the batches of steps 1..k, so a run resumed there reads next
  # exactly the batches the uninterrupted run's step k + 1 read.
  per_step = t.batches_per_step
  p_train_step = parallel.data_parallel(t.step_fn, mesh, fused_steps=fused,
                                       batches_per_step=per_step)
  p_eval_step = parallel.data_parallel(
      lambda p, b, r: (p, steps.eval_step(p, b, r, **t.loss_kwargs)), mesh, donate_state=False)
  run_rng = jax.random.key(exp.seed)
  eval_rng = exp.key("eval_loss")

  step = int(jax.device_get(state.step))
  progress = progress_lib.bar(t.num_train_steps, "train", unit="step", initial=step,
                              compiling="train step", enabled=t.progress_bar)
  history: list[dict] = []
  eval_batch = None
  window = parallel.DispatchWindow()
  last_log_time, last_log_step = time.time(), step

  def stacked(batches: list[dict]) -> dict:
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

  def step_batch():
    """One step's data: a batch, or `per_step` of them stacked in reading order."""
    if per_step == 1:
      return next(train_iter)
    return stacked([next(train_iter) for _ in range(per_step)])

  def next_batch():
    if fused is None:
      return parallel.shard_batch(step_batch(), mesh, batches_per_step=per_step)
    return parallel.shard_batch(stacked([step_batch() for _ in range(k)]), mesh, fused_steps=k,
                                batches_per_step=per_step)

  def raise_if_nonfinite():
    # On the host: `device_get` only waits, where jnp.sum would queue more device programs.
    if history and float(np.sum(jax.device_get([h["nonfinite"] for h in history]))) > 0:
      raise TrainingError(
          f"non-finite loss or gradient between steps {last_log_step} and {step}; training "
          f"stopped and nothing was saved ({last_good()}). "
          f"Lower optim.lr, set optim.grad_clip, or check the data range")

  def last_good() -> str:
    return f"last good checkpoint: {'none' if last_saved is None else last_saved} in {workdir}"

  preemption = parallel.PreemptionWatch()
  preempted = False
  try:
    while step < t.num_train_steps:
      state, metrics = p_train_step(state, next_batch(), run_rng)
      window.add(metrics)
      step += k
      history.append(metrics)
      progress.update(k)

      if step % t.log_every_steps == 0 or step == t.num_train_steps:
        raise_if_nonfinite()
        summary = _reduce_interval(history)
        now = time.time()
        summary["steps_per_sec"] = (step - last_log_step) / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step, history = now, step, []
        per_level = {k: summary.pop(k) for k in list(summary) if k.endswith("_per_level")}
        if "loss_per_level" in per_level:
          summary.update(_level_scalars(per_level["loss_per_level"]))
        if "d_acc_fake_per_level" in per_level:
          summary.update(_level_scalars(per_level["d_acc_fake_per_level"], tag="d_acc_fake"))
        if writer:
          writer.write(step, summary, **{k: [None if math.isnan(v) else v for v in a.tolist()]
                                         for k, a in per_level.items()})
        progress.update(0, loss=f"{summary['loss']:.4g}")

      if t.eval_every_steps and step % t.eval_every_steps == 0:
        if eval_batch is None:
          eval_iter = exp.data.iterator(split=exp.data.eval_split, seed=exp.seed + 1,
                                        batch_size=local_batch, shuffle=False)
          eval_batch = parallel.shard_batch(next(eval_iter), mesh)
        # Finished before the next step is launched (see parallel.MAX_STEPS_IN_FLIGHT).
        with progress.paused(compiling="eval step"):
          _, eval_metrics = jax.block_until_ready(
              p_eval_step(state.ema_params[0], eval_batch, eval_rng))
        if writer:
          writer.write(step, {"eval_loss_ema": eval_metrics["loss"]})
        if not math.isfinite(float(eval_metrics["loss"])):
          raise TrainingError(
              f"the EMA parameters' evaluation loss is not finite at step {step}; training "
              f"stopped and nothing was saved ({last_good()}). Lower optim.lr, set "
              "optim.grad_clip, or check the data range")

      # Every process asks at every dispatch, so all of them stop at the same step.
      preempted = preemption.should_stop(step // k)
      if step % t.ckpt_every_steps == 0 or step == t.num_train_steps or preempted:
        raise_if_nonfinite()
        try:
          with progress.paused():
            checkpoint.save(manager, step, state, data_state=train_iter.get_state(),
                            config_json=exp.config_json)
        except checkpoint.NonFiniteStateError as e:
          # E.g. a finite loss and gradient whose update overflows the parameters.
          raise TrainingError(f"{e}; training stopped ({last_good()}). Lower optim.lr, set "
                              "optim.grad_clip, or check the data range") from None
        last_saved = step
      if preempted:
        break
  finally:
    preemption.close()
    progress.close()
    try:
      checkpoint.wait(manager)
    finally:
      # Even when a save failed (a full disk): its other writer threads are joined here, not
      # left to fail at interpreter exit.
      try:
        manager.close()
      finally:
        if writer:
          writer.close()
  if preempted:
    raise Preempted(step, workdir)
  return state

