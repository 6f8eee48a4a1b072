"""Progress bars for the long host loops (sampling, evaluation), in terminals and notebooks.

`tqdm.auto` picks the notebook widget under Jupyter/Colab and the text bar elsewhere; both show
the count, the rate and the time left. Only the main process draws one.
"""

from __future__ import annotations

from tqdm import auto

from score_jax import parallel


def bar(total: int, desc: str, *, unit: str = "sample", initial: int = 0) -> auto.tqdm:
  """A bar of `total` units (hidden on processes other than the main one).

  Args:
    total: the number of units the loop will have done at the end.
    desc: the label in front of the bar.
    unit: the name of one unit.
    initial: units already done (a resumed evaluation).
  """
  return auto.tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True,
                   disable=not parallel.is_main_process(), smoothing=0.1)
