"""Sample quality of checkpoints and of sampler settings (`main.py --mode=eval|sampler_sweep`).

* `eval`: every checkpoint in the workdir (between `eval.begin_step` and `eval.end_step`) draws
  `eval.num_samples` samples with the configured sampler from its first EMA parameters; one JSON
  line per checkpoint goes to `<workdir>/eval_metrics.jsonl` (and TensorBoard `tb/eval_metrics`),
  then a table and the best checkpoint are printed, the table is written to
  `<workdir>/eval_metrics.csv` and the metrics against the step are plotted in `eval_metrics.png`.
* `sampler_sweep`: the latest checkpoint samples with every combination of `eval.sweep_methods` x
  `sweep_step_lrs` x `sweep_steps_per_sigma` x `sweep_denoise` (knobs a method does not use are
  dropped, and CAS step sizes outside its feasibility interval sigma_L^2 (1 -/+ gamma) are
  recorded as skipped with the reason); rows go to `<workdir>/sampler_sweep.jsonl`, a table
  sorted by the main metric is printed and written to `sampler_sweep.csv`, and the main metric
  against step_lr (one line per method, steps per level and denoising) to `sampler_sweep.png`.

Both modes resume: an entry whose `eval.records.entry_key` (checkpoint step, sampler settings,
number of samples, feature space, seed, digests of the feature weights and of the reference
statistics) already has a row in the JSON lines is not evaluated again; its stored row joins the
table, the CSV, the plot and the ranking. Within an entry, the features of each finished batch
of samples are kept under `<workdir>/eval_cache/batches/<digest>/` until the row is written, so
an evaluation interrupted mid-way continues from its last finished batch. Every row states its
protocol (`protocol`: sample count and reference set).

Samples are drawn over every device of every host (`sampling.make_parallel_sampler`): sample k comes
from the key folded from (seed, k), so the numbers do not depend on the device count, the hosts
or `eval.batch_size`. Inception and classifier features run over every device too
(`parallel.batch_map`). Progress bars (`tqdm.auto`) show the rate and the time left.

What is measured (`eval.features`, `score_jax.eval.evaluators`): MMD and energy distance to the
true distribution for toys; FID, KID and IS on the FID Inception network's features for images;
FID and KID on the features of the project's MNIST classifier for digits. The parts live in
`score_jax.eval`: the evaluators (`evaluators`, with `feature_nets` and `reference_stats`),
the batched, resumable drawing of features (`batches`), the sweep grid (`sweep`) and the rows,
tables and plots (`records`); the samplers are the run's `Experiment.parallel_sampler` (the one
multi-device wrapper, compiled once per setting, the params an argument); this module is the
host loop.

The modes take the run's `experiment.Experiment` (`experiment.build`): its model, ladder and
sampler specs, and its `eval` and `data` specs; never a config. Every draw uses keys of the run's
"eval" stream (`Experiment.key`), the same for every checkpoint and every sweep setting (common
random numbers), so evaluations are reproducible and comparable.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import jax
import numpy as np

from score_jax import (checkpoint, experiment, noise, parallel, rng_streams, samplers,
                       sampling, stored_config)
from score_jax import paths as storage
from score_jax.config_schema import UsageError, sampler_fix_hint
from score_jax.eval import sweep
from score_jax.eval.batches import (batch_cache_dir, draw_features, draw_features_stacked,
                                    drop_batches)
from score_jax.eval.evaluators import (MAIN_METRICS, Evaluator, feature_kind,
                                       make_evaluator, score_finite)
from score_jax.eval.feature_nets import Features
from score_jax.eval.records import (as_float, entry_key, format_table, plot_eval, plot_sweep,
                                    rank_key, stored_rows, table_metric_columns, write_outputs,
                                    write_row)
from score_jax.experiment import EvalSpec, Experiment
from score_jax.metric_writers import MetricWriter
from score_jax.train_state import TrainState


# --------------------------------------------------------------------------------------------
# One entry: restore, sample, measure, record.


def _checkpoint_steps(workdir: str) -> list[int]:
  """The checkpoint steps in `workdir`, ascending (read-only); CheckpointError when none.

  Every process opens the reader (Orbax synchronizes the processes there), and process 0's list
  reaches all of them: a checkpoint that training writes meanwhile must not make the processes
  evaluate different steps.
  """
  manager = checkpoint.open_reader(workdir)
  try:
    steps = checkpoint.all_steps(manager)
  finally:
    manager.close()
  return parallel.from_main(lambda: steps)


def _check_finite(row: dict, *, fatal: bool) -> None:
  """Warns about a row with non-finite samples; with `fatal`, all non-finite is an error."""
  fraction = row.get("finite_fraction", 1.0)
  if fraction == 0.0 and fatal:
    raise sampling.NonFiniteSamplesError(
        f"all {row['num_samples']} samples at step {row['step']} are non-finite "
        f"({row['method']}, step_lr={row['step_lr']}); no metrics computed. "
        f"{sampler_fix_hint(row['method']).capitalize()} or check the checkpoint")
  if fraction < 1.0 and parallel.is_main_process():
    print(f"warning: {1 - fraction:.1%} of the samples at step {row['step']} ({row['method']}, "
          f"step_lr={row['step_lr']}) are non-finite; metrics use the finite ones",
          file=sys.stderr)


def _restore(exp: Experiment, workdir: str, step: int | None,
             allow_undigested: bool) -> TrainState:
  """The checkpoint's state, after checking that `exp` describes the same model and data."""
  stored, state = experiment.load_checkpoint(workdir, step, allow_undigested=allow_undigested)
  stored_config.check_compatible(json.loads(stored.to_json()),
                                 stored_config.config_from_dict(json.loads(exp.config_json)),
                                 workdir)
  return state


def _batches(p_sample: sampling.ParallelSampler, params: Any, rng: jax.Array):
  """`(start, n) -> (samples [n, ...], nfe [n])` of `p_sample` with fixed params and key (the
  batches `draw_features` asks for)."""
  sample_rng = rng_streams.fold(rng, "eval.samples")

  def batch(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x, info = p_sample(params, sample_rng, start, n)
    return x, info["nfe"]

  return batch


def _evaluate_sampler(p_sample: sampling.ParallelSampler, params: Any, evaluator: Evaluator,
                      entry: dict, ev: EvalSpec, workdir: str, rng: jax.Array,
                      desc: str) -> tuple[dict[str, Any], str]:
  """Measures one sampler setting; returns the measurements and its batch cache directory."""
  start = time.time()
  cache_dir = batch_cache_dir(workdir, [entry], ev.batch_size)
  features = draw_features(_batches(p_sample, params, rng), evaluator,
                           num_samples=ev.num_samples, batch_size=ev.batch_size,
                           cache_dir=cache_dir, desc=desc)
  measured = {**_score(evaluator, features), "seconds": time.time() - start}
  return measured, cache_dir


def _score(evaluator: Evaluator, features: Features) -> dict[str, Any]:
  """`score_finite`'s metrics, plus `nfe` (mean network evaluations per sample) when drawn."""
  nfe = features.pop("nfe", None)
  return {**score_finite(evaluator, features),
          **({} if nfe is None else {"nfe": float(np.mean(nfe))})}


def _evaluate_step_lrs(exp: Experiment, state: TrainState, entries: list[dict],
                       evaluator: Evaluator, workdir: str, rng: jax.Array
                       ) -> tuple[list[dict[str, Any]], str]:
  """Evaluates settings that differ only in step_lr as one program vmapped over the step sizes.

  Each setting draws the samples `_evaluate_sampler` would give it alone, so the numbers equal a
  one-setting-at-a-time sweep up to float rounding; `seconds` is the group's time per setting.
  """
  e0 = entries[0]
  p_sample = exp.parallel_sampler(e0["method"], mesh=parallel.make_mesh(),
                                  grid={"step_lr": [e["step_lr"] for e in entries]},
                                  **sweep.sampler_args(e0))
  ev = exp.eval
  cache_dir = batch_cache_dir(workdir, entries, ev.batch_size)
  start = time.time()
  features = draw_features_stacked(_batches(p_sample, exp.sampling.params(state), rng),
                                   evaluator, num_samples=ev.num_samples,
                                   batch_size=ev.batch_size, cache_dir=cache_dir,
                                   desc=f"sweep {e0['method']} x{len(entries)} step_lr")
  seconds = (time.time() - start) / len(entries)
  return [{**_score(evaluator, f), "seconds": seconds, "vmapped_settings": len(entries)}
          for f in features], cache_dir


def _entry(exp: Experiment, evaluator: Evaluator, kind: str, **settings) -> dict:
  """An evaluation's settings: checkpoint, sampler, sample count, features, seed, reference."""
  identity = dict(evaluator.identity)
  identity["protocol"] = f"{exp.eval.num_samples} samples {identity.get('protocol', '')}".strip()
  return {**settings, "num_samples": exp.eval.num_samples, "features": kind,
          "seed": exp.seed, **identity}


def _record(writer: MetricWriter | None, fresh: dict[tuple, dict], entry: dict,
            measured: dict) -> dict:
  """The entry's row with its measurements, kept in `fresh` and written as one JSON line."""
  row = {**entry, **measured}
  fresh[entry_key(row)] = row
  write_row(writer, row, {k: v for k, v in measured.items() if k != "skipped"})
  return row


def _in_order(entries: list[dict], fresh: dict[tuple, dict], done: dict[tuple, dict]
              ) -> list[dict]:
  """The row of every entry, fresh or stored, in the entries' order."""
  return [fresh.get(entry_key(e)) or done[entry_key(e)] for e in entries]


def _split_done(entries: list[dict], path: str) -> tuple[dict[tuple, dict], list[dict]]:
  """The stored rows of `entries` (by key) and the entries still to evaluate, in order.

  Read by process 0 for every process, so all of them evaluate the same entries.
  """
  def split() -> tuple[dict[tuple, dict], list[dict]]:
    stored = stored_rows(path)
    done = {entry_key(e): stored[entry_key(e)] for e in entries if entry_key(e) in stored}
    return done, [e for e in entries if entry_key(e) not in done]

  return parallel.from_main(split)


# --------------------------------------------------------------------------------------------
# Modes.


def _feature_kind(exp: Experiment) -> str:
  """The run's feature space (`evaluators.feature_kind` of its eval and data specs)."""
  return feature_kind(exp.eval.features, dataset=exp.data.dataset,
                      image_size=exp.data.image_size, num_channels=exp.data.num_channels)


def _make_evaluator(exp: Experiment, workdir: str, rng: jax.Array) -> Evaluator:
  return make_evaluator(exp.eval, exp.data, workdir, rng, seed=exp.seed)


def evaluate_checkpoints(exp: Experiment, workdir: str, *,
                         allow_undigested: bool = False) -> list[dict]:
  """Samples from every checkpoint in range with the configured sampler; returns the rows.

  Checkpoints already evaluated with these settings (`entry_key`) in `eval_metrics.jsonl` are
  not evaluated again; their stored rows are returned, tabulated and plotted with the new ones.
  A checkpoint that a training run still writing the workdir rotates away before its turn is
  skipped with a note.
  """
  ev = exp.eval
  available = _checkpoint_steps(workdir)
  steps = [s for s in available if (ev.begin_step is None or s >= ev.begin_step) and
           (ev.end_step is None or s <= ev.end_step)]
  if not steps:
    raise UsageError(f"no checkpoint with eval.begin_step={ev.begin_step} <= step <= "
                     f"eval.end_step={ev.end_step} in {workdir}; available steps: {available}")
  kind = _feature_kind(exp)
  main_metric = MAIN_METRICS[kind]
  settings = exp.sampling.sampler().settings()
  rng = exp.key("eval")
  evaluator = _make_evaluator(exp, workdir, rng)
  entries = [_entry(exp, evaluator, kind, step=s, **settings) for s in steps]
  done, todo = _split_done(entries, storage.join(workdir, "eval_metrics.jsonl"))
  main = parallel.is_main_process()
  if main:
    print(f"[eval] {len(done)} of {len(entries)} checkpoints reused from eval_metrics.jsonl; "
          f"evaluating {len(todo)}", flush=True)
  fresh, skipped = {}, []
  if todo:
    sampler = exp.parallel_sampler(mesh=parallel.make_mesh())
    writer = MetricWriter(workdir, name="eval_metrics") if main else None
    try:
      for entry in todo:
        try:
          state = _restore(exp, workdir, entry["step"], allow_undigested)
        except checkpoint.MissingStepError:
          skipped.append(entry["step"])
          if main:
            print(f"note: checkpoint {entry['step']} was removed by the training run's "
                  "rotation (training.keep_checkpoints) before its turn; skipped",
                  file=sys.stderr, flush=True)
          continue
        measured, cache_dir = _evaluate_sampler(sampler, exp.sampling.params(state),
                                                evaluator, entry, ev, workdir, rng,
                                                desc=f"eval step {entry['step']}")
        row = _record(writer, fresh, entry, measured)
        drop_batches(cache_dir)
        _check_finite(row, fatal=True)
        if main:
          print(f"[eval] step {row['step']}: {main_metric}="
                f"{row.get(main_metric, float('nan')):.4g} ({row['seconds']:.1f}s)", flush=True)
    finally:
      if writer is not None:
        writer.close()
  rows = _in_order([e for e in entries if e["step"] not in skipped], fresh, done)
  if not rows:
    raise UsageError(f"every checkpoint of {workdir} in range was removed by the training run's "
                     "rotation before its turn; rerun, or raise training.keep_checkpoints")
  if main:
    paths = write_outputs(rows, main_metric, workdir, "eval_metrics", plot_eval)
    print(format_table(rows, ["step", "method", "nfe", "step_lr"] +
                       table_metric_columns(rows, main_metric)))
    best = min(rows, key=rank_key(main_metric))
    print(f"best checkpoint by {main_metric}: step {best['step']} "
          f"({main_metric}={as_float(best.get(main_metric)):.4g}); "
          f"{len(done)} of {len(rows)} rows reused")
    print(f"rows in {paths['jsonl']}; table {paths['csv']}; plot {paths['png']}")
  return rows


def sampler_sweep(exp: Experiment, workdir: str, *,
                  allow_undigested: bool = False) -> list[dict]:
  """Samples from the latest checkpoint with every sweep setting; returns the rows.

  The checkpoint is restored first, so the sweep uses the newest step at that moment even while
  a training run writes (and rotates) the workdir.

  Settings already in `sampler_sweep.jsonl` for this checkpoint (`entry_key`) are not evaluated
  again; their stored rows join the table, the CSV and the plot. With `eval.sweep_vmap`, settings
  that differ only in step_lr run as one compiled program vmapped over the step sizes (memory:
  the group's size times `eval.batch_size` samples at once).
  """
  ev = exp.eval
  settings = sweep.sweep_grid(tuple(ev.sweep_methods), tuple(ev.sweep_step_lrs),
                        tuple(ev.sweep_steps_per_sigma), tuple(ev.sweep_denoise),
                        tuple(ev.sweep_num_steps), tuple(ev.sweep_rel_tols))
  state = _restore(exp, workdir, None, allow_undigested)
  step = int(jax.device_get(state.step))
  kind = _feature_kind(exp)
  main_metric = MAIN_METRICS[kind]
  rng = exp.key("eval")
  evaluator = _make_evaluator(exp, workdir, rng)
  entries = [_entry(exp, evaluator, kind, step=step,
                    **{**exp.sampling.sampler(s["method"]).settings(), **s})
             for s in settings]
  done, todo = _split_done(entries, storage.join(workdir, "sampler_sweep.jsonl"))
  main = parallel.is_main_process()
  if main:
    print(f"[sweep] checkpoint step {step}: {len(done)} of {len(entries)} settings reused from "
          f"sampler_sweep.jsonl; evaluating {len(todo)}", flush=True)
  fresh = {}
  if todo:
    cas_ladder = samplers.cas_ladder(exp.sigmas, exp.sampling.sampler("cas").kwargs["n_sigma"])
    writer = MetricWriter(workdir, name="sampler_sweep", tensorboard=False) if main else None
    try:
      feasible = []
      for entry in todo:
        if entry["method"] == "cas":
          try:
            noise.check_cas_step_lr(cas_ladder, entry["step_lr"])
          except ValueError as e:
            row = _record(writer, fresh, entry, {"skipped": str(e)})
            if main:
              print(f"[sweep] {sweep.setting(entry)}: skipped: {row['skipped']}", flush=True)
            continue
        feasible.append(entry)
      for group in sweep.step_lr_groups(feasible):
        if len(group) > 1 and ev.sweep_vmap:
          results, cache_dir = _evaluate_step_lrs(exp, state, group, evaluator, workdir, rng)
          cache_dirs = [cache_dir]
        else:
          results, cache_dirs = [], []
          for entry in group:
            sampler = exp.parallel_sampler(entry["method"], mesh=parallel.make_mesh(),
                                           **sweep.sampler_args(entry))
            measured, cache_dir = _evaluate_sampler(
                sampler, exp.sampling.params(state), evaluator,
                entry, ev, workdir, rng, desc=f"sweep {sweep.setting(entry)}")
            results.append(measured)
            cache_dirs.append(cache_dir)
        for entry, measured in zip(group, results):
          row = _record(writer, fresh, entry, measured)
          _check_finite(row, fatal=False)  # a sweep maps where samplers diverge
          if main:
            print(f"[sweep] {sweep.setting(entry)}: "
                  f"{main_metric}={row.get(main_metric, float('nan')):.4g}", flush=True)
        for cache_dir in cache_dirs:
          drop_batches(cache_dir)
    finally:
      if writer is not None:
        writer.close()
  rows = _in_order(entries, fresh, done)
  if main:
    paths = write_outputs(rows, main_metric, workdir, "sampler_sweep", plot_sweep)
    ranked = sorted(rows, key=rank_key(main_metric))
    print(format_table(ranked, ["method", "nfe", "step_lr", "steps_per_sigma", "corrector_steps",
                                "num_steps", "rel_tol", "denoise"] +
                       table_metric_columns(rows, main_metric) + ["skipped"]))
    print(f"checkpoint step {step}; {len(done)} of {len(rows)} rows reused")
    print(f"rows in {paths['jsonl']}; table {paths['csv']}; plot {paths['png']}")
  return rows


def run(exp: Experiment, workdir: str, *, mode: str,
        allow_undigested: bool = False) -> list[dict]:
  """The `eval` or `sampler_sweep` mode of the CLI; returns the metric rows.

  `exp` must describe the checkpoint's model and data (checked as in `--mode=sample` with a
  `--config`); its `sampling` and `eval` specs choose how to sample and what to measure.
  """
  if mode == "eval":
    return evaluate_checkpoints(exp, workdir, allow_undigested=allow_undigested)
  if mode == "sampler_sweep":
    return sampler_sweep(exp, workdir, allow_undigested=allow_undigested)
