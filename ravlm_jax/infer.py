"""Inference for people: caption images, search the datastore by text, report as text, JSON
or one self-contained HTML page. ``infer.py`` at the repository root only parses flags.

* :func:`load_run`: a ``train.py`` workdir (or its ``model/`` directory) -> the captioner,
  its tokenizers and its datastore (the workdir's unless another is given).
* :func:`caption_images`: decode every path safely (each bad file becomes a one-line error
  naming it; the others are still captioned), then run the compiled generation loop
  (``ravlm_jax.generate``) in fixed-size batches, so one program serves every call.
* :func:`search_text`: the datastore's neighbours of ``E(text)``: articles with pictures.
* :func:`to_json`, :func:`format_result`, :func:`write_html`: the three reports.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_WORKDIR = Path("workdirs/demo")
HOW_TO_TRAIN = ("python train.py --config configs/demo.py --workdir workdirs/demo "
                "(or: make demo)")
THUMBNAIL = 160  # pixels, the longer side of images embedded in the HTML report


class InferError(ValueError):
    """A one-line error about the run or the request (not about one image)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ============================================================================ the run


@dataclass
class Run:
    """A trained model ready to caption: model, tokenizers, datastore and generators."""

    model: Any
    config: Any
    model_dir: Path
    datastore: Any
    tokenizer: Any
    text_tokenizer: Any
    mesh: Any
    load_s: float = 0.0
    _generators: dict = field(default_factory=dict)
    _retriever: Any = None

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def tower(self) -> str:
        return str(self.config.data.get("tower", "clip"))

    def retriever(self) -> Any:
        from ravlm_jax.generate import retriever_for  # noqa: PLC0415

        if self._retriever is None:
            self._retriever = retriever_for(self.datastore, mesh=self.mesh)
        return self._retriever

    def generator(self, k: int, query_lengths: int | None = None) -> Any:
        """One generator per (k, query_lengths); its compiled program is reused by every
        later call. ``query_lengths``: see ``GenerateConfig`` (None: the config's)."""
        from ravlm_jax.generate import make_generator  # noqa: PLC0415

        key = (k, query_lengths)
        if key not in self._generators:
            retriever = self.retriever() if k else None
            extra = {} if query_lengths is None else {"query_lengths": query_lengths}
            self._generators[key] = make_generator(
                self.model, retriever, self.config, k=k, mesh=self.mesh,
                tokenizer=self.tokenizer, text_tokenizer=self.text_tokenizer, **extra)
        return self._generators[key]


def _datastore_dir(checkpoint: Path, model_path: Path, datastore: str | None) -> Path | None:
    if datastore is not None:
        return Path(datastore)
    for candidate in (checkpoint / "datastore", model_path.parent / "datastore"):
        if (candidate / "manifest.json").is_file():
            return candidate
    return None


def load_run(checkpoint: str | os.PathLike | None = None, datastore: str | None = None,
             *, need_datastore: bool = True) -> Run:
    """Load a trained run. ``checkpoint``: a ``train.py`` workdir or a model directory
    (default: the demo's workdir); ``datastore``: a datastore directory (default: the
    workdir's). Every failure is one :class:`InferError` line saying what to do."""
    from ravlm_jax.retrieval.datastore import Datastore, dual_encoder_fingerprint  # noqa: PLC0415
    from ravlm_jax.sharding import make_mesh  # noqa: PLC0415
    from ravlm_jax.train import export  # noqa: PLC0415

    t0 = time.perf_counter()
    path = Path(checkpoint) if checkpoint is not None else DEFAULT_WORKDIR
    if checkpoint is None and not path.exists():
        raise InferError(f"no trained model in {DEFAULT_WORKDIR}: create one with "
                         f"{HOW_TO_TRAIN}, or pass --checkpoint DIR")
    try:
        mdir = export.model_dir(path).absolute()  # orbax wants absolute paths
        config = export.load_config_json(mdir)
        shape = tuple(config.mesh.shape) if "mesh" in config else None
        try:
            mesh = make_mesh(shape)
        except ValueError:  # a run trained on another machine: all devices on data
            mesh = make_mesh()
        model, config = export.load_model(mdir, mesh)
        tokenizer = export.decoder_tokenizer(config, mdir)
        text_tokenizer = export.text_tokenizer(config)
    except export.ModelNotFound as e:
        if (path / "checkpoints").is_dir():
            raise InferError(f"{path} has training checkpoints but no exported model yet: "
                             "rerun the same train.py command (it resumes) to finish the run "
                             "and write its model/") from None
        raise InferError(str(e)) from None
    except (OSError, ValueError, KeyError) as e:
        raise InferError(f"cannot load the model in {path}: {type(e).__name__}: {e}"
                         ) from None

    store = None
    ds_dir = _datastore_dir(path, mdir, datastore)
    if ds_dir is not None:
        fingerprint = dual_encoder_fingerprint(model.encoder, config.model)
        try:
            store = Datastore.load(ds_dir, expect_fingerprint=fingerprint,
                                   expect_dim=model.encoder.config.embed_dim, mesh=mesh)
        except ValueError as e:
            raise InferError(str(e)) from None
    elif need_datastore:
        raise InferError(f"no datastore for {path} (expected {path / 'datastore'}): pass "
                         "--datastore DIR, or --k 0 to caption without retrieval")
    return Run(model=model, config=config, model_dir=mdir, datastore=store,
               tokenizer=tokenizer, text_tokenizer=text_tokenizer, mesh=mesh,
               load_s=time.perf_counter() - t0)


# ============================================================================ results


@dataclass
class Neighbour:
    row: int
    text: str
    score: float
    image: str | None = None  # the datastore's image reference, resolved when a file


@dataclass
class Result:
    """One image's caption (or one text query's search), or the error that stopped it."""

    path: str
    caption: str | None = None
    prompt: str | None = None
    neighbours: list[Neighbour] = field(default_factory=list)
    chunks: list[list[Neighbour]] = field(default_factory=list)  # per chunk of the caption
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    image: np.ndarray | None = None  # the decoded query image (for the HTML report)

    @property
    def ok(self) -> bool:
        return self.error is None


def _neighbours(run: Run, rows: np.ndarray, scores: np.ndarray) -> list[Neighbour]:
    keep = rows >= 0
    rows, scores = rows[keep], scores[keep]
    if not len(rows):
        return []
    payload = run.datastore.payload(rows)
    refs = payload["image_ref"] or [None] * len(rows)
    return [Neighbour(int(r), t, float(s), _resolve_ref(run.datastore.directory, ref))
            for r, t, s, ref in zip(rows, payload["text"], scores, refs, strict=True)]


def _resolve_ref(directory: Path, ref: str | None) -> str | None:
    """An image reference -> an existing file path (absolute, or relative to the
    datastore), or the reference itself when it is not a file (shown as text)."""
    if not ref:
        return None
    path = Path(ref)
    for candidate in (path, directory / path):
        if candidate.is_file():
            return str(candidate.resolve())
    return ref


# ============================================================================ images


def read_image(path: str, size: int, tower: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (RGB uint8 [H, W, 3] for reports, preprocessed float32 [size, size, 3]).
    Raises ImageError (one line naming the file) for anything that is not a usable image."""
    from ravlm_jax.data.images import ImageError, decode_image, preprocess  # noqa: PLC0415

    p = Path(path)
    if p.is_dir():
        raise ImageError(f"{path}: is a directory, not an image")
    if not p.exists():
        raise ImageError(f"{path}: no such file")
    if p.is_file() and p.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    rgb = decode_image(p, name=path)
    return rgb, preprocess(rgb, size, tower)


def _batch_size(n: int, cap: int = 8) -> int:
    """Fixed batch sizes (powers of two up to ``cap``): few compiled programs."""
    return min(cap, 1 << max(0, (n - 1).bit_length()))


def _prompt_ids(run: Run, prompt: str | None, batch: int) -> tuple[Any, Any]:
    if not prompt:
        return None, None
    ids = run.tokenizer.encode(prompt, add_special_tokens=False)
    if not ids:
        return None, None
    ids = np.asarray(ids, np.int32)[None].repeat(batch, 0)  # [B, P]
    return ids, np.ones_like(ids)


def caption_images(run: Run, paths: Sequence[str], *, prompt: str | None = None, k: int = 4,
                   batch_size: int = 8) -> list[Result]:
    """Caption every image; an unusable file gets its one-line error and the others are
    still captioned. ``prompt``: the text half of the query and a prefix to continue."""
    from ravlm_jax.data.images import ImageError  # noqa: PLC0415
    from ravlm_jax.generate import decode_captions  # noqa: PLC0415

    if k < 0 or k > run.model.config.k_max:
        raise InferError(f"--k {k} is outside [0, {run.model.config.k_max}] (the model's "
                         "k_max)")
    if k and run.datastore is None:
        raise InferError("retrieval needs a datastore: pass --datastore DIR, or --k 0")
    results, pending = [], []
    for path in paths:
        t0 = time.perf_counter()
        result = Result(path=str(path), prompt=prompt)
        try:
            result.image, pixels = read_image(str(path), run.image_size, run.tower)
            pending.append((result, pixels))
        except ImageError as e:
            result.error = str(e)
        result.timings["preprocess_s"] = round(time.perf_counter() - t0, 4)
        results.append(result)

    if not pending:
        return results
    # One call (a few images): compile time dominates, so the loop gets one text-tower
    # length instead of one per chunk boundary (demo: 7.5 -> 4.4 s for its first caption).
    one_call = len(pending) <= batch_size
    gen = run.generator(k, query_lengths=1 if one_call else None)
    size = _batch_size(len(pending), batch_size)
    prompt_ids, prompt_mask = _prompt_ids(run, prompt, size)
    for start in range(0, len(pending), size):
        part = pending[start:start + size]
        pixels = np.stack([p for _, p in part])
        if len(part) < size:  # pad to the compiled batch size
            pixels = np.concatenate([pixels, np.repeat(pixels[-1:], size - len(part), 0)])
        t0 = time.perf_counter()
        out = gen(pixels, prompt_ids=prompt_ids, prompt_mask=prompt_mask)
        elapsed = time.perf_counter() - t0
        captions = decode_captions(run.tokenizer, out, gen.cfg.eos_id)
        for i, (result, _) in enumerate(part):
            result.caption = captions[i]
            if k:
                result.chunks = [_neighbours(run, out.neighbour_ids[i, c],
                                             out.neighbour_scores[i, c])
                                 for c in range(out.neighbour_ids.shape[1])]
                result.neighbours = result.chunks[0]
            result.timings["generate_s"] = round(elapsed / len(part), 4)
            result.timings["load_s"] = round(run.load_s, 4)
    return results


def search_text(run: Run, text: str, k: int = 4) -> Result:
    """The datastore's k nearest captions of ``E(text)`` (text-only query)."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    if run.datastore is None:
        raise InferError("a text search needs a datastore: pass --datastore DIR")
    if k < 1:
        raise InferError(f"--k must be >= 1 for a text search, got {k}")
    t0 = time.perf_counter()
    max_len = int(run.config.data.texts.caption.get("max_len", 32))
    max_len = min(max_len, run.model.encoder.text_tower.config.max_len)
    ids, mask = run.text_tokenizer.encode_batch([text], max_len)
    graphdef, state = nnx.split(run.model.encoder)
    encode = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode_text(i, m))
    with jax.set_mesh(run.mesh):
        q = np.asarray(jax.device_get(encode(state, ids, mask)))
    scores, rows = run.datastore.search(q, k)
    result = Result(path="", prompt=text, neighbours=_neighbours(run, rows[0], scores[0]))
    result.timings = {"search_s": round(time.perf_counter() - t0, 4),
                      "load_s": round(run.load_s, 4)}
    return result


# ============================================================================ reports


def to_json(result: Result) -> dict[str, Any]:
    """One JSON object: path, caption, neighbours (text, score, row, image), timings."""
    nb = lambda n: {"row": n.row, "text": n.text, "score": round(n.score, 6),
                    **({"image": n.image} if n.image else {})}
    out: dict[str, Any] = {"path": result.path} if result.path else {}
    if result.prompt is not None:
        out["prompt"] = result.prompt
    if result.error is not None:
        out["error"] = result.error
        return out
    if result.caption is not None:
        out["caption"] = result.caption
    out["neighbours"] = [nb(n) for n in result.neighbours]
    if len(result.chunks) > 1:
        out["neighbours_per_chunk"] = [[nb(n) for n in chunk] for chunk in result.chunks]
    out["timings"] = result.timings
    return out


def format_result(result: Result) -> str:
    """Human-readable lines: the caption, then each neighbour with its score."""
    if result.error is not None:
        return f"error: {result.error}"
    lines = []
    if result.path:
        head = f"{result.path}: "
        if result.prompt:
            head += f"[{result.prompt}] "
        lines.append(head + (result.caption or ""))
    else:
        lines.append(f"text query: {result.prompt}")
    for n in result.neighbours:
        lines.append(f"  {n.score:+.3f}  {n.text}")
    return "\n".join(lines)


def _data_uri(rgb: np.ndarray | None = None, path: str | None = None) -> str | None:
    """A small PNG thumbnail as a data: URI, from pixels or an image file."""
    from PIL import Image  # noqa: PLC0415

    from ravlm_jax.data.images import ImageError, decode_image  # noqa: PLC0415

    if rgb is None:
        if not path or not Path(path).is_file():
            return None
        try:
            rgb = decode_image(path)
        except ImageError:
            return None
    im = Image.fromarray(rgb)
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
.card{border:1px solid #ddd;border-radius:8px;padding:1em;margin:1em 0}
.query{display:flex;gap:1em;align-items:center}
.caption{font-size:1.3em}.prompt{color:#666}.error{color:#b00}
.nb{display:flex;flex-wrap:wrap;gap:.8em;margin-top:.8em}
.nb figure{margin:0;width:170px;font-size:.85em}
.nb img,.query img{border-radius:4px;background:#f4f4f4;object-fit:contain}
.query img{width:160px;height:160px}.nb img{width:96px;height:96px}
.score{color:#666;font-variant-numeric:tabular-nums}
"""


def _figure(n: Neighbour) -> str:
    uri = _data_uri(path=n.image) if n.image else None
    img = f'<img src="{uri}" alt="">' if uri else ""
    return (f"<figure>{img}<figcaption>{html.escape(n.text)}<br>"
            f'<span class="score">score {n.score:.3f}</span></figcaption></figure>')


def render_html(results: Sequence[Result], title: str = "ravlm_jax inference") -> str:
    """One self-contained page (images inlined as data: URIs)."""
    cards = []
    for r in results:
        if r.error is not None:
            cards.append(f'<div class="card error">{html.escape(r.error)}</div>')
            continue
        uri = _data_uri(rgb=r.image) if r.image is not None else None
        img = f'<img src="{uri}" alt="">' if uri else ""
        prompt = (f'<div class="prompt">prompt: {html.escape(r.prompt)}</div>'
                  if r.prompt else "")
        caption = (f'<div class="caption">{html.escape(r.caption)}</div>'
                   if r.caption is not None else "")
        name = f"<div>{html.escape(r.path)}</div>" if r.path else "<div>text query</div>"
        nbs = "".join(_figure(n) for n in r.neighbours)
        cards.append(f'<div class="card"><div class="query">{img}<div>{name}{prompt}'
                     f'{caption}</div></div><div class="nb">{nbs}</div></div>')
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            + "".join(cards) + "</body></html>")


def write_html(results: Sequence[Result], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(results), encoding="utf-8")
    return path


# ============================================================================ the CLI's body


def run_cli(images: Sequence[str], prompt: str | None = None, checkpoint: str | None = None,
            datastore: str | None = None, k: int = 4, as_json: bool = False,
            html_path: str | None = None, out: Any = None, err: Any = None) -> int:
    """What ``python infer.py`` does. Returns the exit status: 0, or 2 when the request or
    any image failed (each failure is one line on stderr; never a traceback)."""
    import sys  # noqa: PLC0415

    out = out or sys.stdout
    err = err or sys.stderr
    # library chatter (transformers' "PyTorch was not found") would break one line per error
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    say = lambda text, stream: print(text, file=stream, flush=True)
    if not images and not prompt:
        say("error: nothing to do: pass --image PATH [PATH ...] and/or --prompt TEXT", err)
        return 2
    try:
        run = load_run(checkpoint, datastore, need_datastore=k > 0 or not images)
        if images:
            results = caption_images(run, images, prompt=prompt, k=k)
        else:
            results = [search_text(run, prompt, k)]
    except (InferError, ValueError, OSError) as e:
        say(f"error: {' '.join(str(e).split())}", err)
        return 2
    except Exception as e:  # never a traceback for a user; RAVLM_DEBUG=1 shows it
        if os.environ.get("RAVLM_DEBUG"):
            raise
        say(f"error: {type(e).__name__}: {' '.join(str(e).split())}", err)
        return 1
    for r in results:
        if r.error is not None:
            say(f"error: {r.error}", err)
        if as_json:
            say(json.dumps(to_json(r), ensure_ascii=False), out)
        elif r.error is None:
            say(format_result(r), out)
    if html_path:
        try:
            say(f"wrote {write_html(results, html_path)}", err)
        except OSError as e:
            say(f"error: cannot write {html_path}: {e.strerror or e}", err)
            return 2
    return 2 if any(r.error is not None for r in results) else 0
