"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard event files
(written by tensorboardX, no TensorFlow), and a PNG of the curves at the end.

Resuming truncates ``metrics.jsonl`` to the restored step first: steps logged after the last
checkpoint are run again, so the file of a killed-and-resumed run equals the file of an
uninterrupted one (timing fields aside).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TIMING_KEYS = ("examples_per_sec", "steps_per_sec", "time")


class NonFiniteLoss(RuntimeError):
    """Raised by the NaN/inf guard; the message names the stage and step."""


def check_finite(stage: str, step: int, metrics: Mapping[str, float]) -> None:
    bad = {k: v for k, v in metrics.items()
           if isinstance(v, float) and not math.isfinite(v) and k not in TIMING_KEYS}
    if bad:
        name, value = next(iter(bad.items()))
        raise NonFiniteLoss(f"{stage}: {name} is {value} at step {step}; stopping (lower the "
                            "learning rate or check the data); the last checkpoint is kept")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: dropped, it is re-run
            break
    return rows


class MetricsWriter:
    """Append-only metrics log for one stage of a run."""

    def __init__(self, workdir: str | os.PathLike, stage: str, resume_step: int = 0,
                 tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.stage = stage
        self.path = self.workdir / "metrics.jsonl"
        rows = _read_jsonl(self.path)
        keep = [r for r in rows if r.get("stage") != stage or r["step"] <= resume_step]
        if len(keep) != len(rows) or (self.path.exists() and len(rows) != len(
                self.path.read_text().splitlines())):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard" / stage),
                                     purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"stage": self.stage, "step": int(step)}
        row.update({k: (float(v) if hasattr(v, "__float__") else v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"{self.stage}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    return _read_jsonl(Path(workdir) / "metrics.jsonl")


def plot_curves(workdir: str | os.PathLike, out: str = "curves.png") -> Path | None:
    """One panel per (stage, metric) of loss / learning rate / grad norm."""
    rows = read_metrics(workdir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    keys = ["loss", "learning_rate", "grad_norm"]
    fig, axes = plt.subplots(len(stages), len(keys), figsize=(4 * len(keys), 3 * len(stages)),
                             squeeze=False)
    for i, stage in enumerate(stages):
        sr = [r for r in rows if r["stage"] == stage]
        for j, key in enumerate(keys):
            ax = axes[i][j]
            pts = [(r["step"], r[key]) for r in sr if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True))
            ax.set_title(f"{stage}: {key}")
            ax.set_xlabel("step")
            if key == "loss":
                ax.set_yscale("log")
    fig.tight_layout()
    path = Path(workdir) / out
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
