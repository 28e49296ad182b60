"""Train a ravlm_jax model.

    python train.py --config configs/NAME.py[:ARG] --workdir DIR [--config.KEY=VALUE ...]

Rerunning with the same workdir resumes from the newest checkpoint. Each config file's
docstring gives its exact command and the result it should reach. Only parses flags; the
library does the work (ravlm_jax.train.loop.train_and_evaluate).
"""

import argparse
import os
import sys


def parse(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    parser.add_argument("--workdir", required=True, help="run directory (resumed if present)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognized argument {item!r} (overrides look like "
                         "--config.train.caption.steps=100)")
        overrides.append(item[len("--config."):])
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from ravlm_jax.cli import run_cli
    from ravlm_jax.config import apply_overrides, load_config

    def run() -> None:
        from ravlm_jax.train.loop import train_and_evaluate

        config = apply_overrides(load_config(args.config), overrides)
        train_and_evaluate(config, args.workdir)

    return run_cli(run, "train.py")


if __name__ == "__main__":
    sys.exit(main())
