"""Captioning train-step benchmark: our jitted step vs a PyTorch Hugging Face step.

Not a timed test: one process builds both models at the same size and shape, feeds them
the same batch on the same cores, and reports the *ratios* measured side by side (absolute
numbers move with the machine and its load).

    python benchmarks/train_step.py --json out.json                 # small size, CPU
    python benchmarks/train_step.py --size tiny --skip-torch        # a quick look
    python benchmarks/train_step.py --size large --device gpu --dtype bfloat16

The model: a CLIP ViT image tower (trainable) whose ``last_hidden_state`` is the
cross-attention memory of a GPT-2 decoder with cross-attention; loss = next-token
cross-entropy; AdamW (same lr, betas, eps, weight decay on matrices only, warmup-cosine
schedule) after global-norm gradient clipping; float32 (``--dtype bfloat16``: bf16 compute
on both sides, float32 parameters).

* ours: ``ravlm_jax.models.vit.ViT`` + ``ravlm_jax.models.decoder.Decoder``, trained by the
  library's own ``make_optimizer`` / ``create_train_state`` / ``make_train_step`` (jitted,
  sharded on a one-device mesh, state donated), compiled once by ``compile_step``;
* baseline: ``transformers.CLIPVisionModel`` + ``GPT2LMHeadModel(add_cross_attention=True)``
  (their default attention implementation), ``torch.optim.AdamW`` (``--torch-adamw``:
  ``fused``, the fastest here, or the for-loop ``default`` or ``foreach``),
  ``clip_grad_norm_``, ``LambdaLR``; eager.

Both models have the same parameter count (checked). Pixels are ``[B, H, W, 3]`` for us
and the same values as ``[B, 3, H, W]`` for torch; token ids ``[B, T]``. Timing: warm-up
steps on both, then ``--rounds`` rounds; each round times ``--steps`` steps of ours, of
torch (the order alternates between rounds) and a large jitted ``jnp.dot`` (the matmul
ceiling: best of ``--ceiling-repeats``), so that all three see the same background load.
Reported: median and spread over rounds; ``speedup_vs_torch`` is the median of the per-round
ratios, and ``fraction_of_ceiling`` the median of per-round ``ours FLOP/s / ceiling``. FLOPs
are analytic matmul FLOPs (forward x 3 for forward + backward); XLA's own count of the
compiled step (``cost_analysis``) is reported alongside.

On the CPU both sides use the same ``--threads`` cores (process affinity, set before JAX
and torch start, plus ``torch.set_num_threads``), and torch's OpenMP threads wait passively
(``OMP_WAIT_POLICY=PASSIVE``: spinning threads stall every op on a CPU shared with other
jobs). CPU seconds per step (all threads) are reported beside wall time. ``--skip-torch``
(or torch missing: it is the optional ``bench`` extra) measures ours and the ceiling only.
"""

from __future__ import annotations

import argparse
import os
import sys

SIZES: dict[str, dict[str, int]] = {
    # width is shared: GPT-2's cross-attention reads memories n_embd wide
    "tiny": dict(image_size=32, patch=16, width=64, vit_layers=1, vit_heads=2, dec_layers=1,
                 dec_heads=2, vocab=512, seq_len=8, n_positions=8, batch=2),
    "small": dict(image_size=128, patch=16, width=256, vit_layers=4, vit_heads=4,
                  dec_layers=4, dec_heads=4, vocab=8192, seq_len=32, n_positions=32,
                  batch=16),
    # ViT-B/16 at 224 + GPT-2 small (124M) with cross-attention
    "large": dict(image_size=224, patch=16, width=768, vit_layers=12, vit_heads=12,
                  dec_layers=12, dec_heads=12, vocab=50257, seq_len=32, n_positions=1024,
                  batch=64),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    for name in SIZES["small"]:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"override the size's {name}")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=2, help="CPU cores for both sides")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps on each side")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--ceiling-n", type=int, default=0,
                   help="matmul ceiling: [n, n] @ [n, n]; 0 = 2048 on CPU, 8192 on GPU")
    p.add_argument("--ceiling-repeats", type=int, default=3)
    p.add_argument("--torch-adamw", choices=("default", "foreach", "fused"), default="fused",
                   help="torch AdamW implementation (fused: the fastest on this CPU)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results here")
    a = p.parse_args(argv)
    a.shape = {k: (v if getattr(a, k) is None else getattr(a, k))
               for k, v in SIZES[a.size].items()}
    return a


def _set_threads(a: argparse.Namespace) -> None:
    """Before JAX and torch start their thread pools: XLA's CPU pool is sized to the
    cores this process may run on, torch's by ``set_num_threads``."""
    if a.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        cores = sorted(os.sched_getaffinity(0))
        if 0 < a.threads < len(cores):
            os.sched_setaffinity(0, cores[:a.threads])
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, str(a.threads))
        # torch's OpenMP threads spin at every op's barrier by default; on a CPU shared
        # with other work a descheduled thread then stalls each op by a time slice
        # (measured here: 100x slower tiny steps). Passive waiting is the fair setting.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    else:  # JAX and torch share the GPU: JAX must not preallocate 75% of it
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


args = parse_args() if __name__ == "__main__" else None
if args is not None:
    _set_threads(args)

import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import machine, torch_skip_note, versions  # noqa: E402

LR, WARMUP, TOTAL_STEPS, WEIGHT_DECAY, GRAD_CLIP = 1e-4, 100, 10_000, 0.01, 1.0
B1, B2, EPS = 0.9, 0.999, 1e-8


# ----------------------------------------------------------------------------- FLOPs


def matmul_flops(s: dict[str, int]) -> dict[str, int]:
    """Analytic matmul FLOPs of one forward pass (2 per multiply-add), by part.

    ViT over S = 1 + (image/patch)^2 tokens; decoder over T tokens with a memory of S
    image tokens. Layer norms, softmax, activations and the optimizer are not counted.
    """
    b, w, t, v = s["batch"], s["width"], s["seq_len"], s["vocab"]
    m = 4 * w  # MLP width on both towers
    p = (s["image_size"] // s["patch"]) ** 2
    n = p + 1
    patch = 2 * b * p * (s["patch"] ** 2 * 3) * w
    vit_layer = (2 * b * n * w * w * 4      # q, k, v, out projections
                 + 2 * b * n * n * w * 2    # scores and weighted sum
                 + 2 * b * n * w * m * 2)   # MLP
    dec_layer = (2 * b * t * w * w * 4      # self-attention projections
                 + 2 * b * t * t * w * 2    # self-attention scores and sum
                 + 2 * b * t * w * w * 2    # cross-attention q and out
                 + 2 * b * n * w * w * 2    # cross-attention k, v of the memory
                 + 2 * b * t * n * w * 2    # cross-attention scores and sum
                 + 2 * b * t * w * m * 2)   # MLP
    head = 2 * b * t * w * v                # tied LM head
    return {"vit": patch + s["vit_layers"] * vit_layer,
            "decoder": s["dec_layers"] * dec_layer + head}


def train_flops(s: dict[str, int]) -> int:
    """Forward x 3 (backward = 2 x forward), the usual training-FLOPs convention."""
    return 3 * sum(matmul_flops(s).values())


# ----------------------------------------------------------------------------- data


def make_batch(s: dict[str, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [B, H, W, 3] float32, ids [B, T] int32), the same for both sides."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((s["batch"], s["image_size"], s["image_size"], 3),
                                 dtype=np.float32)
    ids = rng.integers(0, s["vocab"], (s["batch"], s["seq_len"]), dtype=np.int32)
    return pixels, ids


def lr_at(step: int) -> float:
    """optax.warmup_cosine_decay_schedule(0, LR, WARMUP, TOTAL_STEPS, 0) on the host."""
    if step < WARMUP:
        return LR * step / WARMUP
    frac = min((step - WARMUP) / (TOTAL_STEPS - WARMUP), 1.0)
    return LR * 0.5 * (1 + math.cos(math.pi * frac))


# ----------------------------------------------------------------------------- ours


def build_ours(s: dict[str, int], dtype_name: str, seed: int, pixels: np.ndarray,
               ids: np.ndarray) -> tuple[Callable[[int], None], dict]:
    """Our step, compiled. Returns (run(n): n steps then block, info)."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ravlm_jax.models.decoder import Decoder, DecoderConfig
    from ravlm_jax.models.vit import ViT, ViTConfig
    from ravlm_jax.sharding import batch_sharding, create_sharded, make_mesh, state_shardings
    from ravlm_jax.train.state import count, create_train_state, make_optimizer, split_model
    from ravlm_jax.train.steps import compile_step, make_train_step

    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32

    class ImageCaptioner(nnx.Module):
        """CLIP ViT tokens -> GPT-2 cross-attention memory."""

        def __init__(self, rngs: nnx.Rngs):
            self.vit = ViT(ViTConfig(image_size=s["image_size"], patch_size=s["patch"],
                                     width=s["width"], layers=s["vit_layers"],
                                     heads=s["vit_heads"], mlp_dim=4 * s["width"]),
                           rngs=rngs, dtype=dtype)
            self.decoder = Decoder(DecoderConfig(
                vocab_size=s["vocab"], n_positions=s["n_positions"], width=s["width"],
                layers=s["dec_layers"], heads=s["dec_heads"], cross_attention=True,
                dtype=dtype), rngs=rngs)

    def loss_fn(model, batch, tables, rng):
        tokens, _ = model.vit(batch["pixels"])  # [B, S, W]
        ids = batch["ids"]  # [B, T]
        logits, _ = model.decoder(ids, memory=tokens)  # [B, T, V] float32
        # next-token targets; the last position has none (weight 0), as in HF's shifted
        # labels: no slice of the [B, T, V] logits, whose gradient would need a pad
        targets = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)  # [B, T]
        weights = (jnp.arange(ids.shape[1]) < ids.shape[1] - 1).astype(jnp.float32)  # [T]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
        return jnp.sum(nll * weights) / (ids.shape[0] * (ids.shape[1] - 1)), {}

    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    model = create_sharded(lambda: ImageCaptioner(nnx.Rngs(seed)), mesh)
    graphdef, params, frozen, rest = split_model(model)
    cfg = ml_collections.ConfigDict(dict(learning_rate=LR, warmup_steps=WARMUP,
                                         weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
                                         b1=B1, b2=B2))
    tx, schedule = make_optimizer(cfg, TOTAL_STEPS)
    state, state_sh = create_train_state(params, tx, mesh)
    replicated = NamedSharding(mesh, P())
    batch = {"pixels": pixels, "ids": ids}
    batch_sh = {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    batch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
    tables: dict = {}
    step = make_train_step(loss_fn, tx, schedule, graphdef, seed, state_sh,
                           state_shardings(frozen, mesh), {}, batch_sh, replicated)
    with jax.set_mesh(mesh):
        compiled, info = compile_step(step, state, frozen, rest, tables, batch)
    info["params"] = count(params)
    info["xla_flops"] = _xla_flops(compiled)
    holder = {"state": state}

    def run(n: int) -> float:
        st = holder["state"]
        for _ in range(n):
            st, metrics = compiled(st, frozen, rest, tables, batch)
        jax.block_until_ready(st)
        holder["state"] = st
        return float(metrics["loss"])

    return run, info


def _xla_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend reports it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


def matmul_ceiling(device: str, dtype_name: str, n: int) -> Callable[[int], float]:
    """A jitted [n, n] @ [n, n]; returns best-of-``repeats`` FLOP/s when called. In
    bfloat16 it accumulates and returns float32, as the models' matmuls do (on XLA:CPU a
    bf16-output dot takes a float32 path at under half the speed)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(dot(a, b))

    def measure(repeats: int) -> float:
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(dot(a, b))
            best = min(best, time.perf_counter() - t0)
        return 2 * n ** 3 / best

    return measure


# ----------------------------------------------------------------------------- torch


def build_torch(s: dict[str, int], a: argparse.Namespace, pixels: np.ndarray,
                ids: np.ndarray) -> tuple[Callable[[int], float], dict]:
    """The Hugging Face baseline step (eager). Returns (run(n), info)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(a.seed)
    dev = torch.device("cuda" if a.device == "gpu" else "cpu")
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    else:  # JAX runs float32 GPU matmuls at its default (TF32) precision
        torch.set_float32_matmul_precision("high")
    vision = CLIPVisionModel(CLIPVisionConfig(
        hidden_size=s["width"], intermediate_size=4 * s["width"],
        num_hidden_layers=s["vit_layers"], num_attention_heads=s["vit_heads"],
        image_size=s["image_size"], patch_size=s["patch"], hidden_act="quick_gelu",
        attention_dropout=0.0)).to(dev)
    lm = GPT2LMHeadModel(GPT2Config(
        vocab_size=s["vocab"], n_positions=s["n_positions"], n_embd=s["width"],
        n_layer=s["dec_layers"], n_head=s["dec_heads"], add_cross_attention=True,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=s["vocab"] - 1, eos_token_id=s["vocab"] - 1)).to(dev)
    vision.train()
    lm.train()
    params = [p for m in (vision, lm) for p in m.parameters()]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    opt = torch.optim.AdamW(groups, lr=LR, betas=(B1, B2), eps=EPS, **impl[a.torch_adamw])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_at(i) / LR)
    pix = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(dev)  # NCHW
    tok = torch.from_numpy(ids).long().to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16,
                              enabled=a.dtype == "bfloat16")

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast:
            memory = vision(pixel_values=pix).last_hidden_state  # [B, S, W]
            loss = lm(input_ids=tok, encoder_hidden_states=memory, labels=tok).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        sched.step()
        return loss

    def run(n: int) -> float:
        for _ in range(n):
            loss = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return float(loss.detach())

    info = {"params": sum(p.numel() for p in params),
            "attn_implementation": getattr(lm.config, "_attn_implementation", None),
            "adamw": a.torch_adamw, "threads": torch.get_num_threads()}
    return run, info


# ----------------------------------------------------------------------------- timing


def timed(run: Callable[[int], float], n: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds: all threads) of ``n`` steps."""
    c0, t0 = time.process_time(), time.perf_counter()
    loss = run(n)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss} during the benchmark")
    return dt, dc


def summary(values: list[float]) -> dict[str, float]:
    q = np.percentile(values, [25, 75]) if len(values) > 1 else (values[0], values[0])
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "iqr": float(q[1] - q[0])}


def measure_rounds(sides: dict[str, Callable[[int], float]],
                   ceilings: dict[str, Callable[[int], float]], a: argparse.Namespace
                   ) -> dict[str, dict[str, list[float]]]:
    """Per round: every side's wall and CPU seconds per step (order alternating), then
    every matmul ceiling in FLOP/s, so that all of them see the same background load."""
    out: dict[str, dict[str, list[float]]] = {
        "wall": {n: [] for n in sides}, "cpu": {n: [] for n in sides},
        "ceiling": {n: [] for n in ceilings}}
    order = list(sides)
    for r in range(a.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            wall, cpu_s = timed(sides[name], a.steps)
            out["wall"][name].append(wall / a.steps)
            out["cpu"][name].append(cpu_s / a.steps)
        for name, measure in ceilings.items():
            out["ceiling"][name].append(measure(a.ceiling_repeats))
        line = "  ".join(f"{n} {a.shape['batch'] / out['wall'][n][-1]:.1f} ex/s "
                         f"(cpu {out['cpu'][n][-1]:.2f} s/step)" for n in sides)
        line += "".join(f"  {n} {v[-1] / 1e9:.1f} GFLOP/s" for n, v in out["ceiling"].items())
        print(f"round {r + 1}/{a.rounds}: {line}", flush=True)
    return out


def torch_matmul_ceiling(device: str, dtype_name: str, n: int) -> Callable[[int], float]:
    """torch.mm on the same [n, n] shapes: context for the JAX ceiling (not the bar)."""
    import torch

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    x, y = (torch.randn(n, n, dtype=dtype, device=dev) for _ in range(2))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def measure(repeats: int) -> float:
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(x, y)
            sync()
            best = min(best, time.perf_counter() - t0)
        return 2 * n ** 3 / best

    measure(1)
    return measure


def main(a: argparse.Namespace) -> dict:
    import jax

    s = a.shape
    if a.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu, but JAX's backend is {jax.default_backend()}")
    skip_note = torch_skip_note(a.skip_torch, a.device)
    pixels, ids = make_batch(s, a.seed)
    load_start = os.getloadavg()

    ours_run, ours_info = build_ours(s, a.dtype, a.seed, pixels, ids)
    sides: dict[str, Callable[[int], float]] = {"ours": ours_run}
    n = a.ceiling_n or (8192 if a.device == "gpu" else 2048)
    ceilings = {"jax_dot": matmul_ceiling(a.device, a.dtype, n)}
    torch_info = None
    if skip_note is None:
        torch_run, torch_info = build_torch(s, a, pixels, ids)
        if torch_info["params"] != ours_info["params"]:
            raise RuntimeError(f"models differ: ours {ours_info['params']:,} parameters, "
                               f"torch {torch_info['params']:,}")
        sides["torch"] = torch_run
        ceilings["torch_mm"] = torch_matmul_ceiling(a.device, a.dtype, n)
    else:
        print(skip_note, flush=True)
    for name, run in sides.items():
        t0 = time.perf_counter()
        run(a.warmup)
        print(f"{name}: warm-up {a.warmup} steps in {time.perf_counter() - t0:.1f} s",
              flush=True)
    rounds = measure_rounds(sides, ceilings, a)
    result = report(a, rounds, ours_info, torch_info, skip_note, load_start, n)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {a.json}", flush=True)
    return result


def report(a: argparse.Namespace, rounds: dict, ours_info: dict, torch_info: dict | None,
           skip_note: str | None, load_start: tuple[float, ...], ceiling_n: int) -> dict:
    """The JSON result: medians and spreads over rounds, ratios taken round by round."""
    s, b, flops = a.shape, a.shape["batch"], train_flops(a.shape)
    wall, cpu, ceiling = rounds["wall"], rounds["cpu"], rounds["ceiling"]
    ours_fps = [flops / t for t in wall["ours"]]
    fractions = [f / c for f, c in zip(ours_fps, ceiling["jax_dot"], strict=True)]
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv) if a is args else None,
        "machine": machine(a.device),
        "device": a.device,
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "versions": versions(),
        "config": {"size": a.size, **s, "dtype": a.dtype, "threads": a.threads,
                   "warmup": a.warmup, "steps_per_round": a.steps, "rounds": a.rounds,
                   "optimizer": f"AdamW lr {LR} warmup {WARMUP} cosine to {TOTAL_STEPS}, "
                                f"wd {WEIGHT_DECAY} (matrices), clip {GRAD_CLIP}",
                   "params": ours_info["params"]},
        "train_flops_per_step": flops,
        "forward_matmul_flops": matmul_flops(s),
        "xla_flops_per_step": ours_info.pop("xla_flops"),
        "ours": {**ours_info, "step_s": summary(wall["ours"]),
                 "cpu_s_per_step": summary(cpu["ours"]),
                 "examples_per_sec": summary([b / t for t in wall["ours"]])},
        "ours_examples_per_sec": statistics.median(b / t for t in wall["ours"]),
        "ours_flops_per_sec": statistics.median(ours_fps),
        "matmul_ceiling_flops_per_sec": statistics.median(ceiling["jax_dot"]),
        "matmul_ceiling": {"n": ceiling_n, "dtype": a.dtype,
                           **{k: summary(v) for k, v in ceiling.items()}},
        "fraction_of_ceiling": statistics.median(fractions),
        "fraction_of_ceiling_per_round": [round(f, 4) for f in fractions],
        "torch_examples_per_sec": None,
        "speedup_vs_torch": None,
        "torch_note": skip_note,
    }
    if torch_info is not None:
        ratios = [t / o for o, t in zip(wall["ours"], wall["torch"], strict=True)]
        cpu_ratios = [t / o for o, t in zip(cpu["ours"], cpu["torch"], strict=True)]
        result["torch"] = {**torch_info, "step_s": summary(wall["torch"]),
                           "cpu_s_per_step": summary(cpu["torch"]),
                           "examples_per_sec": summary([b / t for t in wall["torch"]]),
                           "flops_per_sec": statistics.median(flops / t
                                                              for t in wall["torch"])}
        result["torch_examples_per_sec"] = statistics.median(b / t for t in wall["torch"])
        result["speedup_vs_torch"] = statistics.median(ratios)
        result["speedup_per_round"] = [round(x, 3) for x in ratios]
        # CPU seconds of all threads: the work done, whatever the neighbours' load (with
        # more than one thread it also counts time spent spinning at barriers)
        result["speedup_vs_torch_cpu_time"] = statistics.median(cpu_ratios)
    print(f"ours {result['ours_examples_per_sec']:.1f} ex/s, "
          f"{result['ours_flops_per_sec'] / 1e9:.1f} GFLOP/s = "
          f"{100 * result['fraction_of_ceiling']:.0f}% of the matmul ceiling "
          f"({result['matmul_ceiling_flops_per_sec'] / 1e9:.1f} GFLOP/s)", flush=True)
    if torch_info is not None:
        print(f"torch {result['torch_examples_per_sec']:.1f} ex/s; speedup "
              f"{result['speedup_vs_torch']:.2f}x (per round {result['speedup_per_round']}); "
              f"by CPU time {result['speedup_vs_torch_cpu_time']:.2f}x", flush=True)
    return result


if __name__ == "__main__":
    main(args)
