"""Caption images with retrieval: ``python infer.py --image cat.jpg``.

    python infer.py --image PATH [PATH ...] [--prompt TEXT] [--checkpoint DIR]
                    [--datastore DIR] [--k 4] [--json] [--html report.html]

``--prompt`` alone searches the datastore by text. Only parses flags; the work is done by
``ravlm_jax.infer``. Exit status 2 when any image or the request failed (one line each).
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Caption images with retrieval, or search the datastore by text.")
    parser.add_argument("--image", nargs="+", default=[], metavar="PATH",
                        help="image files to caption")
    parser.add_argument("--prompt", metavar="TEXT",
                        help="text half of the query, and a prefix the decoder continues; "
                        "without --image: search the datastore by this text")
    parser.add_argument("--checkpoint", metavar="DIR",
                        help="train.py workdir or its model directory (default: workdirs/demo)")
    parser.add_argument("--datastore", metavar="DIR",
                        help="datastore directory (default: the workdir's)")
    parser.add_argument("--k", type=int, default=4, help="neighbours to retrieve (0: none)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image")
    parser.add_argument("--html", metavar="FILE", help="write a self-contained HTML report")
    args = parser.parse_args(argv)

    from ravlm_jax.infer import run_cli

    return run_cli(args.image, prompt=args.prompt, checkpoint=args.checkpoint,
                   datastore=args.datastore, k=args.k, as_json=args.json,
                   html_path=args.html)


if __name__ == "__main__":
    sys.exit(main())
