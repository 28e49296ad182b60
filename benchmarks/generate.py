"""Generation benchmark: our compiled chunk/retrieve loop vs a PyTorch Hugging Face loop.

Not a timed test: one process runs both on the same CPU, data and sizes, and reports the
*ratios* measured side by side (absolute numbers move with the machine and its load).

    python benchmarks/generate.py --json out.json            # batch 1 and 32
    python benchmarks/generate.py --batches 1 --new-tokens 8  # a quick look
    python benchmarks/generate.py --breakdown                 # where our loop's time goes
    python benchmarks/generate.py --device gpu --width 768 --layers 12 --heads 12 \
        --vocab 50257 --neighbour-table-mib 8192              # GPT-2 small's shape, a GPU

Both sides generate ``--new-tokens`` tokens greedily for a batch of images, retrieving
``--k`` neighbours every ``--chunk`` tokens with the query ``E(text so far, image)``:

* ours: ``ravlm_jax.generate`` (prefill, outer ``lax.scan`` over chunks, inner over tokens,
  static KV cache, per-chunk memory K/V), with the ScaNN index called through
  ``jax.pure_callback`` (``scann``) and with the in-graph exact search (``exact``);
* baseline: ``transformers.GPT2LMHeadModel`` with cross-attention, ``generate()`` for each
  chunk (greedy, KV cache within the call), and between chunks, in Python: the query
  (``[CLS] ids [SEP]`` through a ``BertModel`` text tower, mean pooling, projection and the
  same fusion), the same ScaNN search (the same host function, same leakage filter), and
  the new memory ``[image tokens ; neighbour embeddings]``.

Sizes (defaults): decoder width 256, 3 layers, 4 heads, vocabulary 30,522 (BERT's, as in
the demo); text tower MiniLM-L6-sized (384 wide, 6 layers); memory 36 image tokens + k=4
neighbours x 16 tokens = 100 slots; a 20,000-row datastore of 256-d unit vectors with a
tree + AH ScaNN index. Image features are given to both (the towers are not what is
measured). Weights are random on both sides (same sizes, not the same values), and neither
side stops at EOS: both generate every token. The neighbour memory is linear (no
neighbour layers), so ours gathers each chunk's neighbour K/V from per-vocabulary tables
built once per parameter set, in the warm-up call; their size and build time are printed
(``--neighbour-table-mib 0``: project each chunk's neighbours instead, as the baseline
does).

``--device gpu``: both models on the GPU (torch on ``cuda``, ours on JAX's default backend);
the ScaNN search stays on the host for both, the exact search runs in-graph on the GPU.
``--skip-torch`` (or torch missing: it is the optional ``bench`` extra) times ours alone.

Timing: one warm-up call each (compilation for ours, allocator and kernel warm-up for
torch), then ``--repeats`` rounds of one timed call each, interleaved (the order reversed
every other round), so a change in the shared machine's load falls on all of them alike.
Tokens/s and the speedups use each side's best call (the median is reported too: on a
shared CPU the slow calls measure the neighbours' load, not the code); the median of the
per-round ratios is reported beside them. JSON keys ``speedup_b1`` / ``speedup_b32``
compare ours (ScaNN callback) with the baseline; ``speedup_exact`` uses the in-graph exact
search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import machine, torch_skip_note, versions  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--rows", type=int, default=20_000, help="datastore rows")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--image-tokens", type=int, default=36)
    p.add_argument("--neighbour-len", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of both sides (bfloat16: ours f32 parameters with bf16 "
                        "compute, torch's modules cast to bf16)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--neighbour-table-mib", type=float, default=512.0,
                   help="ours: keep per-vocabulary neighbour K/V tables up to this size "
                        "(GenerateConfig.neighbour_table_mib; 0: project every chunk)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--skip-torch", action="store_true", help="time ours only")
    p.add_argument("--breakdown", action="store_true",
                   help="ours only: decoding alone, + neighbours once, + every chunk")
    return p.parse_args(argv)


# ============================================================================ shared data


class Setup:
    """Sizes, the datastore (ScaNN index + payload) and the image features of both sides."""

    def __init__(self, a: argparse.Namespace):
        from ravlm_jax.generate import ScannRetriever
        from ravlm_jax.retrieval.index import ScannIndex

        self.a = a
        rs = np.random.RandomState(a.seed)
        self.embed_dim, self.text_width, self.image_width = 256, 384, 320
        emb = rs.randn(a.rows, self.embed_dim).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        lengths = rs.randint(5, a.neighbour_len + 1, a.rows)
        tokens = rs.randint(1000, a.vocab, (a.rows, a.neighbour_len)).astype(np.int32)
        tokens[np.arange(a.neighbour_len)[None, :] >= lengths[:, None]] = 0
        t0 = time.perf_counter()
        index = ScannIndex.build(emb, mode="tree_ah")
        self.index_build_s = time.perf_counter() - t0
        self.emb, self.tokens, self.groups = emb, tokens, np.arange(a.rows) // 5
        self.scann = ScannRetriever(index, tokens, self.groups)
        self.max_batch = max(a.batches)
        self.image_tokens = rs.randn(self.max_batch, a.image_tokens,
                                     self.image_width).astype(np.float32)
        self.image_pooled = rs.randn(self.max_batch, self.image_width).astype(np.float32)


class TimedSearch:
    """Wraps a retriever's host search to count its calls and time (the callback's cost)."""

    def __init__(self, retriever):
        self.retriever, self.inner = retriever, retriever.host_search
        self.calls, self.seconds = 0, 0.0
        retriever.host_search = self

    def __call__(self, q, exclude, k):
        t0 = time.perf_counter()
        out = self.inner(q, exclude, k)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def timed(fn, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls, after the caller's warm-up call."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def interleaved(contenders: dict, repeats: int, search: TimedSearch
                ) -> tuple[dict[str, list[float]], dict[str, tuple[int, float]]]:
    """Wall times of ``repeats`` rounds, one call of each contender per round, the order
    reversed every other round: a change in the machine's load (it is shared) then falls
    on every contender alike, and round r's times can be compared with each other. Also
    returns each contender's host-search (calls, seconds)."""
    times = {name: [] for name in contenders}
    searches = dict.fromkeys(contenders, (0, 0.0))
    order = list(contenders)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            calls, seconds = search.calls, search.seconds
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
            c, sec = searches[name]
            searches[name] = (c + search.calls - calls, sec + search.seconds - seconds)
    return times, searches


# ============================================================================ ours


def build_ours(s: Setup):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ravlm_jax.models.captioner import Captioner, CaptionerConfig
    from ravlm_jax.models.decoder import Decoder, DecoderConfig
    from ravlm_jax.models.dual_encoder import DualEncoder, DualEncoderConfig
    from ravlm_jax.models.text import Bert, BertConfig
    from ravlm_jax.models.vit import ViT, ViTConfig

    a = s.a
    dtype = jnp.dtype(a.dtype)

    def factory():
        rngs = nnx.Rngs(0)
        image = ViT(ViTConfig(image_size=32, patch_size=16, width=s.image_width, layers=1,
                              heads=4, mlp_dim=64), rngs=rngs)  # unused: features are given
        text = Bert(BertConfig(vocab_size=a.vocab, width=s.text_width, layers=6, heads=12,
                               mlp_dim=4 * s.text_width, max_len=64), rngs=rngs, dtype=dtype)
        enc = DualEncoder(image, text, DualEncoderConfig(
            image_width=s.image_width, text_width=s.text_width, embed_dim=s.embed_dim),
            rngs=rngs)
        dec = Decoder(DecoderConfig(vocab_size=a.vocab, n_positions=64, width=a.width,
                                    layers=a.layers, heads=a.heads, cross_attention=True,
                                    dtype=dtype),
                      rngs=rngs)
        return Captioner(enc, dec, CaptionerConfig(
            image_width=s.image_width, k_max=max(a.k, 1), neighbour_len=a.neighbour_len,
            neighbour_layers=0, chunk_len=a.chunk), rngs=rngs)

    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rs = np.random.RandomState(a.seed + 1)
    fill = lambda path, x: jnp.asarray(rs.normal(0.0, 0.02, x.shape) + (
        1.0 if path[-1].key == "scale" else 0.0), x.dtype)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def generator(s: Setup, model, retriever, k: int, chunk: int):
    """Our greedy generator for the flags' sizes."""
    from ravlm_jax.generate import GenerateConfig, make_generator

    a = s.a
    cfg = GenerateConfig(strategy="greedy", max_len=a.new_tokens, bos_id=101, eos_id=102,
                         pad_id=0, neighbour_table_mib=a.neighbour_table_mib)
    return make_generator(model, retriever, cfg, k=k, chunk_len=chunk)


def run_ours(s: Setup, model, retriever, batch: int, k: int | None = None,
             chunk: int | None = None):
    """A call of our loop on ``batch`` images (``k`` / ``chunk`` default to the flags)."""
    gen = generator(s, model, retriever, s.a.k if k is None else k,
                    s.a.chunk if chunk is None else chunk)
    features = (s.image_tokens[:batch], s.image_pooled[:batch])
    if s.a.device == "gpu":  # on the device once, as the baseline's tensors are
        import jax

        features = jax.device_put(features)
    return lambda: gen(features)


# ============================================================================ baseline


def torch_device(a: argparse.Namespace):
    import torch

    return torch.device("cuda" if a.device == "gpu" else "cpu")


def build_baseline(s: Setup):
    import torch
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    a = s.a
    torch.manual_seed(a.seed)
    if a.device == "gpu":  # JAX runs float32 GPU matmuls at its default (TF32) precision
        torch.set_float32_matmul_precision("high")
    gpt2 = GPT2LMHeadModel(GPT2Config(
        vocab_size=a.vocab, n_positions=64, n_embd=a.width, n_layer=a.layers, n_head=a.heads,
        add_cross_attention=True, bos_token_id=101, eos_token_id=None, pad_token_id=0))
    bert = BertModel(BertConfig(vocab_size=a.vocab, hidden_size=s.text_width,
                                num_hidden_layers=6, num_attention_heads=12,
                                intermediate_size=4 * s.text_width, max_position_embeddings=64),
                     add_pooling_layer=False)

    class Parts(torch.nn.Module):
        """The captioner's pieces outside GPT-2: memory adapters, projections, fusion."""

        def __init__(self):
            super().__init__()
            self.image_norm = torch.nn.LayerNorm(s.image_width)
            self.image_adapter = torch.nn.Linear(s.image_width, a.width)
            self.neighbour_pos = torch.nn.Embedding(a.neighbour_len, a.width)
            self.neighbour_slot = torch.nn.Embedding(max(a.k, 1), a.width)
            self.image_proj = torch.nn.Linear(s.image_width, s.embed_dim)
            self.text_proj = torch.nn.Linear(s.text_width, s.embed_dim)
            self.fusion = torch.nn.Linear(2 * s.embed_dim, s.embed_dim)

    parts = Parts()
    for m in (gpt2, bert, parts):
        m.eval()
        m.to(device=torch_device(a), dtype=getattr(torch, a.dtype))
    return gpt2, bert, parts


def run_baseline(s: Setup, models, batch: int):
    import torch
    import torch.nn.functional as F

    gpt2, bert, parts = models
    a = s.a
    chunks = -(-a.new_tokens // a.chunk)
    dtype, dev = getattr(torch, a.dtype), torch_device(a)
    image_tokens = torch.from_numpy(s.image_tokens[:batch]).to(dev, dtype)
    image_pooled = torch.from_numpy(s.image_pooled[:batch]).to(dev, dtype)
    exclude = np.full((batch,), -2, np.int32)

    @torch.no_grad()
    def generate():
        image_mem = parts.image_adapter(parts.image_norm(image_tokens))  # [B, Ti, W]
        u_img = F.normalize(parts.image_proj(image_pooled), dim=-1)  # [B, D]
        ids = torch.full((batch, 1), 101, dtype=torch.long, device=dev)  # BOS
        for c in range(chunks):
            if c == 0:
                q = u_img
            else:  # the query text: [CLS] generated ids [SEP], as ours forms it
                text = ids[:, 1:]
                q_ids = torch.cat([torch.full((batch, 1), 101, device=dev), text,
                                   torch.full((batch, 1), 102, device=dev)], 1)
                hidden = bert(input_ids=q_ids).last_hidden_state  # [B, L, Wt]
                u_txt = F.normalize(parts.text_proj(hidden.mean(1)), dim=-1)
                both = u_img + u_txt + parts.fusion(torch.cat([u_img, u_txt], -1))
                q = F.normalize(both, dim=-1)
            _, rows, tokens = s.scann.host_search(q.float().cpu().numpy(), exclude,
                                                  a.k)  # Python, host
            nb = torch.from_numpy(tokens).long().to(dev)  # [B, k, Ln]
            nb_mem = (gpt2.transformer.wte(nb) + parts.neighbour_pos.weight[None, None]
                      + parts.neighbour_slot.weight[None, :, None])  # [B, k, Ln, W]
            memory = torch.cat([image_mem, nb_mem.reshape(batch, -1, a.width)], 1)
            shown = torch.from_numpy(rows >= 0).to(dev)[..., None]  # [B, k, 1]
            memory_mask = torch.cat([torch.ones(image_mem.shape[:2], dtype=torch.long,
                                                device=dev),
                                     ((nb != 0) & shown).reshape(batch, -1).long()], 1)
            new = min(a.chunk, a.new_tokens - c * a.chunk)
            ids = gpt2.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                encoder_hidden_states=memory,
                                encoder_attention_mask=memory_mask, max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, num_beams=1,
                                pad_token_id=0, eos_token_id=None, use_cache=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return ids

    return generate


# ============================================================================ breakdown


def breakdown(a: argparse.Namespace) -> dict:
    """Our loop with its parts switched on one at a time (no torch needed)."""
    from ravlm_jax.generate import ExactRetriever

    s = Setup(a)
    model = build_ours(s)
    exact = ExactRetriever((s.emb, s.tokens, s.groups))
    variants = (("decoding only (k=0, one chunk)", None, 0, a.new_tokens),
                ("+ neighbours retrieved once", exact, a.k, a.new_tokens),
                ("+ retrieval every chunk (exact)", exact, a.k, a.chunk),
                ("+ retrieval every chunk (scann)", s.scann, a.k, a.chunk))
    out = {}
    for b in a.batches:
        for name, retriever, k, chunk in variants:
            fn = run_ours(s, model, retriever, b, k, chunk)
            fn()  # compile
            best = min(timed(fn, a.repeats))
            out[f"b{b} {name}"] = round(best, 4)
            print(f"batch {b:3d} {name:34s} {best * 1e3:8.1f} ms", flush=True)
    return out


# ============================================================================ main


def neighbour_tables_cost(s: Setup, model) -> dict:
    """Our one-time cost the timed calls do not show: the per-vocabulary neighbour K/V
    tables, built in each generator's first call (the warm-up) and reused while the
    parameters stay the same (best of 3 compiled builds)."""
    import jax

    mib = model.neighbour_tables_mib()
    if not generator(s, model, s.scann, s.a.k, s.a.chunk).keeps_neighbour_tables:
        print("neighbour tables: not kept (each chunk projects its neighbours)", flush=True)
        return {"kept": False, "mib": round(mib, 1)}
    build = jax.jit(model.neighbour_tables)
    jax.block_until_ready(build())
    best = min(timed(lambda: jax.block_until_ready(build()), 3))
    print(f"neighbour tables: {mib:.0f} MiB, built once per parameter set in "
          f"{best * 1e3:.0f} ms", flush=True)
    return {"kept": True, "mib": round(mib, 1), "build_s": round(best, 4)}


def main(a: argparse.Namespace) -> dict:
    import jax

    if a.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu, but JAX's backend is {jax.default_backend()}")
    skip = torch_skip_note(a.skip_torch, a.device)
    torch_threads = None
    if skip is None:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        torch_threads = torch.get_num_threads()
    else:
        print(skip, flush=True)
    from ravlm_jax.generate import ExactRetriever

    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(a.device), "device": a.device,
        "command": "python " + " ".join(sys.argv), "versions": versions(),
        "torch_threads": torch_threads, "torch_note": skip,
        "sizes": {"decoder_width": a.width, "layers": a.layers, "heads": a.heads,
                  "vocab": a.vocab, "memory": a.image_tokens + a.k * a.neighbour_len,
                  "new_tokens": a.new_tokens, "chunk": a.chunk, "k": a.k,
                  "datastore_rows": a.rows, "text_tower": "BERT 384 x 6 (MiniLM-L6 size)"},
        "repeats": a.repeats, "dtype": a.dtype,
    }
    s = Setup(a)
    ours_model = build_ours(s)
    exact = ExactRetriever((s.emb, s.tokens, s.groups))
    result["neighbour_tables"] = neighbour_tables_cost(s, ours_model)
    baseline = build_baseline(s) if skip is None else None
    search = TimedSearch(s.scann)
    chunks = -(-a.new_tokens // a.chunk)
    for b in a.batches:
        tokens = b * a.new_tokens
        contenders = {"ours_scann": run_ours(s, ours_model, s.scann, b),
                      "ours_exact": run_ours(s, ours_model, exact, b)}
        if baseline is not None:
            contenders["hf_torch"] = run_baseline(s, baseline, b)
        first = {}
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()  # warm-up: compilation for ours, allocators and kernels for torch
            first[name] = time.perf_counter() - t0
        times, searches = interleaved(contenders, a.repeats, search)
        row = {}
        for name in contenders:
            best, median = min(times[name]), statistics.median(times[name])
            row[name] = {"seconds": round(best, 4), "median_s": round(median, 4),
                         "tokens_per_s": round(tokens / best, 1),
                         "first_call_s": round(first[name], 2),
                         "runs_s": [round(t, 4) for t in times[name]]}
            calls, seconds = searches[name]
            if calls:
                row[name]["retrieval_per_chunk_ms"] = round(1e3 * seconds / calls, 3)
                row[name]["retrieval_share"] = round(seconds / a.repeats / median, 3)
                row[name]["retrieval_calls_per_run"] = calls / a.repeats
            print(f"batch {b:3d} {name:11s} {tokens / best:9.1f} tok/s  "
                  f"(best {best * 1e3:.0f} ms, median {median * 1e3:.0f} ms; first call "
                  f"{first[name]:.1f} s)", flush=True)
        row["chunks"] = chunks
        result[f"batch_{b}"] = row
        result[f"speedup_b{b}"] = None
        if baseline is None:
            continue
        for ours in ("scann", "exact"):
            ratios = [t / o for t, o in
                      zip(times["hf_torch"], times[f"ours_{ours}"], strict=True)]
            row[f"speedup_{ours}_rounds"] = [round(r, 3) for r in ratios]
            row[f"speedup_{ours}_round_median"] = round(statistics.median(ratios), 2)
            row[f"speedup_{ours}"] = round(
                row["hf_torch"]["seconds"] / row[f"ours_{ours}"]["seconds"], 2)
        result[f"speedup_b{b}"] = row["speedup_scann"]
        print(f"batch {b:3d} speedup: {row['speedup_scann']:.2f}x (scann callback), "
              f"{row['speedup_exact']:.2f}x (exact in-graph); median of the per-round "
              f"ratios {row['speedup_scann_round_median']:.2f}x / "
              f"{row['speedup_exact_round_median']:.2f}x", flush=True)
    return result


def cli(argv: list[str] | None = None) -> dict:
    """Parse flags, run, write ``--json``. Sets the environment before JAX and torch start
    (where they have not yet)."""
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        # torch's OpenMP threads spin at every op's barrier by default; on a CPU shared
        # with other work a descheduled spinner stalls each op by a time slice. Passive
        # waiting is the fair setting for the baseline (as in benchmarks/train_step.py).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    else:  # JAX and torch share the GPU: JAX must not preallocate 75% of it
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    out = breakdown(args) if args.breakdown else main(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    cli()
