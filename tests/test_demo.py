"""A tiny version of the demo, end to end: OpenMoji subset, the demo's real pretrained towers
(EfficientNet-Lite0, MiniLM; frozen, features cached), every stage, evaluation, then
``infer.py`` on the cat photo and an emoji, as a user would run it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def user_env() -> dict[str, str]:
    """The environment without the suite's 8 fake devices: one CPU device, as a user's
    laptop has (the sharded paths have their own tests; 8 devices on 2 cores cost 40%)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["XLA_FLAGS"] = flags.strip()
    return env


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path):
    data, work = tmp_path / "data", tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.py:pretrained",
           "--workdir", str(work), f"--config.data.data_dir={data}",
           "--config.train.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=user_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frozen-feature cache on" in proc.stdout
    ev = json.loads((work / "eval.json").read_text())
    for key in ("cider_k0", "cider_k2", "bleu4_k2", "rouge_l_k0", "cider_swap_k2",
                "recall@1", "recall@5", "recall@10"):
        assert key in ev and ev[key] >= 0.0, key
    assert ev["examples"] > 0 and ev["samples"]

    emoji = next((work / "images" / "test").glob("*.png"))
    out = subprocess.run([sys.executable, "infer.py", "--checkpoint", str(work), "--image",
                          "examples/cat.jpg", str(emoji), "--json", "--k", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=user_env())
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 2
    for rec in records:
        assert isinstance(rec["caption"], str) and len(rec["neighbours"]) == 2
