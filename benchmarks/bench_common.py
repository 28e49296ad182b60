"""What the benchmark scripts share: the machine they ran on, package versions, and whether
the PyTorch baseline can run. Imports JAX and torch lazily: the scripts set their
environment (platform, threads) before either starts."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
from pathlib import Path


def torch_skip_note(skip_torch: bool, device: str) -> str | None:
    """None when the baseline can run on ``device``, else why it is skipped."""
    if skip_torch:
        return "skipped by --skip-torch"
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        return f"torch baseline skipped: {e} (install the optional `bench` extra)"
    if device == "gpu" and not torch.cuda.is_available():
        return "torch baseline skipped: this torch build has no CUDA device"
    return None


def machine(device: str) -> str:
    """The GPU's kind, or the CPU's model name and the cores this process may use."""
    if device == "gpu":
        import jax

        return jax.devices()[0].device_kind
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cpus ({len(os.sched_getaffinity(0))} used)"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "scann", "torch", "transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out
