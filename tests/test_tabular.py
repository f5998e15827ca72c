"""The tabular modality: featurizer, training-split statistics, encoder and serve spec."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from pipelines.config import FeatureConfig
from pipelines.featurize import SampleError, get_featurizer
from pipelines.featurize.tabular import KIND, PRESENT, VALUE, TabularFeaturizer

SECTION = {
    "numeric": ["ink", "aspect", "strokes"],
    "categorical": ["pen", "hand"],
    "vocab": {"pen": ["black", "blue", "red"]},
    "buckets": 16,
}
REC = {"ink": 0.25, "aspect": 1.5, "strokes": 2, "pen": "blue", "hand": "left"}


def _feat(**section) -> TabularFeaturizer:
    fc = FeatureConfig().with_overrides({"tabular": {**SECTION, **section}})
    return get_featurizer("tabular", fc)


def _csv(rec: dict) -> bytes:
    keys = list(rec)
    return (",".join(keys) + "\n" + ",".join(str(rec[k]) for k in keys) + "\n").encode()


def _parquet(rec: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({k: [v] for k, v in rec.items()}), buf)
    return buf.getvalue()


def _reason(f: TabularFeaturizer, raw, suffix=None) -> str:
    with pytest.raises(SampleError) as e:
        f.featurize(raw, suffix)
    return e.value.reason


# -- featurizer ----------------------------------------------------------------------------
def test_layout_dtype_and_values() -> None:
    f = _feat()
    assert f.output_shape() == f.max_output_shape() == (5, 3)
    a = f.featurize(REC)
    assert a.dtype == np.float32 and a.shape == (5, 3)
    assert a[:, PRESENT].tolist() == [1, 1, 1, 1, 1]
    assert a[:, KIND].tolist() == [0, 0, 0, 1, 1]
    assert a[:3, VALUE].tolist() == [0.25, 1.5, 2.0]
    assert a[3, VALUE] == 2.0  # vocab index 1 + 1
    assert a[4, VALUE] == zlib.crc32(b"left") % 16  # hashed bucket


def test_same_array_from_every_form(tmp_path) -> None:
    f = _feat()
    want = f.featurize(REC)
    forms = {
        "dict": (REC, None),
        "json string": (json.dumps(REC), None),
        "json file": (json.dumps(REC).encode(), ".json"),
        "json array file": (json.dumps([REC]).encode(), ".json"),
        "csv file": (_csv(REC), ".csv"),
        "parquet file": (_parquet(REC), ".parquet"),
        "csv sniffed": (_csv(REC), None),
        "parquet sniffed": (_parquet(REC), None),
        "json sniffed": (b"  " + json.dumps(REC).encode(), None),
    }
    for name, (raw, suffix) in forms.items():
        np.testing.assert_array_equal(f.featurize(raw, suffix), want, err_msg=name)
    assert TabularFeaturizer.sniff(_parquet(REC)) == ".parquet"
    assert TabularFeaturizer.sniff(b"\x89PNG\r\n\x1a\n\x00\x00") is None


def test_missing_fields_are_masked_and_unknown_reported(caplog) -> None:
    f = _feat()
    a = f.featurize({"ink": 0.5, "pen": None, "hand": "", "colour": "x"})
    assert a[:, PRESENT].tolist() == [1, 0, 0, 0, 0]
    assert (a[1:, VALUE] == 0).all()
    assert f.unknown_counts == {"colour": 1}
    assert "colour" in caplog.text
    assert _reason(_feat(unknown_fields="error"), {"ink": 1, "colour": "x"}) == "unknown_field"
    assert _feat(unknown_fields="ignore").featurize({"ink": 1, "colour": "x"})[0, PRESENT] == 1
    # CSV empty cells and missing columns are missing values too.
    b = f.featurize(b"ink,pen\n0.5,\n", ".csv")
    np.testing.assert_array_equal(a, b)


def test_vocab_out_of_vocabulary_and_canonical_categories() -> None:
    f = _feat(categorical=["pen", "hand", "code"])
    assert f.featurize({"pen": "green"})[3, VALUE] == 0.0  # out of vocabulary
    # JSON 3, Parquet 3.0 and CSV "3" are the same category.
    a = f.featurize({"code": 3})
    np.testing.assert_array_equal(a, f.featurize({"code": 3.0}))
    np.testing.assert_array_equal(a, f.featurize(b"code\n3\n", ".csv"))
    np.testing.assert_array_equal(a, f.featurize(_parquet({"code": 3.0}), ".parquet"))


@pytest.mark.parametrize(
    ("raw", "suffix", "reason"),
    [
        ({"ink": "abc"}, None, "bad_dtype"),
        ({"ink": True}, None, "bad_dtype"),
        (b"ink,pen\nheavy,blue\n", ".csv", "bad_dtype"),
        ({"ink": float("nan")}, None, "non_finite"),
        ({"ink": float("inf")}, None, "non_finite"),
        ('{"ink": NaN}', None, "non_finite"),
        (b"ink\ninf\n", ".csv", "non_finite"),
        ({"ink": 1e300}, None, "non_finite"),
        ({"pen": float("nan")}, None, "non_finite"),
        ({f"f{i}": 1.0 for i in range(10_000)}, None, "too_large"),
        ({"ink": 1, "pen": "x" * 1000}, None, "too_large"),
        ({"ink": {"value": 1}}, None, "bad_shape"),
        ({"ink": [1, 2]}, None, "bad_shape"),
        ({"ink": 1, "other": {"a": 1}}, None, "bad_shape"),
        ("[" * 100_000 + "]" * 100_000, None, "bad_shape"),
        (b"ink\n1\n2\n", ".csv", "bad_shape"),
        (json.dumps([REC, REC]).encode(), ".json", "bad_shape"),
        ({}, None, "empty"),
        ({"colour": "x"}, None, "empty"),
        ("{not json", None, "decode_error"),
        (b"PAR1garbage", ".parquet", "decode_error"),
        (b"", ".csv", "empty"),
        (b"{}" + b" " * 2_000_000, ".json", "too_large"),
        (42, None, "bad_dtype"),
    ],
)
def test_bad_input_reasons(raw, suffix, reason) -> None:
    assert _reason(_feat(), raw, suffix) == reason


def test_too_many_fields_in_files() -> None:
    rec = {f"f{i}": 1 for i in range(10_000)}
    f = _feat()
    assert _reason(f, _csv(rec), ".csv") == "too_large"
    assert _reason(f, _parquet(rec), ".parquet") == "too_large"
    assert _reason(f, json.dumps(rec).encode(), ".json") == "too_large"


def test_nested_parquet_column_is_bad_shape() -> None:
    assert _reason(_feat(), _parquet({"ink": [[1.0, 2.0]]}), ".parquet") == "bad_shape"


def test_config_validation() -> None:
    from common.config import ConfigError

    for bad in (
        {"numeric": ["a"], "categorical": ["a"]},
        {"fields": [{"name": "a", "kind": "ordinal"}]},
        {"fields": [{"name": "a", "nested": 1}]},
        {"unknown_fields": "maybe"},
        {"stats": {"nope": {"mean": 0.0, "std": 1.0}}},
        {"stats": {"ink": {"mean": 0.0, "std": 0.0}}},
        {"buckets": 0},
    ):
        with pytest.raises(ConfigError):
            FeatureConfig().with_overrides({"tabular": {**SECTION, **bad}})
    # The `fields` form and the two-list form give the same layout.
    g = get_featurizer(
        "tabular",
        FeatureConfig().with_overrides(
            {
                "tabular": {
                    "fields": [
                        {"name": "ink", "kind": "numeric"},
                        {"name": "aspect", "kind": "numeric"},
                        {"name": "strokes", "kind": "numeric"},
                        {"name": "pen", "kind": "categorical", "vocab": ["black", "blue", "red"]},
                        {"name": "hand", "kind": "categorical"},
                    ],
                    "buckets": 16,
                }
            }
        ),
    )
    np.testing.assert_array_equal(g.featurize(REC), _feat().featurize(REC))


def test_default_section_declares_the_demo_fields() -> None:
    f = get_featurizer("tabular")
    assert f.output_shape() == (8, 3)


# -- training-split statistics ---------------------------------------------------------------
def test_fit_then_finalize_standardizes() -> None:
    f = _feat()
    assert TabularFeaturizer.is_fitted() and TabularFeaturizer.has_stage2()
    inks = [0.1, 0.2, 0.3, 0.6]
    items = [f.decode({"ink": v, "aspect": 2.0}) for v in inks] + [f.decode({"pen": "red"})]
    upd = f.fit(items)
    st = upd["stats"]
    assert st["ink"]["mean"] == pytest.approx(np.mean(inks))
    assert st["ink"]["std"] == pytest.approx(np.std(inks))
    assert st["aspect"] == {"mean": 2.0, "std": 1.0}  # constant: std 1
    assert st["strokes"] == {"mean": 0.0, "std": 1.0}  # never present
    assert set(st) == {"ink", "aspect", "strokes"}  # categoricals have no stats
    g = _feat(stats=st)  # what prepare writes into data_config.yaml
    out = g.featurize({"ink": 0.6, "pen": "red"})
    assert out[0, VALUE] == pytest.approx((0.6 - np.mean(inks)) / np.std(inks), rel=1e-5)
    assert out[1, VALUE] == 0 and out[1, PRESENT] == 0  # missing stays 0
    assert out[3, VALUE] == 3.0  # categorical untouched
    # decode is the raw form; finalize does not modify its input.
    raw = g.decode({"ink": 0.6})
    assert raw[0, VALUE] == pytest.approx(0.6)
    g.finalize(raw)
    assert raw[0, VALUE] == pytest.approx(0.6)
    # Clipping of far outliers.
    assert _feat(stats=st, clip=3.0).featurize({"ink": 1e6})[0, VALUE] == 3.0


def test_hash_buckets_are_stable_across_processes() -> None:
    f = _feat()
    here = f.featurize({"hand": "right"})[4, VALUE]
    code = (
        "from pipelines.featurize.tabular import stable_bucket; print(stable_bucket('right', 16))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
        cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]),
    )
    assert int(out.stdout.strip()) == here


def test_examples_depend_on_label() -> None:
    f = _feat()
    rng = np.random.default_rng(0)
    by_label = {
        lab: np.mean([f.featurize(f.example(rng, lab)[0])[:3, VALUE] for _ in range(20)], 0)
        for lab in range(3)
    }
    assert not np.allclose(by_label[0], by_label[1])
    raw, suffix = f.example(rng, 7)
    assert isinstance(raw, dict) and suffix is None
    assert f.accepts_inline(raw) and f.accepts_inline(json.dumps(raw))
    assert not f.accepts_inline("records/000001.csv")


# -- encoder ---------------------------------------------------------------------------------
def _model_cfg(num_fields: int):
    from models.config import OmniConfig

    return OmniConfig.from_name(
        "tiny", modalities=["tabular"], encoders={"tabular": {"num_fields": num_fields}}
    )


def test_encoder_shapes_mask_and_gradients() -> None:
    from models.data import collate
    from models.encoders import ENCODERS, build_encoder

    f = _feat()
    assert ENCODERS["tabular"].sizes_for(f.max_output_shape()) == {"num_fields": 5}
    cfg = _model_cfg(5)
    enc = build_encoder("tabular", cfg)
    full = dict(REC)
    rows = [{"tabular": f.featurize({**full, "ink": 0.1 * i, "pen": p})} for i, p in
            enumerate(["black", "red", "blue", "green"])]  # fmt: skip
    rows.append({"tabular": f.featurize({"ink": 0.3})})  # four fields missing
    batch = collate(rows, modalities=["tabular"])
    assert batch["tabular"].shape == (5, 5, 3) and batch["tabular"].dtype == torch.float32
    tokens, mask = enc(batch)
    assert tokens.shape == (5, 5, cfg.d_model)
    assert mask.tolist()[-1] == [True, False, False, False, False]
    assert mask[:4].all()
    # Every parameter gets a gradient from a batch with every field present (the [MASK]
    # token through masked modelling).
    out = enc.encode({"tabular": batch["tabular"][:4]}, mask_ratio=0.4)
    out.tokens[out.mask].pow(2).sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    # A missing field's token does not change the present ones' output.
    enc.zero_grad()
    with torch.no_grad():
        a = enc({"tabular": batch["tabular"][4:]})[0][0, 0]
        other = batch["tabular"][4:].clone()
        other[0, 1:, VALUE] = 7.0  # values of absent fields are ignored
        b = enc({"tabular": other})[0][0, 0]
    torch.testing.assert_close(a, b)


def test_encoder_masked_modelling_targets() -> None:
    from models.encoders import ENCODERS, build_encoder

    cfg = _model_cfg(6)
    enc = build_encoder("tabular", cfg)
    rng = np.random.default_rng(0)
    x = np.stack([ENCODERS["tabular"].random_item(cfg, enc.section, rng) for _ in range(4)])
    out = enc.encode({"tabular": torch.from_numpy(x)}, mask_ratio=0.5)
    assert enc.target_kind == "patches" and enc.target_dim == 1
    assert out.targets.shape == (4, 6, 1)
    num = x[..., KIND] == 0
    np.testing.assert_allclose(out.targets[..., 0].numpy()[num], x[..., VALUE][num])
    assert (out.masked <= out.mask).all()
    with pytest.raises(ValueError, match="tabular must be"):
        enc({"tabular": torch.zeros(2, 7, 3)})


# -- serve spec -----------------------------------------------------------------------------
def test_serve_spec_parse_and_featurize() -> None:
    import base64

    from serve.config import Limits
    from serve.errors import ApiError, sample_error_to_api
    from serve.modalities import get_spec

    spec, limits, f = get_spec("tabular"), Limits(), _feat()
    want = f.featurize(REC)
    for value in (REC, json.dumps(REC)):
        item = spec.parse(value, limits, "input[0].tabular")
        assert item.kind == "value"
        np.testing.assert_array_equal(spec.featurize(f, item), want)
    url = "data:text/csv;base64," + base64.b64encode(_csv(REC)).decode()
    item = spec.parse(url, limits, "p")
    assert item.kind == "bytes"
    np.testing.assert_array_equal(spec.featurize(f, item), want)
    pq_url = "data:application/octet-stream;base64," + base64.b64encode(_parquet(REC)).decode()
    np.testing.assert_array_equal(spec.featurize(f, spec.parse(pq_url, limits, "p")), want)
    for bad, status in ((None, 422), (3, 422), ([1, 2], 422), ({}, 400)):
        with pytest.raises(ApiError) as e:
            spec.parse(bad, limits, "p")
        assert e.value.status == status
    # Contents are the featurizer's: over max_fields -> 413, bad values -> 400.
    for value, status in (({f"f{i}": 1 for i in range(10_000)}, 413), ({"ink": "x"}, 400)):
        with pytest.raises(SampleError) as se:
            spec.featurize(f, spec.parse(value, limits, "p"))
        assert sample_error_to_api(se.value.reason, se.value.detail).status == status
    assert spec.cost(want) == 1
    assert math.isfinite(float(want.sum()))
