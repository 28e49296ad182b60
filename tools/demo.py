"""The steps of ``make demo``, timed: dataset, training + evaluation, results, inference.

    python tools/demo.py [--workdir workdirs/demo] [--install-seconds N]

Each step runs as its own command, exactly as a user would type it; the seconds each took go
to WORKDIR/timing.json (and into RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step(name: str, cmd: list[str], timing: dict, stdout=None) -> None:
    print(f"\n==> {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=stdout)
    timing[name] = round(time.perf_counter() - t0, 1)
    if proc.returncode != 0:
        print(f"demo: step {name!r} failed (exit {proc.returncode})", file=sys.stderr)
        sys.exit(proc.returncode)


def export_test_emoji(config_path: str, out: Path) -> None:
    """One emoji of the held-out test split, as a PNG a user could have made."""
    from PIL import Image

    from ravlm_jax.config import load_config
    from ravlm_jax.data.images import decode_image
    from ravlm_jax.data.sources import open_source

    source = open_source(load_config(config_path).data, "test")
    example = source[0]
    Image.fromarray(decode_image(example["image"])).save(out)
    print(f"test emoji: {out} (references: {'; '.join(source.references(0)[:4])})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", default="workdirs/demo")
    parser.add_argument("--config", default="configs/demo.py")
    parser.add_argument("--data_dir", default="data/openmoji")
    parser.add_argument("--install-seconds", type=float, default=None)
    args = parser.parse_args()
    py = sys.executable
    work = (ROOT / args.workdir).resolve()
    timing: dict[str, float] = {}
    if args.install_seconds is not None:
        timing["install (make venv)"] = args.install_seconds
    t0 = time.perf_counter()
    step("dataset", [py, "-m", "ravlm_jax.data.openmoji", "--data_dir", args.data_dir], timing)
    step("train + evaluate", [py, "train.py", "--config", args.config, "--workdir",
                              args.workdir, f"--config.data.data_dir={args.data_dir}"], timing)
    emoji = work / "test_emoji.png"
    export_test_emoji(args.config, emoji)
    step("infer", [py, "infer.py", "--checkpoint", args.workdir, "--image", "examples/cat.jpg",
                   str(emoji), "--html", str(work / "report.html")],
         timing)
    timing["total"] = round(time.perf_counter() - t0 + timing.get("install (make venv)", 0), 1)
    (work / "timing.json").write_text(json.dumps(timing, indent=2))
    with open(work / "RESULTS.md", "w") as f:
        step("results", [py, "tools/write_results.py", args.workdir], {}, stdout=f)
    print(f"\nresults: {work / 'RESULTS.md'}  report: {work / 'report.html'}")
    print("timing (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
