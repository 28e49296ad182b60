"""``train_and_evaluate(config, workdir)``: the stages of a run, resumable at any moment.

Stages (``config.train.stages``):

1. ``contrastive``: align the dual encoder (projections, fusion, and any tower the config
   does not freeze) with an in-batch contrastive loss;
2. ``datastore``: encode the training captions with the aligned encoder and write the
   datastore (``WORKDIR/datastore``) with its index;
3. ``caption``: for every training example and every generation chunk, retrieve the top-K
   neighbours with the query generation will use at that chunk (leakage-filtered), then
   train the decoder by teacher forcing on k sampled neighbours per chunk.

Then the model is exported (``WORKDIR/model``), evaluated (``WORKDIR/eval.json``) and the
curves are drawn (``WORKDIR/curves.png``). Every stage checkpoints (train state + data
iterator state) with orbax; a rerun with the same workdir resumes where the last one
stopped and produces the same metrics, step for step.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from ravlm_jax.data.pipeline import IndexLoader, loader_from_config
from ravlm_jax.data.sources import open_source
from ravlm_jax.data.tokenizers import SubsetTokenizer, get_tokenizer
from ravlm_jax.models.factory import (
    build_captioner,
    compute_dtype,
    pretrained_tower_arrays,
)
from ravlm_jax.retrieval.datastore import (
    Datastore,
    build_datastore,
    dual_encoder_fingerprint,
    search_filtered,
)
from ravlm_jax.retrieval.index import ExactIndex
from ravlm_jax.sharding import batch_sharding, create_sharded, make_mesh, state_shardings
from ravlm_jax.train import features as feats
from ravlm_jax.train.checkpoint import StageCheckpoints, abstract_with_shardings
from ravlm_jax.train.encode import datastore_rows, text_keys
from ravlm_jax.train.export import VOCAB_FILE, decoder_tokenizer, export_model, text_tokenizer
from ravlm_jax.train.metrics import MetricsWriter, check_finite, plot_curves
from ravlm_jax.train.state import (
    count,
    create_train_state,
    make_optimizer,
    split_model,
)
from ravlm_jax.train.steps import (
    caption_loss_fn,
    compile_step,
    contrastive_loss_fn,
    make_train_step,
)
from ravlm_jax.train.tables import CaptionTables, SplitCaptions, caption_tables

log = logging.getLogger(__name__)

STAGES = ("contrastive", "datastore", "caption")


def say(msg: str) -> None:
    tqdm.write(msg)
    sys.stdout.flush()


# ------------------------------------------------------------------ run setup

def mesh_from_config(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    shape = tuple(config.mesh.shape)
    devices = jax.devices()
    if -1 not in shape:
        need = math.prod(shape)
        if need > len(devices):
            raise ValueError(f"mesh {shape} needs {need} devices, {len(devices)} available")
        devices = devices[:need]
    return make_mesh(shape, devices)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "scann",
                "tensorflow-datasets", "transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def write_run_info(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """The resolved config (checked against the one a resumed run was started with),
    package versions and git commit."""
    cfg_path = workdir / "config.json"
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        new = json.loads(text)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                         and k not in ("eval",))
        if changed:
            raise ValueError(f"{workdir} holds a run with a different config (section "
                             f"{changed[0]!r} differs); use a new --workdir")
    cfg_path.write_text(text)
    info = {"versions": _versions(), "git_commit": _git_commit(),
            "devices": [str(d) for d in jax.devices()], "argv": sys.argv}
    (workdir / "run_info.json").write_text(json.dumps(info, indent=2))


class Run:
    """Everything the stages share: mesh, tokenizers, the training split, tables, model."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        config = config.copy_and_resolve_references()
        self.config, self.workdir = config, workdir
        self.mesh = mesh_from_config(config)
        self.replicated = NamedSharding(self.mesh, P())
        self.progress = bool(config.train.get("progress", True))
        self.text_tok = text_tokenizer(config)
        self.train_source = open_source(config.data, "train")
        self.train_captions = SplitCaptions.read(self.train_source,
                                                 int(config.data.get("max_captions", 1)))
        self.dec_tok = self.resolve_decoder_vocab()
        write_run_info(workdir, config)
        self.tables = self.make_tables(self.train_captions)
        self.model = self.make_model()
        self.cached = self._use_cache()
        self.features: dict[str, np.ndarray] = {}

    # -- data
    def resolve_decoder_vocab(self):
        """The decoder's tokenizer; with ``model.decoder_vocab = "train"``, the subset of
        word pieces the training captions use (saved in the workdir, so a resumed run and
        the exported model use the same one). Sets ``model.decoder.vocab_size``."""
        cfg = self.config
        vocab_file = self.workdir / VOCAB_FILE
        if cfg.model.get("decoder_vocab", "full") == "train" and not vocab_file.exists():
            base = get_tokenizer(cfg.model.tokenizer)
            SubsetTokenizer.from_texts(base, self.train_captions.all_texts()).save(vocab_file)
        tok = decoder_tokenizer(cfg, self.workdir)
        cfg.model.decoder.vocab_size = tok.vocab_size
        return tok

    def vocab_file(self) -> Path | None:
        path = self.workdir / VOCAB_FILE
        return path if path.exists() else None

    def make_tables(self, captions: SplitCaptions) -> CaptionTables:
        return caption_tables(self.config, captions, self.text_tok, self.dec_tok)

    # -- model
    def make_model(self):
        cfg = self.config
        model = create_sharded(lambda: build_captioner(cfg.model, nnx.Rngs(cfg.seed)),
                               self.mesh)
        arrays = pretrained_tower_arrays(cfg.model)
        if arrays:
            graphdef, state = nnx.split(model)
            flat = dict(nnx.to_flat_state(state))
            shardings = dict(nnx.to_flat_state(state_shardings(state, self.mesh)))
            for path, var in flat.items():
                key = ".".join(str(p) for p in path)
                if key in arrays:
                    sh = shardings[path].get_value()
                    var.set_value(jax.device_put(arrays[key].astype(var.get_value().dtype), sh))
            model = nnx.merge(graphdef, state)
        return model

    def _use_cache(self) -> bool:
        if not self.config.train.get("cache_frozen_features", True):
            return False
        graphdef, params, frozen, rest = split_model(self.model, self.config.model.freeze)
        flat = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(frozen)]
        towers = ("encoder.image_tower.", "encoder.text_tower.")
        tower_params = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(
            nnx.state(self.model, nnx.Param)) if ".".join(map(str, p)).startswith(towers)]
        return bool(tower_params) and set(tower_params) <= set(flat)

    def put(self, tree: Any) -> Any:
        """Host arrays -> replicated device arrays."""
        return jax.device_put(tree, self.replicated)

    def batch_to_device(self, batch: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict:
        return {k: jax.make_array_from_process_local_data(
            batch_sharding(self.mesh, batch[k].ndim), batch[k]) for k in keys}

    # -- feature cache (frozen towers)
    def ensure_features(self) -> None:
        if not self.cached or self.features:
            return
        path = self.workdir / "cache" / "train_features.npz"
        cached = feats.load_cache(path)
        if cached is None:
            t0 = time.perf_counter()
            say("caching frozen-tower features of the training split")
            cfg = self.config
            _, loader = loader_from_config(cfg.data, "train", batch_size=int(
                cfg.train.get("feature_batch_size", 64)), shuffle=False, num_epochs=1,
                remainder="pad")
            pooled, tokens = feats.image_features(self.model, loader, len(self.train_source),
                                                  self.mesh, self.progress)
            t = self.tables
            text = feats.text_features(self.model, t.text_ids, t.text_mask, self.mesh,
                                       progress=self.progress, desc="caption features")
            prefix = feats.text_features(self.model, t.prefix_ids, t.prefix_mask, self.mesh,
                                         progress=self.progress, desc="prefix features")
            cached = {"image_pooled": pooled, "image_tokens": tokens, "text_pooled": text,
                      "prefix_pooled": prefix}
            feats.save_cache(path, **cached)
            say(f"cached features in {time.perf_counter() - t0:.1f}s: image tokens "
                f"{tokens.shape}, captions {text.shape}, prefixes {prefix.shape}")
        self.features = cached

    def train_loader(self, batch_size: int, seed: int, rows: np.ndarray | None = None):
        if self.cached:
            return IndexLoader(len(self.train_source), batch_size=batch_size, seed=seed,
                               rows=rows)
        if rows is not None:
            raise ValueError("training on a subset of rows (cross-fitting) needs the "
                             "frozen-feature cache (train.cache_frozen_features with frozen "
                             "towers)")
        _, loader = loader_from_config(self.config.data, "train", batch_size=batch_size,
                                       seed=seed)
        return loader


# ------------------------------------------------------------------ generic stage loop

def run_stage(run: Run, stage: str, loss_fn, tables: dict[str, np.ndarray],
              frozen_patterns: tuple[str, ...], cfg: ml_collections.ConfigDict,
              rows: np.ndarray | None = None) -> None:
    """Train one stage to ``cfg.steps`` (on all training rows, or ``rows``), resuming from
    its newest checkpoint; updates ``run.model`` with the trained parameters."""
    config, workdir, mesh = run.config, run.workdir, run.mesh
    steps, batch_size = int(cfg.steps), int(cfg.batch_size)
    graphdef, params, frozen, rest = split_model(run.model, frozen_patterns)
    tx, schedule = make_optimizer(cfg, steps)
    say(f"[{stage}] trainable {count(params):,} params, frozen {count(frozen):,}")
    state, state_sh = create_train_state(params, tx, mesh)
    ckpt = StageCheckpoints(workdir, stage, max_to_keep=int(config.train.keep_checkpoints))
    seed = int(config.seed) + (STAGES.index(stage) if stage in STAGES else
                               len(STAGES) + sum(map(ord, stage)))
    loader = run.train_loader(batch_size, seed, rows)
    restored = ckpt.restore_latest(abstract_with_shardings(state))
    start = 0
    if restored is not None:
        start, state, data_state = restored
        if data_state:
            loader.set_state(data_state)
        say(f"[{stage}] resumed from step {start}")
    if start >= steps:
        run.model = nnx.merge(graphdef, state.params, frozen, rest)
        ckpt.close()
        return

    batch_keys = ("source_id",) if run.cached else ("source_id", "pixels")
    dev_tables = run.put(tables)
    table_sh = jax.tree.map(lambda _: run.replicated, dev_tables)
    frozen_sh = state_shardings(frozen, mesh)
    first = next(loader)
    batch_sh = {k: batch_sharding(mesh, first[k].ndim) for k in batch_keys}
    step_fn = make_train_step(loss_fn, tx, schedule, graphdef, seed, state_sh, frozen_sh,
                              table_sh, batch_sh, run.replicated)
    dev_batch = run.batch_to_device(first, batch_keys)
    with jax.set_mesh(mesh):
        compiled, info = compile_step(step_fn, state, frozen, rest, dev_tables, dev_batch)
    say(f"[{stage}] step compiled: {json.dumps(info)}")
    (workdir / f"compile_{stage}.json").write_text(json.dumps(info, indent=2))

    writer = MetricsWriter(workdir, stage, resume_step=start)
    log_every = max(int(config.train.log_every), 1)
    ckpt_every = max(int(config.train.checkpoint_every), 1)
    bar = tqdm(total=steps, initial=start, desc=stage, unit="step", disable=not run.progress)
    t_last, n_last = time.perf_counter(), 0
    batch = first
    try:
        for step in range(start, steps):
            if step > start:
                batch = next(loader)
            with jax.set_mesh(mesh):
                state, metrics = compiled(state, frozen, rest, dev_tables,
                                          run.batch_to_device(batch, batch_keys))
            loss = float(metrics["loss"])  # host sync: the NaN guard checks every step
            check_finite(stage, step + 1, {"loss": loss})
            n_last += batch_size
            bar.update(1)
            done = step + 1
            if done % log_every == 0 or done == steps:
                now = time.perf_counter()
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                row["examples_per_sec"] = n_last / max(now - t_last, 1e-9)
                check_finite(stage, done, row)
                writer.write(done, row)
                bar.set_postfix(loss=f"{loss:.4f}")
                t_last, n_last = now, 0
            if done % ckpt_every == 0 or done == steps:
                ckpt.save(done, state, loader.get_state(), force=done == steps)
        ckpt.wait()
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        if hasattr(loader, "close"):
            loader.close()
    skipped = getattr(loader, "skipped", {})
    if any(skipped.values()):
        say(f"[{stage}] skipped examples: {skipped}")
    run.model = nnx.merge(graphdef, state.params, frozen, rest)


# ------------------------------------------------------------------ stages

def _tables_for_step(run: Run) -> dict[str, np.ndarray]:
    t = run.tables.device_arrays()
    if run.cached:
        run.ensure_features()
        t = dict(t, **run.features)
    return t


def stage_contrastive(run: Run, stage: str = "contrastive", rows: np.ndarray | None = None
                      ) -> None:
    cfg = run.config.train.contrastive
    tables = _tables_for_step(run)
    tables.pop("image_tokens", None)
    for k in ("dec_ids", "dec_mask"):
        tables.pop(k)
    # only the encoder trains here (minus the towers the config freezes)
    frozen = tuple(run.config.model.freeze) + (r"(?!encoder\.)",)
    run_stage(run, stage, contrastive_loss_fn(cfg.loss, float(cfg.prefix_loss_weight)),
              tables, frozen, cfg, rows)


def encoder_fingerprint_of(run: Run) -> str:
    return dual_encoder_fingerprint(run.model.encoder, run.config.model)


def build_run_datastore(run: Run, out: Path, parts: list[tuple[Any, CaptionTables, dict | None,
                                                               str]]) -> Path:
    if (out / "manifest.json").exists():
        return out
    batches = []
    for source, tables, features, split in parts:
        keys = text_keys(run.model.encoder, tables, features, run.mesh, run.progress)
        batches += datastore_rows(source, tables, keys, split, run.dec_tok,
                                  int(run.config.model.captioner.neighbour_len), run.workdir)
    r = run.config.retrieval
    return build_datastore(out, lambda b: b["keys"], batches,
                           fingerprint=encoder_fingerprint_of(run),
                           config_dict=run.config.to_dict(), tokenizer_name=run.dec_tok.name,
                           dtype=str(r.dtype), index_kind=str(r.index),
                           index_params=dict(r.index_params), pad_id=run.dec_tok.pad_id,
                           progress=run.progress)


def stage_datastore(run: Run) -> None:
    if run.cached:
        run.ensure_features()
    path = build_run_datastore(run, run.workdir / "datastore",
                               [(run.train_source, run.tables,
                                 run.features if run.cached else None, "train")])
    say(f"[datastore] {path} ({Datastore.load(path).size} rows)")


def open_datastore(run: Run, path: Path | None = None) -> Datastore:
    path = path or run.workdir / "datastore"
    return Datastore.load(path, expect_fingerprint=encoder_fingerprint_of(run),
                          mesh=run.mesh)


def query_vectors(run: Run, tables: CaptionTables, features: dict | None,
                  image_pooled: np.ndarray | None = None) -> np.ndarray:
    """The query of every (example, caption, chunk) [N, R, C, D]: the image alone at chunk 0
    (and wherever the prefix is empty or complete), E(prefix, image) elsewhere."""
    graphdef, state = nnx.split(run.model.encoder)
    if features is not None:
        img_pooled, pre_pooled = features["image_pooled"], features["prefix_pooled"]
    else:
        img_pooled = image_pooled
        pre_pooled = feats.text_features(run.model, tables.prefix_ids, tables.prefix_mask,
                                         run.mesh, progress=run.progress,
                                         desc="prefix features")

    def img_fn(state, pooled):
        return nnx.merge(graphdef, state).embed_image_pooled(pooled)

    u_img = feats.batched_apply(img_fn, state, (img_pooled,), 256, run.mesh)  # [N, D]
    n, r, c, wt = pre_pooled.shape
    flat_img = np.broadcast_to(u_img[:, None, None], (n, r, c, u_img.shape[-1]))
    flat_img = np.ascontiguousarray(flat_img).reshape(-1, u_img.shape[-1])

    def fuse_fn(state, u, pooled, has):
        e = nnx.merge(graphdef, state)
        return e.fuse(u, e.embed_text_pooled(pooled), has)

    q = feats.batched_apply(fuse_fn, state, (flat_img, pre_pooled.reshape(-1, wt),
                                             tables.prefix_valid.reshape(-1)), 256, run.mesh)
    return q.reshape(n, r, c, -1)


def encoder_image_pooled(run: Run, split: str, n: int) -> np.ndarray:
    _, loader = loader_from_config(run.config.data, split, batch_size=64, shuffle=False,
                                   num_epochs=1, remainder="pad")
    pooled, _ = feats.image_features(run.model, loader, n, run.mesh, run.progress)
    return pooled


def _search_train(run: Run, q: np.ndarray, index, datastore: Datastore, rows: np.ndarray
                  ) -> np.ndarray:
    """Leakage-filtered top-K datastore rows for the queries ``q [n, R, C, D]`` of training
    examples ``rows``; -> [n, R, C, K] int32."""
    n, r, c, d = q.shape
    top_k = int(run.config.retrieval.top_k)
    groups = np.repeat(run.tables.group_id[rows], r * c)
    sources = np.repeat(rows.astype(np.int64), r * c)
    _, ids = search_filtered(index, q.reshape(-1, d), top_k, groups, sources,
                             datastore.group_ids, datastore.source_ids, datastore.hashes)
    return ids.reshape(n, r, c, top_k).astype(np.int32)


def fold_of_rows(group_ids: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold per training row, assigned by group (never splitting a group)."""
    groups = np.unique(group_ids)
    order = np.random.default_rng(seed).permutation(len(groups))
    fold = dict(zip(groups[order].tolist(), (np.arange(len(groups)) % folds).tolist(),
                    strict=True))
    return np.array([fold[g] for g in group_ids.tolist()], np.int32)


def crossfit_queries_and_keys(run: Run, rows: np.ndarray, stage: str
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Train a fresh dual encoder (the contrastive stage) on every training row except
    ``rows``; return its queries for ``rows`` [n, R, C, D] and its keys for every datastore
    caption [N_ds, D] (the training captions, in datastore order)."""
    trained = run.model
    run.model = run.make_model()
    try:
        stage_contrastive(run, stage, np.setdiff1d(np.arange(len(run.train_source)), rows))
        q = query_vectors(run, run.tables, run.features)[rows]
        keys = text_keys(run.model.encoder, run.tables, run.features, run.mesh,
                         run.progress)  # [N, R, D]
        keys = np.concatenate([keys[i, :int(run.tables.count[i])]
                               for i in range(run.tables.size)])
    finally:
        run.model = trained
    return q, keys


def train_neighbours(run: Run, datastore: Datastore) -> np.ndarray:
    """[N, R, C, K] leakage-filtered neighbour rows for every training (example, caption,
    chunk), cached in the workdir.

    With ``retrieval.crossfit_folds = F > 1`` (needs the frozen-feature cache), the
    neighbours of each fold are retrieved by a dual encoder trained without that fold, as
    out-of-fold predictions are made in stacking. The final encoder was fit to every
    training image, so its retrieval for them is far better than for new images (OpenMoji:
    top-1 neighbour CIDEr-D 0.52 on training queries vs 0.35 on test ones); a decoder
    trained on such neighbours learns to trust them more than it should at test time.
    """
    folds = int(run.config.retrieval.get("crossfit_folds", 0))
    path = run.workdir / "cache" / "train_neighbours.npz"
    tag = f"{datastore.fingerprint}/folds={folds}"
    cached = feats.load_cache(path)
    if cached is not None and cached.get("fingerprint", np.array("")).item() == tag:
        return cached["neighbours"]
    t0 = time.perf_counter()
    n = len(run.train_source)
    if folds > 1:
        fold = fold_of_rows(run.tables.group_id, folds, int(run.config.seed))
        parts = []
        for f in range(folds):
            rows = np.flatnonzero(fold == f)
            q, keys = crossfit_queries_and_keys(run, rows, f"contrastive_fold{f}")
            index = ExactIndex.build(keys.astype(np.float32), run.mesh)
            parts.append((rows, _search_train(run, q, index, datastore, rows)))
        nb = np.zeros((n,) + parts[0][1].shape[1:], np.int32)
        for rows, ids in parts:
            nb[rows] = ids
    else:
        features = run.features if run.cached else None
        img = None if run.cached else encoder_image_pooled(run, "train", n)
        q = query_vectors(run, run.tables, features, img)  # [N, R, C, D]
        nb = _search_train(run, q, datastore.index, datastore, np.arange(n))
    feats.save_cache(path, neighbours=nb, fingerprint=np.array(tag))
    say(f"[caption] neighbours for {nb.shape[0] * nb.shape[1] * nb.shape[2]:,} queries "
        f"({'cross-fitted over ' + str(folds) + ' folds' if folds > 1 else 'final encoder'})"
        f" in {time.perf_counter() - t0:.1f}s")
    return nb


def stage_caption(run: Run) -> None:
    cfg, rcfg = run.config.train.caption, run.config.retrieval
    if run.cached:
        run.ensure_features()
    datastore = open_datastore(run)
    tables = _tables_for_step(run)
    for k in ("image_pooled", "text_pooled", "prefix_pooled", "text_ids", "text_mask",
              "prefix_ids", "prefix_mask", "prefix_valid"):
        tables.pop(k, None)
    tables["neighbours"] = train_neighbours(run, datastore)
    pay = np.asarray(datastore.token_ids)
    tables["payload_ids"] = pay
    tables["payload_mask"] = (pay != datastore.manifest["payload"]["pad_id"]).astype(np.int32)
    k_max = int(run.config.model.captioner.k_max)
    loss = caption_loss_fn(k_max, float(rcfg.k_dropout), float(rcfg.neighbour_dropout),
                           float(cfg.get("label_smoothing", 0.0)),
                           float(rcfg.get("image_dropout", 0.0)),
                           float(cfg.get("lm_loss_weight", 0.0)))
    # the encoder is fixed now: the datastore's keys were made with it
    frozen = tuple(run.config.model.freeze) + (r"encoder\.",)
    run_stage(run, "caption", loss, tables, frozen, cfg)


# ------------------------------------------------------------------ entry point

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    # config errors: one line each, before anything is written to the workdir
    unknown = [s for s in config.train.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}; stages are {STAGES}")
    if (float(config.train.caption.get("lm_loss_weight", 0.0))
            and not config.model.captioner.get("copy_head", False)):
        raise ValueError("train.caption.lm_loss_weight adds a loss on the LM head beside the "
                         "copy head's: it needs model.captioner.copy_head=true")
    compute_dtype(config.model)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run = Run(config, workdir)
    say(f"run: {len(run.train_source)} training examples, mesh {dict(run.mesh.shape)}, "
        f"frozen-feature cache {'on' if run.cached else 'off'}")
    for stage in config.train.stages:
        {"contrastive": stage_contrastive, "datastore": stage_datastore,
         "caption": stage_caption}[stage](run)
    export_model(workdir / "model", run.model, run.config, run.vocab_file())
    results: dict[str, Any] = {}
    if config.get("eval") and config.eval.get("enabled", True) and "caption" in \
            config.train.stages:
        from ravlm_jax.train.evaluation import evaluate_run

        results = evaluate_run(run)
        (workdir / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    plot_curves(workdir)
    say(f"done in {time.perf_counter() - t0:.1f}s: {workdir}")
    return results
