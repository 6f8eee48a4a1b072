"""Sampler assembly over plain values, and the one multi-device sampling wrapper.

`SAMPLERS` is the registry: each sampler a config can name, with what the code around the pure
samplers of `samplers.py` needs to know about it (`SamplerEntry`). Adding a sampler means its
function in `samplers.py`, its sub-group `sampling.<name>` in configs/default.py (and its fields in
`config_schema.FIELDS`), and one entry here; the lists of annealed and ODE samplers, the schema's
sampler choices, the sweep's knobs and the sample mode's random sub-streams derive from the entry.

`make_sample_fn` turns a network, its ladder, the example shape and a sampler's keyword arguments
into a pure `sample(params, rng, n)`. `make_parallel_sampler` is the only place that spreads a
sampler over devices and hosts (`parallel.shard_sampler`): sample k comes from the key folded from
`(rng, k)`, so the samples do not depend on the device count or the batch size. Nothing here reads
a config.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from score_jax import noise, parallel, samplers
from score_jax.score import make_score_fn

# How a sampler walks the noise levels, which decides its ladder, its start and its outputs:
#   "annealed": Markov chains through the trained ladder (ALS, CAS, PC); they take the shared
#     `sampling.denoise` and keep per-level trajectories (`return_trajectory`, `save_every`);
#   "ode": fixed-step solvers of the reverse SDE or probability-flow ODE through the ladder their
#     sub-group chooses (`sampling_ladder`), ending at sigma = 0;
#   "adaptive": the adaptive-step solver between two ends, with per-sample step counts.
KINDS = ("annealed", "ode", "adaptive")


def _check_cas(sigmas: jax.Array, kwargs: dict) -> dict:
  """CAS's step size (or per-level eta) checked against its ladder on the host (a tuple eta)."""
  ladder = np.asarray(samplers.cas_ladder(sigmas, kwargs.get("n_sigma", 1)))
  if kwargs.get("step_lr") is not None:
    noise.check_cas_step_lr(ladder, kwargs["step_lr"])
  if kwargs.get("eta") is not None:
    eta = np.asarray(kwargs["eta"], np.float32)
    kwargs["eta"] = float(eta.reshape(())) if eta.size == 1 else tuple(eta.tolist())
    samplers.check_cas_eta(ladder, np.asarray(kwargs["eta"]), "eta")
  return kwargs


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
  """What the assembly needs to know about one sampler of `samplers.py`.

  Attributes:
    fn: the pure sampler; "annealed" and "ode" kinds are `fn(score_fn, x_init, sigmas, rng,
      **kwargs)`, "adaptive" is `fn(score_fn, x_init, rng, **kwargs)`.
    kind: one of `KINDS`.
    stream: the sampler's sub-stream of the sample mode's "sample" key (`rng_streams`); distinct
      per sampler, so two samplers of one run draw independent noise.
    chain_init: starts from the configured `sampling.init` (U[0, 1] for the NCSN image Markov
      chains); otherwise from the VE prior N(0, sigma_start^2 I) (`initial_state`).
    batch_coupled: its update reads batch statistics (PC's step size uses batch-mean norms), so
      with per-example keys it runs one example per program under vmap.
    sweep_knobs: the arguments `--mode=sampler_sweep` sets from its grid (`eval.sweep`).
    check: `check(sigmas, kwargs) -> kwargs` run on the host before tracing: argument checks
      that need the ladder, and normalization of values that must be static.
  """
  fn: Callable[..., Any]
  kind: str
  stream: int
  chain_init: bool = False
  batch_coupled: bool = False
  sweep_knobs: tuple[str, ...] = ()
  check: Callable[[jax.Array, dict], dict] | None = None

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"SamplerEntry.kind={self.kind!r} is unknown; use one of {KINDS}")


# The samplers a config can name. Each takes the keyword arguments of its sub-group
# `sampling.<name>`; the annealed samplers also take the shared `sampling.denoise`, and the ODE
# samplers' sub-groups also choose the ladder they step through (`sampling_ladder`).
SAMPLERS: Mapping[str, SamplerEntry] = types.MappingProxyType({
    "als": SamplerEntry(samplers.annealed_langevin, "annealed", stream=1, chain_init=True,
                        sweep_knobs=("step_lr", "steps_per_sigma")),
    "cas": SamplerEntry(samplers.consistent_annealed, "annealed", stream=2, chain_init=True,
                        sweep_knobs=("step_lr",), check=_check_cas),
    "pc": SamplerEntry(samplers.predictor_corrector, "annealed", stream=3, batch_coupled=True,
                       sweep_knobs=("corrector_steps",)),
    "euler": SamplerEntry(samplers.euler, "ode", stream=4, sweep_knobs=("num_steps",)),
    "heun": SamplerEntry(samplers.heun, "ode", stream=5, sweep_knobs=("num_steps",)),
    "dpm_solver_pp_2m": SamplerEntry(samplers.dpm_solver_pp_2m, "ode", stream=6,
                                     sweep_knobs=("num_steps",)),
    "adaptive": SamplerEntry(samplers.adaptive, "adaptive", stream=7, sweep_knobs=("rel_tol",)),
})
ANNEALED_SAMPLERS = tuple(name for name, e in SAMPLERS.items() if e.kind == "annealed")
ODE_SAMPLERS = tuple(name for name, e in SAMPLERS.items() if e.kind == "ode")
LADDERS = ("trained", "geometric", "karras")
_LADDER_KEYS = ("ladder", "num_steps", "rho", "sigma_max", "sigma_min")
# Arguments whose None in a config means the sampler's own default (unbounded).
_UNBOUNDED = ("s_tmax", "h_max_factor")


def entry(method: str) -> SamplerEntry:
  """The registry entry of `method`, or a one-line error naming the samplers."""
  if method not in SAMPLERS:
    raise ValueError(f"sampling.method={method!r} is unknown; use one of {', '.join(SAMPLERS)}")
  return SAMPLERS[method]


def initial_state(method: str, configured: str) -> str:
  """The initial state of sampler `method`: `configured` (`sampling.init`) for the Markov chains
  that start where the reference code starts them, else the VE prior ("gaussian").

  ALS and CAS are Markov chains whose image configs start from U[0, 1] in the reference code
  (ermongroup/ncsn `anneal_runner.py`, ermongroup/ncsnv2 `runners/ncsn_runner.py`). The other
  samplers discretize the reverse VE SDE or its probability-flow ODE from sigma_max, whose marginal
  they assume at the start: the prior N(0, sigma_max^2 I) (Song et al. 2021, score_sde
  `sde_lib.py` `prior_sampling`; Karras et al. 2022, Algorithm 2, line 1; Jolicoeur-Martineau et
  al. 2021, Algorithm 1). A deterministic ODE sampler started from U[0, 1] would carry that
  mismatch into every sample.
  """
  return configured if entry(method).chain_init else "gaussian"


def sampling_ladder(sigmas: jax.Array, *, ladder: str = "trained", num_steps: int | None = None,
                    rho: float = 7.0, sigma_max: float | None = None,
                    sigma_min: float | None = None) -> jax.Array:
  """The descending ladder `[N]` a fixed-step ODE sampler steps through (then to sigma = 0).

  Args:
    sigmas: `[L]` the trained ladder (concrete).
    ladder: "trained" (the trained ladder itself), "geometric" (`num_steps` levels spaced
      geometrically) or "karras" (EDM's rho-schedule, Karras et al. 2022, Eq. 5).
    num_steps: N for "geometric" and "karras"; must be None for "trained".
    rho: the exponent of "karras".
    sigma_max, sigma_min: the ends of "geometric" and "karras"; None: the trained ones.
  """
  if ladder not in LADDERS:
    raise ValueError(f"ladder={ladder!r} is unknown; use one of {', '.join(LADDERS)}")
  if ladder == "trained":
    if num_steps is not None or sigma_max is not None or sigma_min is not None:
      raise ValueError("ladder='trained' steps through the trained sigmas: leave num_steps, "
                       "sigma_max and sigma_min None, or choose ladder='geometric' or 'karras'")
    return jnp.asarray(sigmas, jnp.float32)
  if num_steps is None:
    raise ValueError(f"ladder={ladder!r} needs num_steps (the number of levels, >= 2)")
  hi = float(sigmas[0]) if sigma_max is None else float(sigma_max)
  lo = float(sigmas[-1]) if sigma_min is None else float(sigma_min)
  if ladder == "geometric":
    return noise.geometric_sigmas(hi, lo, num_steps)
  return noise.karras_sigmas(hi, lo, num_steps, rho)


def make_sample_fn(model: nn.Module, sigmas: jax.Array, shape: tuple[int, ...], *, method: str,
                   init: str = "gaussian", return_trajectory: bool = False,
                   save_every: int | None = None, return_info: bool = False,
                   **kwargs) -> Callable[..., Any]:
  """`sample(params, rng, n)` drawing `n` samples of `shape` with the named sampler (pure).

  `rng` is either one key (shape `()`: the batch's noise is drawn together, the fastest path) or
  a batch of per-example keys `[b]` (then `n` may be None): example i's initial state and its
  noise at every step come only from `rng[i]`, so a sample does not depend on the batch it is
  drawn in (the convention of EDM, Karras et al. 2022). With per-example keys the trajectory
  statistics and snapshots of `return_trajectory`/`save_every` are per example (leading axis b),
  and the predictor-corrector's step size uses each example's own norms instead of batch means.

  Args:
    model: the score network.
    sigmas: `[L]` descending noise ladder the network was trained on.
    shape: shape of one sample.
    method: a key of `SAMPLERS`.
    init: "uniform" draws U[0, 1] as the NCSN image samplers do; "gaussian" draws the VE prior
      N(0, sigma_start^2 I) with sigma_start the first level the sampler steps through (the
      trained sigma_1, or the sub-group's `sigma_max`).
    return_trajectory, save_every: passed to the annealed samplers (ALS, CAS, PC); the others
      keep no per-level statistics and ignore them.
    return_info: return `(samples, info)` with info["nfe"] (network evaluations per sample;
      `[n]` for the adaptive solver). `return_trajectory` implies it.
    **kwargs: the sampler's own keyword arguments (its config sub-group, plus `denoise` for the
      annealed samplers).

  `sample(params, rng, n, **changes)` replaces sampler arguments at call time (they may be traced,
  e.g. a vmapped `step_lr` grid; CAS feasibility is then the caller's to check).
  """
  spec = entry(method)
  if init not in ("uniform", "gaussian"):
    raise ValueError(f"sampling.init={init!r} is unknown; use 'uniform' or 'gaussian'")
  kwargs = dict(kwargs)
  if spec.check is not None:
    kwargs = spec.check(sigmas, kwargs)
  for unbounded in _UNBOUNDED:
    if unbounded in kwargs and kwargs[unbounded] is None:
      del kwargs[unbounded]
  ladder, start = sigmas, sigmas[0]
  if spec.kind == "annealed":
    options = dict(return_trajectory=return_trajectory, save_every=save_every,
                   return_info=return_info)
  else:
    options = dict(return_info=return_info or return_trajectory)
  if spec.kind == "ode":
    ladder = sampling_ladder(sigmas, **{k: kwargs.pop(k) for k in _LADDER_KEYS if k in kwargs})
    start = ladder[0]
  elif spec.kind == "adaptive":
    for end, default in (("sigma_max", sigmas[0]), ("sigma_min", sigmas[-1])):
      kwargs[end] = float(default) if kwargs.get(end) is None else float(kwargs[end])
    start = kwargs["sigma_max"]
  # One example per program under vmap where a batch would couple examples: PC's step size
  # (batch-mean norms) and the trajectory statistics (batch means) are then per example.
  one_at_a_time = return_trajectory or save_every is not None or spec.batch_coupled

  def init_state(rng, n):
    if init == "uniform":
      return jax.random.uniform(rng, (n, *shape))
    return start * jax.random.normal(rng, (n, *shape))

  def draw(params, x0, rng, changes):
    args = {**kwargs, **changes, **options}
    score_fn = make_score_fn(model, params)
    if spec.kind == "adaptive":
      return spec.fn(score_fn, x0, rng, **args)
    return spec.fn(score_fn, x0, ladder, rng, **args)

  def per_example(params, keys, changes):
    pairs = jax.vmap(jax.random.split)(keys)
    x0 = jax.vmap(lambda k: init_state(k, 1)[0])(pairs[:, 0])
    if not one_at_a_time:
      return draw(params, x0, pairs[:, 1], changes)
    nfe = []

    def one(x, key):
      out = draw(params, x[None], key[None], changes)
      if not isinstance(out, tuple):
        return out[0]
      x, info = out
      if spec.kind == "adaptive":
        # Per-example counts and flags (nfe, accepted, rejected, done): out through vmap as [b].
        info = {k: v[0] for k, v in info.items()}
      else:  # one static count for every example, known when traced
        nfe.append(info.pop("nfe"))
      if "samples" in info:
        info["samples"] = info["samples"][:, 0]
      return x[0], info

    out = jax.vmap(one)(x0, pairs[:, 1])
    return (out[0], {**out[1], "nfe": nfe[0]}) if nfe else out

  def sample(params, rng, n=None, **changes):
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      raise ValueError("sample: rng must be a typed key (jax.random.key) or a batch of them, "
                       f"got dtype {rng.dtype}")
    if rng.ndim == 1:
      if n is not None and n != rng.shape[0]:
        raise ValueError(f"sample: n={n} differs from the {rng.shape[0]} per-example keys")
      return per_example(params, rng, changes)
    if rng.ndim != 0 or n is None:
      raise ValueError(f"sample: rng must be one key with n given, or keys [b]; got shape "
                       f"{rng.shape}, n={n}")
    init_rng, rng = jax.random.split(rng)
    return draw(params, init_state(init_rng, n), rng, changes)

  return sample


@dataclasses.dataclass(frozen=True)
class ParallelSampler:
  """A sampler compiled once over every device of every host, taking the params as an argument.

  `sampler(params, rng, start, n) -> (samples [n, ...], info)` draws samples start..start+n-1 of
  one sequence (sample k from the key folded from `(rng, k)`, `parallel.shard_sampler`); info
  holds "nfe" `[n]` (network evaluations per sample) and the per-example trajectory arrays.
  With a grid (`make_parallel_sampler(..., grid=...)`) the samples are `[n, k, ...]`, one per
  grid point. `draw` is the host loop over batches.
  """
  method: str
  _p_sample: Callable[..., Any]
  _static: dict  # {"nfe": count} once traced, for samplers whose count is known when traced

  def __call__(self, params: Any, rng: jax.Array, start: int, n: int
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    x, info = self._p_sample(params, rng, start, n)
    if "nfe" in self._static:
      info = {**info, "nfe": np.full((len(x),), self._static["nfe"])}
    return x, info

  def draw(self, params: Any, rng: jax.Array, n: int, *, batch_size: int, start: int = 0,
           on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict]:
    """Samples start..start+n-1 in batches of `batch_size`, as host arrays.

    `on_batch(count)` is called after each batch (progress bars). Per-example trajectories come
    back in the samplers' batch layout: statistics averaged over the samples `[L']`, snapshots
    `[L' // save_every, n, ...]`; per-sample counts (the adaptive solver's nfe, accepted and
    rejected steps) stay `[n]`, and a count known when traced is one int.
    """
    b = min(batch_size, n)
    parts = []
    for first in range(start, start + n, b):
      parts.append(self._p_sample(params, rng, first, b))
      if on_batch is not None:
        on_batch(min(b, start + n - first))
    x, info = jax.tree.map(lambda *v: np.concatenate(v)[:n], *parts)
    info = {k: np.swapaxes(v, 0, 1) if k == "samples" else
            (np.mean(v, axis=0) if np.ndim(v) >= 2 else v) for k, v in info.items()}
    return x, {**info, **self._static}


def make_parallel_sampler(model: nn.Module, sigmas: jax.Array, shape: tuple[int, ...], *,
                          method: str, mesh: jax.sharding.Mesh, init: str = "gaussian",
                          kwargs: Mapping[str, Any] | None = None,
                          return_trajectory: bool = False, save_every: int | None = None,
                          grid: Mapping[str, Sequence[float]] | None = None) -> ParallelSampler:
  """`make_sample_fn` over all devices of `mesh`: the one multi-device sampling wrapper.

  Args:
    model, sigmas, shape, method, init, return_trajectory, save_every: as `make_sample_fn`.
    mesh: the devices (`parallel.make_mesh`).
    kwargs: the sampler's keyword arguments.
    grid: sampler arguments to vmap over, each a sequence of k values of the same length (the
      sampler sweep's step sizes, `eval.sweep_vmap`): one program draws every grid point's
      samples, each those its own sampler draws up to float rounding.
  """
  fn = make_sample_fn(model, sigmas, shape, method=method, init=init,
                      return_trajectory=return_trajectory, save_every=save_every,
                      return_info=True, **dict(kwargs or {}))
  static = {}

  def one_setting(params, keys, changes):
    x, info = fn(params, keys, **changes)
    if isinstance(info.get("nfe"), int):  # fixed-step samplers: one count, known when traced
      static["nfe"] = info.pop("nfe")
    return x, info

  if grid is None:
    body = lambda params, keys: one_setting(params, keys, {})
  else:
    values = {name: np.asarray(v, np.float32) for name, v in grid.items()}

    def body(params, keys):
      out = jax.vmap(lambda changes: one_setting(params, keys, changes))(values)
      return jax.tree.map(lambda v: jnp.moveaxis(v, 0, 1), out)

  return ParallelSampler(method, parallel.shard_sampler(body, mesh), static)


class NonFiniteSamplesError(RuntimeError):
  """Every sample drawn is non-finite (NaN or infinite): no metric can be computed on them."""


def finite_rows(x: np.ndarray) -> np.ndarray:
  """`[b]` bool: whether each sample of `x` `[b, ...]` is finite everywhere."""
  x = np.asarray(x)
  return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def sampling_params(state: Any, use_ema: bool) -> Any:
  """The weights samplers use: the first EMA (`sampling.use_ema`, the NCSNv2 convention) or the
  raw parameters (NCSN v1 keeps no EMA, ermongroup/ncsn `anneal_runner.py`)."""
  return state.ema_params[0] if use_ema else state.params
