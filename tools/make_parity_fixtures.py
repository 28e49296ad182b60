"""Build the parity fixtures in ``tests/fixtures/`` from reference implementations.

Needs ``torch==2.13.0`` and ``transformers`` 5.x (plus the offline asset packages installed
by ``make venv``); the test suite itself needs neither. Each module in
``tools/parity_fixtures/`` defines ``make(out: Path)`` and writes one family of fixtures:
tiny random Hugging Face models (weights + config + reference outputs, small enough to
commit), and reference outputs of real weights (MiniLM sentence embeddings,
EfficientNet-Lite0 logits).

    python tools/make_parity_fixtures.py --out tests/fixtures [--only clip,gpt2]
"""

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE.parent / "tests" / "fixtures")
    parser.add_argument("--only", default="", help="comma-separated module names")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE / "parity_fixtures")])
                   if not m.name.startswith("_"))
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        module = importlib.import_module(f"parity_fixtures.{name}")
        print(f"[{name}]", flush=True)
        module.make(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
