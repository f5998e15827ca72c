"""Unit tests of serve/ that need no Ray: configs, the spec registry and request parsing
(looped over the modality table), input limits as featurizer overrides, gallery index,
batching cost, export loading, zero-shot templates, INT8."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from common.modalities import MODALITIES, get_modality
from serve.config import BatchingConfig, Limits, OmniServeArgs, deployment_names
from serve.errors import ApiError, error_body, raise_if_error, sample_error_to_api
from serve.gallery import ExactCosineIndex, Gallery
from serve.modalities import SPECS, RawInput, get_spec, language_modality, register_spec
from serve.modalities.base import ModalitySpec, decode_base64, numeric_array
from serve.replica import _Job, batch_cost

REPO = Path(__file__).resolve().parents[1]
SERVE_YAMLS = sorted((REPO / "configs" / "serve").glob("*.yaml"))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny untrained export with every declared modality (written by write_export)."""
    from serve.devtools import make_untrained_export

    return make_untrained_export(tmp_path_factory.mktemp("serve_units") / "export", size="tiny")


# -- configs ---------------------------------------------------------------------------
@pytest.mark.parametrize("path", SERVE_YAMLS, ids=lambda p: p.name)
def test_serve_yamls_validate(path):
    from ray.serve.schema import ServeDeploySchema

    data = yaml.safe_load(path.read_text())
    schema = ServeDeploySchema.model_validate(data)  # Ray Serve's own config schema
    assert schema.http_options.host == "127.0.0.1"
    (app,) = schema.applications
    assert app.import_path == "serve.app:build_app"
    args = OmniServeArgs.model_validate(app.args)
    names = {d.name for d in app.deployments}
    assert names <= set(deployment_names()), names - set(deployment_names())
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
    # Input limits are featurizer-config overrides, validated against the sections.
    with pytest.raises(ValidationError, match="smell"):
        OmniServeArgs.model_validate({"export_dir": "x", "features": {"smell": {"max": 1}}})
    with pytest.raises(ValidationError, match="max_pixles"):
        OmniServeArgs.model_validate({"export_dir": "x", "features": {"image": {"max_pixles": 1}}})
    with pytest.raises(ValidationError, match="deployment_options"):
        OmniServeArgs.model_validate({"export_dir": "x", "deployment_options": {"smell": {}}})


def test_deployment_names_follow_the_table():
    names = deployment_names()
    assert names[:2] == ("router", "fusion")
    assert names[2:] == tuple(f"{m}_encoder" for m in MODALITIES)


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
    from jobs.exports import ExportError
    from serve.app import build_app

    with pytest.raises(ExportError, match="not found"):
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
    a = numeric_array([[1, 2, 3], [4, 5, 6]], "p", max_rank=2, max_elems=100)
    assert a.dtype == np.float32 and a.shape == (2, 3)
    assert numeric_array([1, 2], "p", max_rank=2, max_elems=100).shape == (2,)
    cases = [
        ([[1, 2], [3]], 422),
        ([[[1]]], 422),
        ([], 422),
        ("x", 422),
        ([["a"]], 422),
        ([[float("nan")]], 400),
        ([[0.0] * 50] * 3, 413),
    ]
    for value, status in cases:
        with pytest.raises(ApiError) as e:
            numeric_array(value, "p", max_rank=2, max_elems=100)
        assert e.value.status == status, value


def test_spec_registry_equals_the_table():
    assert set(SPECS) == set(MODALITIES)
    assert [m for m in MODALITIES if get_spec(m).record.inline] == [
        m for m in MODALITIES if get_modality(m).inline
    ]
    assert language_modality() in MODALITIES
    with pytest.raises(KeyError, match="known"):
        get_spec("smell")
    with pytest.raises(ValueError, match="not a declared modality"):

        @register_spec("smell")
        class _Smell(ModalitySpec):
            pass


@pytest.mark.parametrize("modality", list(MODALITIES))
def test_spec_parses_and_featurizes_like_the_pipeline(export, modality):
    """The request form of a featurizer's example (inline value, or base64 file) gives the
    array the featurizer gives for the raw example."""
    from serve.runtime import load_for_serving

    feat = load_for_serving(export, modalities=[modality], parts=[]).featurizers[modality]
    raw, suffix = feat.example(np.random.default_rng(0), label=3)
    spec = get_spec(modality)
    if isinstance(raw, bytes):
        item = spec.parse(base64.b64encode(raw).decode(), Limits(), "p")
        assert item.kind == "bytes" and item.data == raw
    else:
        item = spec.parse(raw, Limits(), "p")
        assert item.kind == "value"
    got = spec.featurize(feat, item)
    np.testing.assert_array_equal(got, feat.featurize(raw, suffix=suffix))
    assert got.dtype == get_modality(modality).np_dtype
    # Batching cost: the variable axis' length (tokens, frames, points), else 1.
    axis = get_modality(modality).var_axis
    assert spec.cost(got) == (1 if axis is None else got.shape[axis])
    # Non-inline modalities also take a JSON array (handed to from_array).
    if not get_modality(modality).inline:
        arr = spec.parse(np.zeros((2,) * 2).tolist(), Limits(), "p")
        assert arr.kind == "array" and arr.data.dtype == np.float32


def test_inline_values_are_type_checked():
    lang = language_modality()
    with pytest.raises(ApiError) as e:
        get_spec(lang).parse(5, Limits(), "p")
    assert e.value.status == 422
    with pytest.raises(ApiError) as e:
        get_spec(lang).parse("   ", Limits(), "p")
    assert e.value.status == 400


def test_input_limits_are_featurizer_overrides(export):
    """One set of limits: the featurizer's, tightened by ``features``; too_large -> 413."""
    import soundfile as sf

    from jobs.exports import ExportError
    from pipelines.featurize import SampleError
    from serve.runtime import check_serving, load_for_serving

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 3, np.int16), 16000, format="WAV", subtype="PCM_16")
    item = RawInput("audio", "bytes", buf.getvalue(), "p")
    spec = get_spec("audio")
    ok = load_for_serving(export, modalities=["audio"], parts=[], features={})
    spec.featurize(ok.featurizers["audio"], item)
    short = load_for_serving(
        export, modalities=["audio"], parts=[], features={"audio": {"max_seconds": 2}}
    )
    with pytest.raises(SampleError) as e:
        spec.featurize(short.featurizers["audio"], item)
    assert sample_error_to_api(e.value.reason, e.value.detail).status == 413
    # An override that changes what the model sees is refused before any replica starts.
    with pytest.raises(ExportError, match="image"):
        check_serving(export, None, {"image": {"size": 48}})
    assert check_serving(export, ["image"], {"image": {"max_pixels": 10}}) == ["image"]
    with pytest.raises(ExportError, match="no branch"):
        check_serving(export, ["smell"], {})


def test_export_without_data_config_is_an_error(export, tmp_path):
    import shutil

    from jobs.exports import ExportError
    from serve.runtime import load_for_serving

    broken = tmp_path / "export"
    shutil.copytree(export, broken)
    (broken / "data_config.yaml").unlink()
    with pytest.raises(ExportError, match="data_config.yaml"):
        load_for_serving(broken, modalities=["image"], parts=[])


def test_zero_shot_templates_come_from_the_export(export, tmp_path, caplog):
    import shutil

    from serve.runtime import load_for_serving, resolve_templates

    ex = load_for_serving(export, modalities=["image"], parts=[])
    assert resolve_templates(ex, None) == ex.templates
    assert resolve_templates(ex, ["x {label}"]) == ex.templates  # the export's win
    old = tmp_path / "old"
    shutil.copytree(export, old)
    (old / "zero_shot.yaml").unlink()  # an export written before templates travelled
    ex_old = load_for_serving(old, modalities=["image"], parts=[])
    assert resolve_templates(ex_old, ["x {label}"]) == ["x {label}"]


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
def test_int8_replica_model_close_to_fp32(export):
    import torch

    from models.data import collate
    from serve.runtime import load_model

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
