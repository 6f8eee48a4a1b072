"""score_jax command line: `python main.py --help`; the code is in `score_jax/cli.py`."""

import sys

from score_jax.cli import main

if __name__ == "__main__":
  sys.exit(main(sys.argv))
