"""The settings of `--mode=sampler_sweep`: the grid of sampler knobs, and how settings group.

Each sampler reads some knobs (`_METHOD_KNOBS`, from its registry entry); a knob it does not read
is None in its settings, so the grid holds each real setting once. Settings that differ only in
step_lr (ALS, CAS) form a group that the sweep can run as one program vmapped over the step sizes
(`Experiment.parallel_sampler` with a `grid`).
"""

from __future__ import annotations

from score_jax import sampling

# Sampler arguments the sweep grid sets per sampler (`SamplerEntry.sweep_knobs`; others are
# recorded as None and not swept); `eval.sweep_steps_per_sigma` gives ALS's steps and PC's
# corrector steps per level.
_METHOD_KNOBS = {name: e.sweep_knobs for name, e in sampling.SAMPLERS.items()}
_METHODS = tuple(_METHOD_KNOBS)


def sweep_grid(methods: tuple[str, ...], step_lrs: tuple[float, ...],
               steps_per_sigma: tuple[int, ...], denoise: tuple[bool, ...],
               num_steps: tuple[int, ...] = (), rel_tols: tuple[float, ...] = ()) -> list[dict]:
  """The distinct sampler settings of the grid, in grid order.

  A knob the method does not read (CAS has no steps per level, PC no step_lr) is None, so the
  grid holds each real setting once. The ODE samplers (euler, heun, dpm_solver_pp_2m) take
  `num_steps` (the length of their configured ladder), the adaptive solver `rel_tols`; neither
  reads the shared `denoise`.
  """
  unknown = [m for m in methods if m not in _METHODS]
  if unknown:
    raise ValueError(f"eval.sweep_methods has unknown samplers {unknown}; use {_METHODS}")
  settings: list[dict] = []
  for method in methods:
    knobs = _METHOD_KNOBS[method]
    if sampling.SAMPLERS[method].kind != "annealed":
      grid = num_steps if "num_steps" in knobs else rel_tols
      if not grid:
        raise ValueError(f"eval.sweep_methods has {method}: give its grid in "
                         f"eval.{'sweep_num_steps' if 'num_steps' in knobs else 'sweep_rel_tols'}")
      for value in grid:
        s = {"method": method, "step_lr": None, "steps_per_sigma": None,
             "corrector_steps": None, "denoise": None,
             knobs[0]: int(value) if knobs[0] == "num_steps" else float(value)}
        if s not in settings:
          settings.append(s)
      continue
    for lr in step_lrs:
      for spp in steps_per_sigma:
        for den in denoise:
          s = {"method": method, "step_lr": float(lr) if "step_lr" in knobs else None,
               "steps_per_sigma": int(spp) if "steps_per_sigma" in knobs else None,
               "corrector_steps": int(spp) if "corrector_steps" in knobs else None,
               "denoise": bool(den)}
          if s not in settings:
            settings.append(s)
  return settings


def setting(entry: dict) -> dict:
  """A sweep entry's method and the sampler arguments it sets: its label in the log."""
  return {"method": entry["method"], **sampler_args(entry)}


def sampler_args(entry: dict) -> dict:
  """The sampler arguments a sweep entry sets (its method's knobs and `denoise`)."""
  return {k: entry[k] for k in (*_METHOD_KNOBS[entry["method"]], "denoise")
          if entry.get(k) is not None}


def step_lr_groups(entries: list[dict]) -> list[list[dict]]:
  """`entries` grouped by everything but step_lr (ALS/CAS only), in first-appearance order."""
  groups: dict[tuple, list[dict]] = {}
  for e in entries:
    key = ((e["method"], e.get("steps_per_sigma"), e["denoise"]) if e.get("step_lr") is not None
           else id(e))
    groups.setdefault(key, []).append(e)
  return list(groups.values())
