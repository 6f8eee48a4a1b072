"""Data parallelism: the only module that knows about devices and hosts.

Steps are written the way `pmap` programs are written: a per-device body that sees its slice of
the batch and averages with `lax.pmean(x, BATCH_AXIS)`. `data_parallel` turns such a body into one
SPMD program with `jax.shard_map` under `jax.jit` (the supported successor of `pmap`): the state
and key are replicated, the batch is split over `BATCH_AXIS`, and the state is donated.

Batches are global `jax.Array`s of shape `[global_b, ...]` sharded along the batch dimension,
with up to two leading axes in front: `k` steps fused into one dispatch (`fused_steps=k`), then
`m` batches that one step consumes (`batches_per_step=m`, e.g. one per discriminator update of
the adversarial step), so `[k, m, global_b, ...]` at most; each process contributes
its own rows (`shard_batch`), so multi-host runs read disjoint data. `shard_batch` also adds
`batch["index"]`, each example's global position in the batch, from which steps fold per-example
keys: the same config then draws the same noise on 1, 2 or 8 devices.

Sampling and feature extraction are per-example maps: `batch_map` runs one over the rows of a
batch split across all devices of all hosts (padding counts that do not divide the devices) and
gathers the result to every host; `shard_sampler` draws samples start..start+n-1 with keys folded
from (seed, global sample index), so a sample does not depend on devices, hosts or batch size
(the EDM convention, Karras et al. 2022).
"""

from __future__ import annotations

import collections
import pickle
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from score_jax import jax_compat

BATCH_AXIS = "batch"

PyTree = Any


# A process that stops answering (killed, out of memory, its host gone) is declared dead by the
# coordination service after HEARTBEAT_TIMEOUT_S, which then ends every other process with an
# error instead of leaving it blocked in a collective; SHUTDOWN_TIMEOUT_S bounds the wait for the
# others at exit, INIT_TIMEOUT_S the wait for all processes to join at the start. The heartbeat
# timeout is also how long a busy coordinator may take to answer a heartbeat before the job is
# declared failed, so it is not made much shorter than JAX's own default (100 s).
HEARTBEAT_TIMEOUT_S = 90
SHUTDOWN_TIMEOUT_S = 30
INIT_TIMEOUT_S = 300


def initialize_distributed(*, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           local_device_ids: list[int] | None = None) -> None:
  """Joins a multi-host job: `jax.distributed.initialize` with bounded failure detection.

  With `coordinator_address` (then also `num_processes` and `process_id`) the cluster is given;
  without, JAX detects it (TPU pods, SLURM, Open MPI). Must run before anything touches devices.
  """
  kwargs = {}
  if coordinator_address is not None:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  if local_device_ids is not None:
    kwargs["local_device_ids"] = local_device_ids
  jax.distributed.initialize(**kwargs, initialization_timeout=INIT_TIMEOUT_S,
                             heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                             shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def device_count() -> int:
  return jax.device_count()


def local_device_count() -> int:
  return jax.local_device_count()


def is_main_process() -> bool:
  """Whether this process writes logs, plots and samples."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def all_processes(flag: bool) -> bool:
  """Whether `flag` is true on every process; every process must call it."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


_TEXT_BYTES = 4096


def main_process_decides(check: Callable[[], None], error_type: type[Exception]) -> None:
  """Runs `check` on process 0 alone; an `error_type` it raises is raised on every process.

  For decisions that must be taken once and reach every process (the workdir's writer lock):
  process 0's error message is broadcast, so every process fails the same way, or none does.
  """
  message = ""
  if jax.process_index() == 0:
    try:
      check()
    except error_type as e:
      message = str(e) or type(e).__name__
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    data = message.encode()[:_TEXT_BYTES]
    buf = np.zeros(_TEXT_BYTES + 1, np.uint8)
    buf[0], buf[1:1 + len(data)] = bool(data), np.frombuffer(data, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    message = bytes(buf[1:]).rstrip(b"\0").decode(errors="replace") if buf[0] else ""
  if message:
    raise error_type(message)


class PreemptionWatch:
  """Whether every process should stop now and checkpoint (SIGTERM: preemption, spot VMs).

  With a multi-host job, JAX's preemption service catches SIGTERM on any process and agrees on a
  step all processes reach (`multihost_utils.reached_preemption_sync_point`); `should_stop(n)`
  is then true on every process at the same `n`. It must be called by every process with the same
  increasing `n` (one per dispatch). With one process a SIGTERM handler sets the flag; `close`
  puts the previous handler back. Outside the main thread (a library caller's worker thread)
  Python cannot install one, and SIGTERM keeps its previous meaning.
  """

  def __init__(self):
    import signal
    import threading
    self._service = jax.distributed.is_initialized()
    self._signal = signal
    self._received = False
    self._old = None
    if not self._service and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_term)

  def _on_term(self, signum, frame):
    self._received = True

  def should_stop(self, n: int) -> bool:
    if self._service:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(n)
    return self._received

  def close(self) -> None:
    if self._old is not None:
      self._signal.signal(self._signal.SIGTERM, self._old)
      self._old = None


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices (all devices of all hosts by default)."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} must be in [1, {len(devices)}] (the devices present)")
    devices = devices[:num_devices]
  return jax.sharding.Mesh(np.asarray(devices), (BATCH_AXIS,))


def check_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """Returns the per-process batch size; ValueError unless the batch splits evenly."""
  n = mesh.size
  if global_batch_size % n:
    raise ValueError(
        f"training.batch_size={global_batch_size} is not divisible by the {n} devices in use; "
        f"set --config.training.batch_size to a multiple of {n}")
  return global_batch_size // jax.process_count()


def replicate(tree: PyTree, mesh: jax.sharding.Mesh) -> PyTree:
  """Places a host or device tree on every device of `mesh` (copies, never aliases).

  With several processes, a leaf that is not yet a global array must hold the same value on
  every process (parameters initialized from the same seed, a restored checkpoint).
  """
  return _replicated(tree, mesh, copy=True)


def _replicated(tree: PyTree, mesh: jax.sharding.Mesh, *, copy: bool = False) -> PyTree:
  """`tree` as global arrays replicated over `mesh`.

  A global array already replicated over `mesh` is kept (copied with `copy`); another global
  array is resharded, with every process taking part. A host value, or an array on this
  process's devices, becomes a global array from this process's copy
  (`jax.make_array_from_callback`): every process holds the same value, and none places data
  on devices another process owns.
  """
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.sharding.is_equivalent_to(sharding, x.ndim):
        return jnp.copy(x) if copy else x
      return jax.device_put(x, sharding)
    if sharding.is_fully_addressable:  # one process: the devices are all ours
      return jax.device_put(jnp.array(x, copy=True) if copy else x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _lead_axes(fused_steps: int | None, batches_per_step: int) -> tuple[int, ...]:
  """The leading axes in front of the batch axis: fused steps, then batches per step."""
  if batches_per_step < 1:
    raise ValueError(f"batches_per_step={batches_per_step} must be >= 1")
  return ((() if fused_steps is None else (fused_steps,))
          + (() if batches_per_step == 1 else (batches_per_step,)))


def _batch_spec(fused_steps: int | None, batches_per_step: int) -> P:
  return P(*[None] * len(_lead_axes(fused_steps, batches_per_step)), BATCH_AXIS)


def shard_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, *,
                fused_steps: int | None = None, batches_per_step: int = 1
                ) -> dict[str, jax.Array]:
  """Turns this process's rows into a global batch sharded over `BATCH_AXIS`, adding `index`.

  Args:
    batch: host arrays `[local_b, ...]`; `[k, local_b, ...]` when `fused_steps=k`;
      `[m, local_b, ...]` when `batches_per_step=m > 1`; `[k, m, local_b, ...]` with both.
    mesh: the mesh of `make_mesh`.
    fused_steps: number of steps stacked on a leading axis, or None.
    batches_per_step: number of batches one step consumes, stacked on the axis just before the
      batch axis when > 1.

  Returns:
    The batch as global arrays plus `index` (int32, the leading axes then `[global_b]`), the
    global position of each example within its batch, identical whatever the device count.
  """
  lead = _lead_axes(fused_steps, batches_per_step)
  batch_dim = len(lead)
  for k, v in batch.items():
    if tuple(np.shape(v)[:batch_dim]) != lead:
      raise ValueError(f"batch[{k!r}] has shape {np.shape(v)}; with fused_steps={fused_steps} and "
                       f"batches_per_step={batches_per_step} it needs the leading axes {lead} "
                       "before the batch axis")
  local_b = next(iter(batch.values())).shape[batch_dim]
  global_b = local_b * jax.process_count()
  if global_b % mesh.size:
    raise ValueError(f"global batch {global_b} is not divisible by the {mesh.size} devices in use")
  start = jax.process_index() * local_b
  index = np.broadcast_to(np.arange(start, start + local_b, dtype=np.int32), (*lead, local_b))
  sharding = NamedSharding(mesh, _batch_spec(fused_steps, batches_per_step))

  def put(x):
    x = np.asarray(x)
    shape = list(x.shape)
    shape[batch_dim] = global_b
    return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

  return {**{k: put(v) for k, v in batch.items()}, "index": put(index)}


def per_device(tree: PyTree) -> PyTree:
  """Marks replicated values (parameters) as per-device before differentiating a local loss.

  Inside `data_parallel`, parameters are replicated ("invariant" to shard_map's type system).
  The gradient of a per-device loss with respect to an invariant value is summed over devices
  by JAX's transpose rules, so a later `lax.pmean` would leave N times the mean gradient. The
  gradient with respect to a per-device copy is the local gradient, which `lax.pmean` then
  averages: the pmap convention every step here follows.
  """
  return jax_compat.pcast_varying(tree, BATCH_AXIS)


def data_parallel(step: Callable[..., tuple[PyTree, PyTree]], mesh: jax.sharding.Mesh, *,
                  fused_steps: int | None = None, batches_per_step: int = 1,
                  donate_state: bool = True) -> Callable[..., tuple[PyTree, PyTree]]:
  """Builds `p_step(state, batch, rng) -> (state, metrics)` running `step` on every device.

  `step(state, batch, rng)` is the per-device body: it sees its slice of the batch, must
  `lax.pmean` gradients and metrics over `BATCH_AXIS`, and returns a replicated state and
  metrics. With `batches_per_step=m > 1` each step's batch carries a leading axis of m batches
  (the body sees `[m, b, ...]`). With `fused_steps=k` the batch carries a leading axis of k steps
  in front of that and the body runs k times inside one `lax.scan` (one dispatch); metrics are
  stacked over the k steps.
  """
  batch_spec = _batch_spec(fused_steps, batches_per_step)

  def body(state, batch, rng):
    if fused_steps is None:
      return step(state, batch, rng)
    return jax.lax.scan(lambda s, b: step(s, b, rng), state, batch)

  sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), batch_spec, P()), out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=(0,) if donate_state else ())


# Dispatched but unfinished steps the host may queue. Unbounded run-ahead deadlocks XLA:CPU
# (jax 0.10.2) when a step has an all-reduce and the devices are simulated (the test setup):
# queued executions block the runtime's worker threads until the all-reduce waits for devices
# that no thread is left to run; with this bound the loop never blocks (bench/NOTES.md, the
# run-ahead deadlock section).
MAX_STEPS_IN_FLIGHT = 2


class DispatchWindow:
  """Bounds run-ahead: `add(outputs)` after each dispatch blocks until at most `limit` steps
  are unfinished. Pass small outputs (metrics), not donated state."""

  def __init__(self, limit: int = MAX_STEPS_IN_FLIGHT):
    if limit < 1:
      raise ValueError(f"limit={limit}: at least one step must be allowed in flight")
    self.limit = limit
    self._pending: collections.deque = collections.deque()

  def add(self, outputs: PyTree) -> None:
    self._pending.append(outputs)
    while len(self._pending) > self.limit:
      jax.block_until_ready(self._pending.popleft())


def gather_to_host(x: jax.Array) -> np.ndarray:
  """Fetches a (possibly multi-host) global array to every host as numpy.

  With several processes this is a collective: every process must call it for the same array.
  """
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def from_main(fn: Callable[[], Any]) -> Any:
  """`fn()` evaluated on process 0 alone; its result (or its exception) reaches every process.

  Decisions read from files (which checkpoints exist, which rows and batches are stored) are
  made once this way: with several processes, each listing the workdir for itself could see a
  different state (a checkpoint or a row written in between, a disk of its own) and then enter
  different collectives. The result must pickle; it travels as bytes through a collective, so
  every process must call this at the same point of the program.
  """
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils
  payload = b""
  if is_main_process():
    try:
      payload = pickle.dumps((True, fn()))
    except Exception as e:  # raised on every process, so all of them stop the same way
      payload = pickle.dumps((False, _portable(e)))
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
  data = np.frombuffer(payload, np.uint8) if is_main_process() else np.zeros(size, np.uint8)
  ok, value = pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(data)).tobytes())
  if not ok:
    raise value
  return value


def _portable(e: Exception) -> Exception:
  """`e` if it survives pickling, else a RuntimeError with its type and message."""
  try:
    pickle.loads(pickle.dumps(e))
    return e
  except Exception:  # an exception whose constructor does not take its args back
    return RuntimeError(f"{type(e).__name__}: {e}")


def _pad_rows(x: np.ndarray, n_pad: int) -> np.ndarray:
  """`x` with its last row repeated until it has `n_pad` rows (the surplus is dropped later)."""
  if len(x) == n_pad:
    return x
  return np.concatenate([x, np.repeat(x[-1:], n_pad - len(x), axis=0)])


def _global_rows(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array that every process holds whole, as a global array sharded by rows."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def batch_map(fn: Callable[[PyTree, PyTree], PyTree], mesh: jax.sharding.Mesh
              ) -> Callable[[PyTree, PyTree], PyTree]:
  """Builds `p_fn(shared, batch) -> outputs` running `fn` on every device of `mesh`.

  `fn(shared, local_batch)` is the per-device body of a per-example computation (sampling,
  feature extraction): it sees this device's rows of `batch` and returns arrays whose leading
  axis is those rows. `shared` (parameters, keys) is replicated; `batch` is a tree of host arrays
  `[n, ...]` that every process holds whole (indices, images). `n` need not divide the device
  count: rows are padded with copies of the last one and the surplus is dropped. Outputs are
  gathered to every host as numpy arrays `[n, ...]` in row order.

  With several processes every process calls `p_fn` with the same `shared` and `batch` (a
  collective program); each places only the rows of its own devices, so the outputs, and
  anything computed from them, do not depend on how the devices are split into processes.
  """
  rows = NamedSharding(mesh, P(BATCH_AXIS))
  compiled = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(BATCH_AXIS)),
                                   out_specs=P(BATCH_AXIS), check_vma=False))

  def run(shared: PyTree, batch: PyTree) -> PyTree:
    leaves = [np.asarray(v) for v in jax.tree.leaves(batch)]
    if not leaves or len(leaves[0]) == 0:
      raise ValueError("batch_map needs a non-empty batch (at least one row)")
    n = len(leaves[0])
    if any(len(v) != n for v in leaves):
      raise ValueError(f"batch_map: every batch array needs {n} rows, got "
                       f"{[len(v) for v in leaves]}")
    n_pad = -(-n // mesh.size) * mesh.size
    padded = jax.tree.map(lambda v: _global_rows(_pad_rows(np.asarray(v), n_pad), rows), batch)
    out = compiled(_replicated(shared, mesh), padded)
    return jax.tree.map(lambda v: gather_to_host(v)[:n], out)

  return run


def sample_keys(rng: jax.Array, index: jax.Array) -> jax.Array:
  """Per-example keys `[b]` folded from the seed key and each sample's global index `[b]`.

  Sample k's key depends only on `(rng, k)`: the samples drawn with these keys do not depend on
  the device count, the number of hosts or the sampling batch size.
  """
  return jax.vmap(lambda k: jax.random.fold_in(rng, k))(index)


def shard_sampler(sample_fn: Callable[[PyTree, jax.Array], PyTree], mesh: jax.sharding.Mesh
                  ) -> Callable[[PyTree, jax.Array, int, int], PyTree]:
  """Builds `p_sample(params, rng, start, n)` drawing samples start..start+n-1 over all devices.

  `sample_fn(params, keys)` draws one sample per key (`keys` `[b]`, see `sample_keys`) and
  returns per-example arrays `[b, ...]`. Sample k uses the key folded from `(rng, k)`, so any
  split of the samples into calls, devices or hosts gives the same samples.
  """

  def body(shared, index):
    params, rng = shared
    return sample_fn(params, sample_keys(rng, index))

  p_body = batch_map(body, mesh)

  def run(params: PyTree, rng: jax.Array, start: int, n: int) -> PyTree:
    if n < 1 or start < 0:
      raise ValueError(f"shard_sampler: need n >= 1 samples from index start >= 0, got n={n}, "
                       f"start={start}")
    return p_body((params, rng), np.arange(start, start + n, dtype=np.int32))

  return run


# --- what the CPU kernels (score_jax.cpu) need to know about devices -------------------------

def default_platform() -> str:
  """The platform ("cpu", "gpu", "tpu") that computations run on unless placed elsewhere."""
  return jax.default_backend()


def same_varying(*xs: jax.Array) -> tuple[jax.Array, ...]:
  """`xs` cast to vary over the union of their mesh axes.

  Inside `shard_map`, the operands of a custom primitive must agree on the mesh axes they vary
  over (lax primitives arrange this themselves), e.g. per-device activations and replicated
  weights. Outside `shard_map` this returns `xs` unchanged.
  """
  varying = [jax_compat.varying_axes(x) for x in xs]
  union = frozenset().union(*varying)
  return tuple(_to_varying(x, tuple(union - v)) for x, v in zip(xs, varying))


def _to_varying(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
  return jax_compat.pcast_varying(x, axes) if axes else x


def concurrent_calls(x: jax.Array) -> int:
  """How many copies of an op on `x` run at once: one per device of the mesh axes `x` varies
  over (1 outside `shard_map`)."""
  mesh = jax.sharding.get_abstract_mesh()
  n = 1
  for axis in jax_compat.varying_axes(x):
    n *= mesh.shape.get(axis, 1)
  return n
