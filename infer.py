"""Caption images with retrieval: ``python infer.py --image cat.jpg``.

Only parses flags; the library does the work (see the generation issue).
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image", nargs="*", default=[], help="image files to caption")
    parser.add_argument("--prompt", help="text half of the query, and a prefix to continue")
    parser.add_argument("--checkpoint", help="train.py workdir or checkpoint directory")
    parser.add_argument("--datastore", help="datastore directory")
    parser.add_argument("--k", type=int, default=4, help="neighbours to retrieve")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument("--html", help="write a self-contained HTML report here")
    parser.parse_args(argv)
    print("infer.py: inference is not yet available", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
