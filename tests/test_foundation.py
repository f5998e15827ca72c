"""Foundation checks: cluster config, config utilities, shard schema round trip, layout."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from common.config import ConfigError, load_config, parse_overrides
from common.modalities import MODALITIES
from pipelines.schema import TENSOR_TYPE, read_shard, shard_schema, unpack_column, write_shard

ROOT = Path(__file__).resolve().parents[1]


def test_layout_is_complete():
    for name in ("pipelines", "models", "jobs", "serve", "tests", "configs", "benchmarks"):
        assert (ROOT / name).is_dir(), name
    for name in ("ray_cluster.yaml", "pyproject.toml", "README.md", ".ci/run", "Makefile"):
        assert (ROOT / name).is_file(), name
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_torch_is_pinned():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch==2.13.0"' in text


def test_ray_cluster_yaml_validates_with_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    cfg = prepare_config(cfg)  # fills provider defaults, as `ray up` does before validating
    validate_config(cfg)
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert any("g" in v["node_config"]["InstanceType"].split(".")[0] for v in workers.values())
    assert all(v["max_workers"] > v.get("min_workers", 0) for v in workers.values())  # autoscaled
    assert any("pip install" in c and "-e ." in c for c in cfg["setup_commands"])


def test_ray_cluster_yaml_rejects_broken_config():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text()))
    cfg["available_node_types"]["cpu_worker"]["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(cfg)


@dataclasses.dataclass
class _Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclasses.dataclass
class _Outer:
    name: str = "x"
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    pairs: list[str] = dataclasses.field(default_factory=list)


def test_config_overrides_and_validation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: run\ninner:\n  lr: 0.1\n")
    cfg = load_config(_Outer, p, ["inner.steps=5", "pairs=[a,b]", "inner.lr=3e-4"])
    assert cfg.name == "run" and cfg.inner.steps == 5 and cfg.pairs == ["a", "b"]
    assert cfg.inner.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(_Outer, p, ["inner.stepz=5"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(_Outer, p, ["inner.steps=abc"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["nonsense"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(_Outer, tmp_path / "missing.yaml")


def _items(m: str, rng: np.random.Generator, n: int = 2) -> list[np.ndarray]:
    """Random tensors of modality ``m``'s record (dtype and rank), varying along var_axis."""
    rec = MODALITIES[m]
    out = []
    for k in range(n):
        shape = [3] * rec.rank
        if rec.var_axis is not None:
            shape[rec.var_axis] = 2 + k
        x = rng.normal(size=shape) * (50 if rec.np_dtype.kind in "iu" else 1)
        out.append(np.abs(x).astype(rec.np_dtype))
    return out


def test_shard_schema_round_trip_with_nulls(tmp_path):
    """write_shard/read_shard round-trip every declared modality (dtypes from the record)."""
    rng = np.random.default_rng(0)
    mods = list(MODALITIES)
    tensors = {m: [None] * 3 for m in mods}
    for k, m in enumerate(mods):  # each modality present in two of the three rows
        a, b = _items(m, rng)
        tensors[m][k % 3], tensors[m][(k + 1) % 3] = a, b
    rows = [
        {"id": rid, "label": lab, "group": "g", **{m: tensors[m][i] for m in mods}}
        for i, (rid, lab) in enumerate([("b", "1"), ("a", None), ("c", "3")])
    ]
    written = write_shard(tmp_path / "sub" / "s.parquet", rows)
    back = pq.read_table(tmp_path / "sub" / "s.parquet")
    assert back.schema.equals(shard_schema()) and written.schema.equals(shard_schema())
    got = read_shard(tmp_path / "sub" / "s.parquet")
    assert got["id"] == ["a", "b", "c"]  # sorted by id
    order = [1, 0, 2]
    for m in mods:
        assert back.schema.field(m).type == TENSOR_TYPE  # one byte string per tensor
        for j, i in enumerate(order):
            want, have = tensors[m][i], got[m][j]
            if want is None:
                assert have is None and m not in got["modalities"][j]
            else:
                assert m in got["modalities"][j]
                assert have.dtype == MODALITIES[m].np_dtype
                np.testing.assert_array_equal(have, want)
    # Slices (as Ray Data hands out) unpack correctly too.
    m = mods[0]
    sl = back.slice(1, 2)
    assert [x is None for x in unpack_column(m, sl.column(m), sl.column(f"{m}_shape"))] == [
        tensors[m][0] is None,
        tensors[m][2] is None,
    ]
    # A subset of the modalities, and column input.
    sub = read_shard(write_shard(tmp_path / "t.parquet", {"id": ["x"], m: [tensors[m][0]]}), [m])
    assert set(sub) == {"id", "label", "group", "modalities", m}


def test_shards_with_list_tensor_columns_still_read(tmp_path):
    """Shards of the earlier layout (flat ``list<dtype>`` tensor columns) read as before and
    convert when rewritten; a tensor column of another type is a clear error."""
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    sig = np.linspace(-1, 1, 8, dtype=np.float16).reshape(2, 4)
    old = pa.table(
        {
            "id": ["a", "b"],
            "label": ["x", None],
            "group": [None, None],
            "modalities": [["image", "signal"], ["signal"]],
            "image": pa.array([img.ravel(), None], pa.list_(pa.uint8())),
            "image_shape": pa.array([[2, 3, 3], None], pa.list_(pa.int32())),
            "signal": pa.array([sig.ravel(), sig.ravel()], pa.list_(pa.float16())),
            "signal_shape": pa.array([[2, 4], [2, 4]], pa.list_(pa.int32())),
        }
    )
    pq.write_table(old, tmp_path / "old.parquet")
    got = read_shard(tmp_path / "old.parquet", ["image", "signal"])
    np.testing.assert_array_equal(got["image"][0], img)
    assert got["image"][1] is None
    np.testing.assert_array_equal(got["signal"][1], sig)
    assert got["signal"][1].dtype == np.float16
    new = write_shard(tmp_path / "new.parquet", old, ["image", "signal"])
    assert new.schema.field("image").type == TENSOR_TYPE
    again = read_shard(tmp_path / "new.parquet", ["image", "signal"])
    np.testing.assert_array_equal(again["image"][0], img)
    np.testing.assert_array_equal(again["signal"][0], sig)
    with pytest.raises(TypeError, match="image tensor column has type string"):
        unpack_column("image", pa.array(["x"]), pa.array([[1]], pa.list_(pa.int32())))


def test_cli_entry_points_have_help():
    for mod in ("jobs.prepare", "jobs.train", "jobs.evaluate", "jobs.export", "jobs.demo"):
        r = subprocess.run(
            [sys.executable, "-m", mod, "--help"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, (mod, r.stderr[-2000:])
        assert "usage" in r.stdout.lower()
