"""infer.py end to end on a tiny run built here: a random configs/tiny.py captioner exported
like train.py exports it, and a datastore of a dozen captions (with images) built by the
datastore module with the run's own dual encoder."""

import io
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ravlm_jax.config import load_config
from ravlm_jax.data.tokenizers import get_tokenizer
from ravlm_jax.infer import caption_images, load_run, run_cli
from ravlm_jax.models.factory import build_captioner
from ravlm_jax.retrieval.datastore import build_datastore, dual_encoder_fingerprint
from ravlm_jax.train.export import export_model

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red apple", "a yellow banana", "a smiling face with sunglasses", "a blue car",
            "a green tree", "a grinning cat face", "a slice of pizza", "a rocket",
            "a snowman without snow", "a red heart", "a cup of hot coffee", "a sailboat"]


def random_model(config, seed=0, std=0.3):
    """configs/tiny.py's captioner with numpy random parameters (no eager init)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_captioner(config.model,
                                                                       nnx.Rngs(0))))
    rs = np.random.RandomState(seed)
    fill = lambda path, x: jnp.asarray(rs.normal(0.0, std, x.shape) + (
        1.0 if path[-1].key == "scale" else 0.0), x.dtype)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def png(rgb: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    (Image.fromarray(rgb) if mode is None else Image.fromarray(rgb).convert(mode)).save(
        out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = load_config("configs/tiny.py")
    model = random_model(config)
    wd = tmp_path_factory.mktemp("run")
    export_model(wd / "model", model, config)

    bert = get_tokenizer("bert")
    text_ids, text_mask = bert.encode_batch(CAPTIONS, 16)
    graphdef, state = nnx.split(model.encoder)
    keys = np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode_text(i, m))(
        state, text_ids, text_mask))
    n_len = config.model.captioner.neighbour_len
    tokens = np.zeros((len(CAPTIONS), n_len), np.int32)
    for i, text in enumerate(CAPTIONS):
        words = bert.encode(text, add_special_tokens=False)[:n_len]
        tokens[i, :len(words)] = words
    (wd / "images").mkdir()
    rs = np.random.RandomState(0)
    for i in range(len(CAPTIONS)):
        (wd / "images" / f"{i}.png").write_bytes(png(rs.randint(0, 255, (24, 24, 3),
                                                                np.uint8)))
    batch = {"keys": keys, "text": CAPTIONS, "token_ids": tokens,
             "group_id": np.arange(len(CAPTIONS)),
             "image_ref": [f"../images/{i}.png" for i in range(len(CAPTIONS))]}
    fingerprint = dual_encoder_fingerprint(model.encoder, config.model)
    build_datastore(wd / "datastore", lambda b: b["keys"], [batch], fingerprint=fingerprint,
                    tokenizer_name="bert", index_kind="scann", pad_id=bert.pad_id,
                    progress=False)
    return wd


def image_files(d: Path) -> tuple[list[str], list[str]]:
    """Valid images of every awkward kind, and files that are not usable images."""
    rs = np.random.RandomState(1)
    rgb = rs.randint(0, 255, (20, 30, 3), np.uint8)
    good = {
        "rgb.png": png(rgb),
        "grey.png": png(rgb, "L"),
        "palette.png": png(rgb, "P"),
        "rgba.png": png(np.concatenate([rgb, np.full((20, 30, 1), 128, np.uint8)], -1)),
        "sixteen.png": None,
        "cmyk.jpg": None,
        "rotated.jpg": None,
    }
    buf = io.BytesIO()
    Image.fromarray((rs.rand(20, 30) * 65535).astype(np.uint16)).save(buf, format="PNG")
    good["sixteen.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG")
    good["cmyk.jpg"] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", exif=exif.tobytes())
    good["rotated.jpg"] = buf.getvalue()
    for name, data in good.items():
        (d / name).write_bytes(data)

    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(good["rotated.jpg"][:len(good["rotated.jpg"]) // 2])
    (d / "notes.jpg").write_text("these are not pixels\n")
    (d / "folder.png").mkdir()
    buf = io.BytesIO()
    Image.new("1", (8000, 7000)).save(buf, format="PNG")  # 56 megapixels: a bomb
    (d / "bomb.png").write_bytes(buf.getvalue())
    bad = ["missing.jpg", "folder.png", "empty.jpg", "truncated.jpg", "notes.jpg", "bomb.png"]
    return [str(d / n) for n in good], [str(d / n) for n in bad]


def test_every_valid_image_is_captioned_and_every_bad_one_is_one_line(workdir, tmp_path,
                                                                       capsys):
    good, bad = image_files(tmp_path)
    paths = good[:3] + bad + good[3:]
    rc = run_cli(paths, checkpoint=str(workdir), as_json=True)
    out, err = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in out + err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in records] == paths  # one object per image, in order
    by_path = {r["path"]: r for r in records}
    for path in good:
        r = by_path[path]
        assert isinstance(r["caption"], str) and "error" not in r
        assert len(r["neighbours"]) == 4
        assert all(n["text"] in CAPTIONS and -1.0 <= n["score"] <= 1.0 + 1e-5
                   for n in r["neighbours"])
        assert [n["score"] for n in r["neighbours"]] == sorted(
            (n["score"] for n in r["neighbours"]), reverse=True)
        assert Path(r["neighbours"][0]["image"]).is_file()
        assert set(r["timings"]) == {"preprocess_s", "generate_s", "load_s"}
    errors = err.strip().splitlines()
    assert len(errors) == len(bad)
    for path, line in zip(bad, errors, strict=True):
        assert line.startswith("error: ") and path in line
        assert by_path[path]["error"] in line
    assert "directory" in errors[1] and "0 bytes" in errors[2]
    assert "decompression bomb" in errors[-1]


def test_text_lines_html_report_and_the_root_cli(workdir, tmp_path, capsys):
    good, bad = image_files(tmp_path)
    sys.path.insert(0, str(REPO))
    import infer  # the thin CLI at the repository root

    report = tmp_path / "report.html"
    rc = infer.main(["--image", good[0], bad[0], "--checkpoint", str(workdir),
                     "--html", str(report)])
    out, err = capsys.readouterr()
    assert rc == 2
    lines = out.splitlines()
    assert lines[0].startswith(good[0] + ": ")
    assert len(lines) == 5 and all(line.startswith("  ") for line in lines[1:])
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 1 + 4  # the query and its neighbours
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "missing.jpg" in page


@pytest.mark.slow
def test_prompt_continues_and_joins_the_query(workdir, tmp_path, capsys):
    good, _ = image_files(tmp_path)
    run = load_run(str(workdir))
    plain = caption_images(run, good[:2], k=2)
    prompted = caption_images(run, good[:2], prompt="a red", k=2)
    assert all(r.ok and r.prompt == "a red" for r in prompted)
    assert [r.neighbours for r in plain] != [r.neighbours for r in prompted]
    # the same run caption again without compiling again
    gen = run.generator(2)
    traces = gen.traces
    caption_images(run, good[2:4], k=2)
    assert gen.traces == traces


def test_text_only_search_returns_articles_with_pictures(workdir, tmp_path, capsys):
    report = tmp_path / "search.html"
    rc = run_cli([], prompt="a yellow banana", checkpoint=str(workdir), k=3,
                 html_path=str(report))
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "text query: a yellow banana"
    assert lines[1].strip().endswith("a yellow banana")  # its own caption is nearest
    assert float(lines[1].split()[0]) == pytest.approx(1.0, abs=1e-2)
    assert len(lines) == 4
    assert report.read_text().count("data:image/png;base64,") == 3


def test_run_errors_are_one_line(workdir, tmp_path, capsys):
    assert run_cli([], checkpoint=str(workdir)) == 2
    assert "nothing to do" in capsys.readouterr().err
    assert run_cli(["x.png"], checkpoint=str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no trained model" in err
    assert run_cli(["x.png"], checkpoint=str(workdir), datastore=str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json" in err
    assert run_cli(["x.png"], checkpoint=str(workdir), k=9) == 2
    assert "k_max" in capsys.readouterr().err
    (tmp_path / "unfinished" / "checkpoints" / "caption").mkdir(parents=True)
    assert run_cli(["x.png"], checkpoint=str(tmp_path / "unfinished")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no exported model yet" in err


def test_without_a_demo_run_it_says_how_to_make_one(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "infer.py"), "--image", "cat.jpg"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "workdirs/demo" in proc.stderr and "train.py" in proc.stderr


def test_datastore_cli_indexes_another_dataset_with_the_runs_encoder(workdir, tmp_path,
                                                                     capsys):
    """SmallCap's swap without train.py: index a JSONL dataset's captions with the run's
    trained encoder, then caption against it."""
    from ravlm_jax.retrieval import datastore as ds
    from ravlm_jax.retrieval.datastore import Datastore

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rs = np.random.RandomState(2)
    captions = ["a purple umbrella", "a glass of milk", "a red heart", "a paper plane"]
    with open(data / "captions.jsonl", "w") as f:
        for i, text in enumerate(captions):
            (data / "images" / f"{i}.png").write_bytes(png(rs.randint(0, 255, (24, 24, 3),
                                                                      np.uint8)))
            f.write(json.dumps({"image": f"images/{i}.png", "captions": [text]}) + "\n")
    cfg = tmp_path / "other_data.py"
    cfg.write_text("import ml_collections\n"
                   "def get_config():\n"
                   "    c = ml_collections.ConfigDict()\n"
                   f"    c.data = ml_collections.ConfigDict(dict(kind='jsonl', "
                   f"path={str(data / 'captions.jsonl')!r}))\n"
                   "    return c\n")
    out = tmp_path / "swap" / "datastore"
    assert ds.main(["build", "--encoder", str(workdir), "--config", str(cfg), "--split", "all",
                    "--out", str(out), "--index", "exact", "--quiet"]) == 0
    assert "built" in capsys.readouterr().out

    run = load_run(str(workdir))
    store = Datastore.load(out, expect_fingerprint=dual_encoder_fingerprint(
        run.model.encoder, run.config.model))
    assert sorted(store.payload(np.arange(store.size))["text"]) == sorted(captions)
    # keys are the run's own text embeddings of those captions
    bert = get_tokenizer("bert")
    texts = store.payload(np.arange(store.size))["text"]
    ids, mask = bert.encode_batch(texts, int(run.config.data.texts.caption.max_len))
    graphdef, state = nnx.split(run.model.encoder)
    want = np.asarray(jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode_text(i, m))(
        state, ids, mask))
    np.testing.assert_allclose(np.asarray(store.embeddings, np.float32), want, atol=2e-3)
    # the new datastore serves a text search with its images
    report = tmp_path / "search.html"
    assert run_cli([], prompt="a red heart", checkpoint=str(workdir), datastore=str(out), k=2,
                   html_path=str(report)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].strip().endswith("a red heart")
    assert report.read_text().count("data:image/png;base64,") == 2
    # no model there: one line, status 2
    assert ds.main(["build", "--encoder", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no trained model" in err
