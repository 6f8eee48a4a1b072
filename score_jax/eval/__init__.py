"""Evaluation infrastructure: feature networks, their weights, metrics and evaluation records.

Used by the host loops of the eval modes (`score_jax.evaluate`, `score_jax.likelihood_eval`) and
by the notebook; nothing here imports a host loop (tests/test_imports.py checks it).

* `inception`: the FID Inception-v3 network in Flax; `fetch_inception` fetches and converts its
  weights (`python -m score_jax.eval.fetch_inception`), reading PyTorch files with
  `torch_weights` (no torch, no pickled code run).
* `mnist_classifier`: a small MNIST digit classifier, the feature space of FID on MNIST
  (`python -m score_jax.eval.mnist_classifier`); `stacked_mnist`: StackedMNIST mode counts.
* `metrics`: FID, KID and Inception Score on feature arrays.
* `feature_nets`: images -> Inception or classifier features over every device.
* `reference_stats`: the reference statistics (a file, the workdir's cache, or data).
* `evaluators`: the run's evaluator from its eval and data specs (features and metrics per kind
  of data).
* `batches`: features of samples drawn in batches, resumable through a batch cache.
* `sweep`: the sampler sweep's grid of settings (the samplers are `sampling.make_parallel_sampler`,
  through `Experiment.parallel_sampler`).
* `records`: evaluation rows: entry keys for resuming, tables, CSV and plots.
* `fid`: FID, KID and IS between any two image sources (`python -m score_jax.eval.fid`).
"""
