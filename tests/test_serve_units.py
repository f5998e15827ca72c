"""Unit tests of serve/ that need no Ray: configs, request parsing, gallery index, batching
cost, INT8 loading."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from serve.config import BatchingConfig, Limits, OmniServeArgs
from serve.errors import ApiError, error_body, raise_if_error, sample_error_to_api
from serve.gallery import ExactCosineIndex, Gallery
from serve.modalities import SPECS, RawInput, get_spec
from serve.modalities.base import decode_base64, numeric_array
from serve.replica import _Job, batch_cost

REPO = Path(__file__).resolve().parents[1]
SERVE_YAMLS = sorted((REPO / "configs" / "serve").glob("*.yaml"))


# -- configs ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", SERVE_YAMLS, ids=lambda p: p.name)
def test_serve_yamls_validate(path):
    from ray.serve.schema import ServeDeploySchema

    from serve.app import DEPLOYMENT_NAMES

    data = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(data)  # Ray Serve's own config schema
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    args = OmniServeArgs.model_validate(app.args)
    names = {d.name for d in app.deployments}
    assert names <= set(DEPLOYMENT_NAMES), names - set(DEPLOYMENT_NAMES)
    for m in args.served_modalities:
        dep = next(d for d in app.deployments if d.name == f"{m}_encoder")
        assert dep.autoscaling_config is not None, f"{m}: no autoscaling_config"
        # A full batch must be able to form inside one replica.
        assert dep.max_ongoing_requests >= args.batching_for(m).max_batch_size
        assert dep.max_queued_requests > 0


def test_args_reject_unknown_keys_and_modalities():
    with pytest.raises(ValidationError, match="extra"):
        OmniServeArgs.model_validate({"export_dir": "x", "exprot_dir": "y"})
    with pytest.raises(ValidationError, match="unknown modalities"):
        OmniServeArgs.model_validate({"export_dir": "x", "modalities": ["smell"]})
    with pytest.raises(ValidationError, match="label_templates"):
        OmniServeArgs.model_validate({"export_dir": "x", "label_templates": ["no placeholder"]})
    with pytest.raises(ValidationError):
        OmniServeArgs.model_validate({"export_dir": "x", "limits": {"max_items": 0}})
    with pytest.raises(ValidationError, match="not served"):
        OmniServeArgs.model_validate(
            {"export_dir": "x", "modalities": ["text"], "gallery": {"modalities": ["image"]}}
        )


def test_batching_overrides_merge():
    a = OmniServeArgs.model_validate(
        {
            "export_dir": "x",
            "batching": {"max_batch_size": 16},
            "batching_overrides": {"video": {"max_batch_cost": 64}},
        }
    )
    assert a.batching_for("video") == BatchingConfig(max_batch_size=16, max_batch_cost=64)
    assert a.batching_for("text").max_batch_cost == BatchingConfig().max_batch_cost
    with pytest.raises(ValidationError):
        OmniServeArgs.model_validate(
            {"export_dir": "x", "batching_overrides": {"video": {"max_batch_cost": -1}}}
        )


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("OMNI_TEST_KEY", "s3cret")
    assert OmniServeArgs(export_dir="x", api_key="env:OMNI_TEST_KEY").resolved_api_key() == "s3cret"
    assert OmniServeArgs(export_dir="x").resolved_api_key() is None


def test_build_app_fails_early_on_missing_export(tmp_path):
    from serve.app import build_app

    with pytest.raises(FileNotFoundError, match="export dir"):
        build_app({"export_dir": str(tmp_path / "nope")})
    with pytest.raises(ValidationError):
        build_app({"export_dir": str(tmp_path), "bogus": 1})


# -- errors ----------------------------------------------------------------------------
def test_error_shapes():
    assert error_body(413, "big", "too_large") == {
        "error": {"message": "big", "type": "request_too_large", "code": "too_large"}
    }
    assert sample_error_to_api("too_large", "x").status == 413
    assert sample_error_to_api("truncated", "x").status == 400
    with pytest.raises(ApiError) as e:
        raise_if_error({"__error__": {"status": 400, "message": "m", "code": "c", "param": "p"}})
    assert (e.value.status, e.value.code, e.value.param) == (400, "c", "p")
    assert raise_if_error({"embed": 1}) == {"embed": 1}


# -- request parsing (router side) -----------------------------------------------------
def test_decode_base64_variants():
    lim = Limits()
    raw = b"\x89PNG hello"
    assert decode_base64(base64.b64encode(raw).decode(), lim, "p") == raw
    assert decode_base64("data:image/png;base64," + base64.b64encode(raw).decode(), lim, "p") == raw
    for bad, status in [
        ("@@@", 400),
        ("", 400),
        (5, 422),
        ("https://x.org/a.png", 400),
        ("file:///etc/passwd", 400),
    ]:
        with pytest.raises(ApiError) as e:
            decode_base64(bad, lim, "p")
        assert e.value.status == status, bad
    with pytest.raises(ApiError) as e:
        decode_base64("A" * 4000, Limits(max_body_bytes=1024), "p")
    assert e.value.status == 413


def test_numeric_array_validation():
    a = numeric_array([[1, 2, 3], [4, 5, 6]], "p", ndim=2, max_elems=100)
    assert a.dtype == np.float32 and a.shape == (2, 3)
    cases = [
        ([[1, 2], [3]], 422),
        ([1, 2], 422),
        ([], 422),
        ("x", 422),
        ([["a"]], 422),
        ([[float("nan")]], 400),
        ([[0.0] * 50] * 3, 413),
    ]
    for value, status in cases:
        with pytest.raises(ApiError) as e:
            numeric_array(value, "p", ndim=2, max_elems=100)
        assert e.value.status == status, value


def test_every_modality_has_a_spec_and_sniffs():
    from pipelines.schema import MODALITIES

    assert set(SPECS) == set(MODALITIES)
    assert get_spec("image").sniff_suffix(b"\xff\xd8\xff\xe0") == ".jpg"
    assert get_spec("audio").sniff_suffix(b"fLaC....") == ".flac"
    assert get_spec("video").sniff_suffix(b"\x00\x00\x00\x18ftypisom") == ".mp4"
    assert get_spec("pointcloud").sniff_suffix(b"ply\nformat ascii") == ".ply"
    assert get_spec("signal").sniff_suffix(b"\x93NUMPY") == ".npy"
    with pytest.raises(KeyError, match="known"):
        get_spec("smell")


def test_signal_and_pointcloud_inline_limits():
    lim = Limits(max_points=10, max_signal_length=20, max_signal_channels=2)
    sig = get_spec("signal").parse([1.0, 2.0, 3.0], lim, "p")  # one channel
    assert sig.kind == "array" and sig.data.shape == (1, 3)
    with pytest.raises(ApiError) as e:
        get_spec("signal").parse([[0.0] * 5] * 3, lim, "p")
    assert e.value.status == 413
    with pytest.raises(ApiError) as e:
        get_spec("pointcloud").parse([[0.0, 0.0, 0.0]] * 11, lim, "p")
    assert e.value.status == 413


def test_audio_duration_limit_from_header():
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 3, np.int16), 16000, format="WAV", subtype="PCM_16")
    item = RawInput("audio", "bytes", buf.getvalue(), ".wav", "p")
    get_spec("audio").check_limits(item, Limits(max_audio_seconds=5))
    with pytest.raises(ApiError) as e:
        get_spec("audio").check_limits(item, Limits(max_audio_seconds=2))
    assert e.value.status == 413


# -- batching cost ---------------------------------------------------------------------
def test_batch_cost_bounds_count_and_cost():
    cap, size = 100, 4  # max_batch_cost, max_batch_size
    floor = cap / size

    def jobs(costs):
        return [_Job(np.zeros(1), c, floor) for c in costs]

    assert batch_cost(jobs([1, 1, 1, 1])) == 100  # count-bound: 4 items fill the batch
    assert batch_cost(jobs([1, 1, 1, 1, 1])) > cap  # a 5th item does not fit
    assert batch_cost(jobs([60, 30])) == 90  # cost-bound
    assert batch_cost(jobs([60, 50])) > cap
    assert batch_cost([]) == 0


def test_text_cost_is_tokens_and_image_cost_is_tiles():
    assert get_spec("text").cost(np.zeros(17, np.int32)) == 17
    assert get_spec("image").cost(np.zeros((64, 64, 3), np.uint8)) == 4
    assert get_spec("audio").cost(np.zeros((100, 40), np.float16)) == 100
    assert get_spec("pointcloud").cost(np.zeros((256, 3), np.float16)) == 256


# -- gallery ---------------------------------------------------------------------------
def test_exact_cosine_index_topk_and_ties():
    idx = ExactCosineIndex()
    v = np.array([[1, 0], [0, 1], [1, 1], [2, 0], [-1, 0]], np.float32)
    idx.add(v)
    assert len(idx) == 5
    ids, scores = idx.search(np.array([3.0, 0.0]), 3)
    # Items 0 and 3 tie at cosine 1: the lower index comes first (deterministic).
    assert ids.tolist() == [0, 3, 2]
    np.testing.assert_allclose(scores, [1.0, 1.0, np.sqrt(0.5)], atol=1e-6)
    ids, _ = idx.search(np.array([0.0, 1.0]), 10)
    assert len(ids) == 5 and ids[-1] == 4
    with pytest.raises(ValueError):
        idx.search(np.ones(3), 1)


def test_exact_index_matches_bruteforce_random():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(500, 16)).astype(np.float32)
    q = rng.normal(size=16).astype(np.float32)
    idx = ExactCosineIndex()
    idx.add(v)
    ids, scores = idx.search(q, 10)
    ref = (v / np.linalg.norm(v, axis=1, keepdims=True)) @ (q / np.linalg.norm(q))
    assert ids.tolist() == np.argsort(-ref)[:10].tolist()
    np.testing.assert_allclose(scores, ref[ids], atol=1e-5)
    g = Gallery("image", [f"id{i}" for i in range(500)], ["x"] * 500, idx)
    res = g.search(q, 3)
    assert [r["rank"] for r in res] == [1, 2, 3] and res[0]["id"] == f"id{ids[0]}"


def test_read_split_skips_missing_modalities(tmp_path):
    from serve.devtools import write_gallery_split
    from serve.gallery import read_split

    rows = [
        {"id": "b", "label": "1", "image": np.zeros((32, 32, 3), np.uint8)},
        {"id": "a", "label": "0", "text": np.array([1, 5, 2], np.int32)},
    ]
    write_gallery_split(rows, tmp_path)
    items = read_split(tmp_path, ["image", "text", "audio"], max_items=10)
    assert set(items) == {"image", "text"}
    assert items["image"].ids == ["b"] and items["text"].labels == ["0"]
    with pytest.raises(FileNotFoundError):
        read_split(tmp_path / "empty", ["image"], 10)


# -- INT8 ------------------------------------------------------------------------------
def test_int8_replica_model_close_to_fp32(tmp_path):
    import torch

    from models.data import collate
    from serve.devtools import make_untrained_export
    from serve.runtime import load_model

    export = make_untrained_export(tmp_path / "export", size="tiny")
    fp32 = load_model(export, modalities=["image"], parts=[], quantization="none")
    int8 = load_model(export, modalities=["image"], parts=[], quantization="int8")
    assert any("quantized" in type(m).__module__ for m in int8.modules()), "nothing quantized"
    assert "text" not in fp32.encoders and fp32.fusion is None  # only the image branch
    rng = np.random.default_rng(0)
    batch = collate(
        [{"image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)} for _ in range(8)],
        modalities=("image",),
    )
    with torch.inference_mode():
        a = fp32.encode_features("image", batch).embed
        b = int8.encode_features("image", batch).embed
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert float(cos.min()) > 0.98, cos
    with pytest.raises(ValueError, match="quantization"):
        load_model(export, modalities=["image"], quantization="int4")


def test_feature_config_reads_only_the_features_section(tmp_path):
    from common.config import ConfigError
    from serve.runtime import load_feature_config

    (tmp_path / "data_config.yaml").write_text(
        yaml.safe_dump({"features": {"image": {"size": 48}}, "execution": {"some_future_key": 1}})
    )
    assert load_feature_config(tmp_path).image.size == 48
    (tmp_path / "data_config.yaml").write_text(yaml.safe_dump({"features": {"imag": {}}}))
    with pytest.raises(ConfigError, match="imag"):
        load_feature_config(tmp_path)
    assert load_feature_config(tmp_path / "none").image.size == 32  # defaults when absent
