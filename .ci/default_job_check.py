"""Checks the embedded default job's samples against the two-mode mixture it learns.

Run by `.ci/install_py311` after `score-jax --config.sampling.num_samples=10000 ...` in a fresh
directory: every sampler of the default (ALS, CAS, Heun) must recover the mixture 1/5
N((-5,-5), I) + 4/5 N((5,5), I). With 10000 samples the standard errors are 0.004 for the
weights, 0.02 for the small mode's mean and 3% for its variance, so the tolerances (0.03, 0.15,
10%) are several of them wide. The README's default-job table is this run's output.

    python default_job_check.py RUN_DIR STDOUT_FILE
"""

import json
import pathlib
import sys

import numpy as np


def main(run_dir: str, stdout_file: str) -> None:
  out = pathlib.Path(stdout_file).read_text()
  lines = (pathlib.Path(run_dir) / "sample_metrics.jsonl").read_text().splitlines()
  records = {r["method"]: r for r in map(json.loads, lines)}
  assert set(records) == {"als", "cas", "heun"}, sorted(records)
  for method, r in records.items():
    assert r["finite_fraction"] == 1.0, method
    assert r["nfe"] > 0 and f"{method:<17}" in out, method
    np.testing.assert_allclose(r["mode_weights"], [0.2, 0.8], atol=0.03, err_msg=method)
    np.testing.assert_allclose(r["mode_means"], [[-5, -5], [5, 5]], atol=0.15, err_msg=method)
    np.testing.assert_allclose(r["mode_vars"], np.ones((2, 2)), rtol=0.1, err_msg=method)
    print(f"{method}: nfe {r['nfe']}, weights {np.round(r['mode_weights'], 3).tolist()}, "
          f"variances {np.round(r['mode_vars'], 2).tolist()}")


if __name__ == "__main__":
  main(*sys.argv[1:])
