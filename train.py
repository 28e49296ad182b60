"""Train a ravlm_jax model: ``python train.py --config configs/NAME.py[:ARG] --workdir DIR``.

Only parses flags; the library does the work (see the training issue).
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="run directory (resumed if present)")
    parser.parse_known_args(argv)
    print("train.py: training is not yet available", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
