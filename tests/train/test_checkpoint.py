import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ravlm_jax.train.checkpoint import StageCheckpoints, abstract_with_shardings
from ravlm_jax.train.metrics import MetricsWriter, check_finite, read_metrics


def _state(mesh, value):
    w = jax.device_put(jnp.full((8, 4), value, jnp.float32), NamedSharding(mesh, P("data")))
    return {"w": w, "step": jnp.asarray(value, jnp.int32)}


def test_save_restore_sharded_and_data_state(tmp_path, mesh8):
    ck = StageCheckpoints(tmp_path, "stage", max_to_keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(mesh8, step), {"it": step}, {"lr": 0.1})
    ck.wait()
    assert ck.steps() == [2, 3]
    abstract = abstract_with_shardings(_state(mesh8, 0))
    step, state, data = ck.restore_latest(abstract)
    assert step == 3 and data == {"it": 3}
    np.testing.assert_array_equal(np.asarray(state["w"]), 3.0)
    assert state["w"].sharding.spec == P("data")
    ck.close()


def test_corrupt_latest_falls_back_to_previous(tmp_path, mesh8, capsys):
    ck = StageCheckpoints(tmp_path, "stage", max_to_keep=3, async_save=False)
    for step in (1, 2):
        ck.save(step, _state(mesh8, step), {"it": step})
    ck.wait()
    # truncate every array file of the newest checkpoint
    for f in (ck.directory / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and f.suffix not in (".json",):
            f.write_bytes(f.read_bytes()[:3])
    for f in (ck.directory / "2" / "state").rglob("*.json"):
        f.write_text("{not json")
    abstract = abstract_with_shardings(_state(mesh8, 0))
    step, state, data = ck.restore_latest(abstract)
    assert step == 1 and data == {"it": 1}
    np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
    assert "step 2" in capsys.readouterr().out
    ck.close()


def test_metrics_truncate_on_resume(tmp_path):
    w = MetricsWriter(tmp_path, "caption", tensorboard=False)
    for s in range(1, 6):
        w.write(s, {"loss": 1.0 / s})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "caption", "step": 6, "lo')  # a line cut by SIGKILL
    w = MetricsWriter(tmp_path, "caption", resume_step=3, tensorboard=True)
    w.write(4, {"loss": 0.25})
    w.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert list((tmp_path / "tensorboard" / "caption").glob("events.out.tfevents.*"))


def test_nan_guard_names_step():
    check_finite("caption", 3, {"loss": 1.0, "examples_per_sec": float("inf")})
    try:
        check_finite("caption", 7, {"loss": float("nan")})
    except RuntimeError as e:
        assert "step 7" in str(e) and "loss is nan" in str(e)
    else:
        raise AssertionError("NaN not caught")
