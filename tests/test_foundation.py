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
from pipelines.schema import MODALITIES, pack_tensors, shard_schema, unpack_column

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


def test_shard_schema_round_trip_with_nulls(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "text": [np.array([1, 7, 9, 2]), None, np.array([1, 2])],
        "image": [rng.integers(0, 255, (4, 4, 3)), None, rng.integers(0, 255, (4, 4, 3))],
        "audio": [rng.normal(size=(5, 3)), rng.normal(size=(2, 3)), None],
        "video": [None, rng.integers(0, 255, (2, 4, 4, 3)), None],
        "pointcloud": [rng.normal(size=(8, 3)), None, None],
        "signal": [None, None, rng.normal(size=(3, 6))],
    }
    cols = {
        "id": pa.array(["a", "b", "c"]),
        "label": pa.array(["1", None, "3"]),
        "group": pa.array(["g", "g", "h"]),
        "modalities": pa.array([["text"], ["audio"], ["text"]]),
    }
    for m in MODALITIES:
        cols[m], cols[f"{m}_shape"] = pack_tensors(m, tensors[m])
    table = pa.table(cols, schema=shard_schema())
    pq.write_table(table, tmp_path / "s.parquet")
    back = pq.read_table(tmp_path / "s.parquet")
    assert back.schema.equals(shard_schema())
    for m in MODALITIES:
        got = unpack_column(m, back.column(m), back.column(f"{m}_shape"))
        for want, have in zip(tensors[m], got, strict=True):
            if want is None:
                assert have is None
            else:
                np.testing.assert_array_equal(have, np.asarray(want).astype(have.dtype))
    # Slices (as Ray Data hands out) unpack correctly too.
    sl = back.slice(1, 2)
    got = unpack_column("audio", sl.column("audio"), sl.column("audio_shape"))
    assert got[0].shape == (2, 3) and got[1] is None


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
