"""`python -m score_jax [flags]`: the command line of `python main.py` and `score-jax`."""

import sys

from score_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(sys.argv))
