"""A/B: `checkpoint.save` (finiteness check and SHA-256 digest of every leaf on the host, then
the Orbax save) against the bare Orbax save of the same state, synchronous, interleaved, in one
process. The state is params + EMA + Adam moments of a model with `--params` parameters (float32).
bench/NOTES.md has the findings.

    .venv/bin/python bench/checkpoint_digest.py [--params 4000000] [--repeats 5]
"""

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from score_jax import checkpoint  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--params", type=int, default=4_000_000)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  leaf = lambda: jnp.asarray(rng.normal(size=(args.params // 8, 8)).astype(np.float32))
  state = {"params": leaf(), "ema": leaf(), "mu": leaf(), "nu": leaf(), "step": jnp.int32(1)}
  config_json = json.dumps({"name": "bench"})
  with tempfile.TemporaryDirectory() as tmp:
    ours = checkpoint.create_writer(f"{tmp}/ours", keep=1, async_save=False)
    bare = ocp.CheckpointManager(f"{tmp}/bare/checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, enable_async_checkpointing=False),
        item_names=("state", "data", "config"))
    times = {"ours": [], "bare": []}
    for step in range(1, args.repeats + 2):
      t = time.perf_counter()
      checkpoint.save(ours, step, state, data_state={}, config_json=config_json)
      ours.wait_until_finished()
      times["ours"].append(time.perf_counter() - t)
      t = time.perf_counter()
      bare.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              data=ocp.args.JsonSave({}),
                                              config=ocp.args.JsonSave({"name": "bench"})),
                force=True)
      bare.wait_until_finished()
      times["bare"].append(time.perf_counter() - t)
    ours.close()
    bare.close()
  med = {k: statistics.median(v[1:]) for k, v in times.items()}  # the first save compiles
  mb = 4 * 4 * args.params / 2**20
  print(f"state {mb:.0f} MiB: checkpoint.save {med['ours']:.3f} s, bare Orbax {med['bare']:.3f} s,"
        f" ratio {med['ours'] / med['bare']:.2f}")


if __name__ == "__main__":
  main()
