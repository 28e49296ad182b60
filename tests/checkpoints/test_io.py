"""The torch-free checkpoint reader: files written by real torch (zip and legacy formats,
tests/fixtures/bert_tiny/torch_formats), pickles that try to run code, and damaged files."""

import os
import pickle
import shutil
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ravlm_jax.checkpoints.io import CheckpointError, load_state_dict

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@pytest.fixture(scope="module")
def formats(fixtures_dir):
    return fixtures_dir / "bert_tiny" / "torch_formats"


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pt"])
def test_reads_torch_zip_and_legacy_formats(formats, name):
    expected = np.load(formats / "expected.npz")
    got = load_state_dict(formats / name)  # {"state_dict": {...}, "epoch": 3} is unwrapped
    assert sorted(got) == sorted(expected.files)
    for key in expected.files:
        np.testing.assert_array_equal(np.asarray(got[key]).astype(expected[key].dtype),
                                      expected[key], err_msg=key)
    assert got["bfloat16"].dtype == ml_dtypes.bfloat16
    assert got["float16"].dtype == np.float16 and got["int64"].dtype == np.int64
    assert got["bool"].dtype == np.bool_
    np.testing.assert_array_equal(got["transposed"], got["float32"].T)


def test_reads_a_transformers_pytorch_model_bin(fixtures_dir):
    sd = load_state_dict(fixtures_dir / "bert_tiny")  # a directory: finds pytorch_model.bin
    assert sd["embeddings.word_embeddings.weight"].shape == (99, 32)
    assert sd["encoder.layer.1.intermediate.dense.weight"].shape == (37, 32)


class _RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_refuses_a_zip_checkpoint_whose_pickle_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="refusing to load global .*system"):
        load_state_dict(path)
    assert not marker.exists()


def test_refuses_a_legacy_checkpoint_whose_pickle_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    bare = tmp_path / "bare.pt"
    bare.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError):
        load_state_dict(bare)
    # A valid legacy header followed by a hostile payload.
    framed = tmp_path / "framed.pt"
    framed.write_bytes(pickle.dumps(LEGACY_MAGIC, protocol=2) + pickle.dumps(1001, protocol=2)
                       + pickle.dumps({"little_endian": True}, protocol=2)
                       + pickle.dumps(_RunsCode(marker), protocol=2))
    with pytest.raises(CheckpointError, match="refusing to load global .*system"):
        load_state_dict(framed)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["zip.pt", "legacy.pt"])
@pytest.mark.parametrize("keep", [0.5, 0.97])
def test_truncated_torch_file_is_a_checkpoint_error(formats, tmp_path, name, keep):
    data = (formats / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError):
        load_state_dict(cut)


def test_zip_missing_tensor_data_is_a_checkpoint_error(formats, tmp_path):
    src = zipfile.ZipFile(formats / "zip.pt")
    dropped = next(n for n in src.namelist() if "/data/" in n)
    path = tmp_path / "partial.pt"
    with zipfile.ZipFile(path, "w") as zf:
        for n in src.namelist():
            if n != dropped:
                zf.writestr(n, src.read(n))
    with pytest.raises(CheckpointError, match="missing tensor data"):
        load_state_dict(path)


def test_truncated_safetensors_and_garbage_are_checkpoint_errors(fixtures_dir, tmp_path):
    data = (fixtures_dir / "clip_tiny" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(tmp_path / "model.safetensors")
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(struct.pack("<8d", *range(8)))
    with pytest.raises(CheckpointError):
        load_state_dict(garbage)


def test_missing_weights_are_checkpoint_errors(fixtures_dir, tmp_path):
    shutil.copy(fixtures_dir / "bert_tiny" / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="has none of"):
        load_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "model.safetensors")
