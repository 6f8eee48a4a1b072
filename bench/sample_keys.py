"""Cost of drawing each sample from its own key (`make_sampler`'s convention) against one key.

Sample k from the key folded from (seed, k) makes samples independent of devices and batch size;
it costs per-example noise generation (ALS/CAS) or one program per example under vmap (PC, and
any run keeping trajectories). Each pair runs in the same process on the same network (configs/
test.py's toy MLP unless --config names another) with interleaved repeats, compiled first; the
ratio is the median over repeats of per-example time / one-key time (1.2: 20% slower).

  .venv/bin/python bench/sample_keys.py [--repeats=15] [--batch=256] [--config=configs/test.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from score_jax import experiment, models, parallel, sampling  # noqa: E402


def _config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--config", default="configs/test.py")
  args = parser.parse_args()
  config = _config(args.config)
  model = models.build(config)
  params = experiment.init_state(config, model).ema_params[0]
  sigmas = experiment.sigmas_from_config(config)
  shape = experiment.example_shape(config)
  keys = parallel.sample_keys(jax.random.key(0), jax.numpy.arange(args.batch))
  for method in ("als", "cas", "pc"):
    fn = sampling.make_sample_fn(model, sigmas, shape, method=method,
                                 init=experiment.sampler_init(config, method),
                                 **experiment.sampler_kwargs(config, method))
    one_key = jax.jit(lambda p, r: fn(p, r, args.batch))
    per_example = jax.jit(fn)
    runs = {"one_key": lambda: one_key(params, jax.random.key(1)),
            "per_example": lambda: per_example(params, keys)}
    for run in runs.values():
      jax.block_until_ready(run())
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
      for name, run in runs.items():
        start = time.perf_counter()
        jax.block_until_ready(run())
        times[name].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["per_example"], times["one_key"])]
    print(json.dumps({"method": method, "config": args.config, "batch": args.batch,
                      "backend": jax.default_backend(), "devices": 1,
                      "ratio_median": statistics.median(ratios),
                      "ratio_of_minima": min(times["per_example"]) / min(times["one_key"]),
                      "one_key_s_min": min(times["one_key"])}))


if __name__ == "__main__":
  main()
