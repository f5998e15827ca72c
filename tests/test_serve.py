"""End-to-end tests of the Ray Serve application over real HTTP.

One application (configs/serve/tiny.yaml args, a tiny untrained export and a gallery split
made from the ``tiny_corpus`` fixture) is deployed once for the module on a free port and
reused by every test. Per-modality tests loop over the modality table; request values come
from the corpus generically (the inline value, or the base64 file).
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from common.modalities import MODALITIES as TABLE

APP = "omniray_test"
API_KEY = "test-key-123"
MODALITIES = tuple(TABLE)
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Env:
    url: str
    export: Path
    corpus: Path
    rows: list[dict[str, Any]]  # featurized gallery rows
    manifest: dict[str, dict[str, Any]]  # id -> manifest record
    args: dict[str, Any]
    featurizers: dict[str, Any]  # the export's, as the service builds them

    def client(self, key: str | None = API_KEY):
        import httpx

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def b64(self, row_id: str, m: str) -> str:
        return base64.b64encode((self.corpus / self.manifest[row_id][m]).read_bytes()).decode()

    def value(self, row_id: str, m: str) -> Any:
        """The request value of a row's modality: the inline value or the base64 file."""
        v = self.manifest[row_id][m]
        return v if self.featurizers[m].accepts_inline(v) else self.b64(row_id, m)

    def row_with(self, *mods: str) -> dict[str, Any]:
        """A gallery row (its files featurize cleanly) holding all ``mods``."""
        row = next((r for r in self.rows if all(m in r for m in mods)), None)
        if row is None:
            pytest.fail(f"the tiny corpus has no clean row with {mods}")
        return row


@pytest.fixture(scope="module")
def env(ray_local, tiny_corpus, tmp_path_factory):
    from ray import serve

    from jobs.exports import load_featurizers
    from models import OmniConfig
    from serve.app import build_app
    from serve.devtools import (
        DEFAULT_TEXTS,
        featurize_manifest_rows,
        make_untrained_export,
        write_gallery_split,
    )

    corpus = Path(tiny_corpus)
    manifest_path = corpus / "manifest.jsonl"
    records = [json.loads(x) for x in manifest_path.read_text().splitlines() if x.strip()]
    root = tmp_path_factory.mktemp("serve_app")
    texts = list(DEFAULT_TEXTS) + [r["text"] for r in records if r.get("text")]
    export = make_untrained_export(root / "export", size="tiny", texts=texts)
    rows = featurize_manifest_rows(manifest_path, export)
    split = write_gallery_split(rows, root / "gallery")

    cfg = yaml.safe_load((REPO / "configs/serve/tiny.yaml").read_text())
    args = cfg["applications"][0]["args"]
    args.update(export_dir=str(export), api_key=API_KEY)
    args["gallery"]["split_dir"] = str(split)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield Env(
            url=f"http://127.0.0.1:{port}",
            export=export,
            corpus=corpus,
            rows=rows,
            manifest={r["id"]: r for r in records},
            args=args,
            featurizers=load_featurizers(
                export, OmniConfig.from_yaml(export / "model_config.yaml")
            )[1],
        )
    finally:
        try:
            serve.delete(APP)
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def direct(env):
    """The same export loaded in-process: reference answers computed with models directly."""
    import torch

    from jobs.exports import load_export
    from models.data import collate

    ex = load_export(env.export)
    model, feats = ex.model, ex.featurizers

    class Direct:
        templates = ex.templates

        def featurize(self, m: str, value: Any) -> np.ndarray:
            """A manifest value (inline, or a path under the corpus) -> featurized."""
            if feats[m].accepts_inline(value):
                return feats[m].featurize(value)
            p = env.corpus / value
            return feats[m].featurize(p.read_bytes(), suffix=p.suffix)

        def features(self, m: str, arr: np.ndarray):
            with torch.inference_mode():
                return model.encode_features(m, collate([{m: arr}], modalities=(m,)))

        def embed(self, m: str, arr: np.ndarray) -> np.ndarray:
            return self.features(m, arr).embed[0].numpy()

        model_ = model

    return Direct()


def _stats(names: list[str]) -> dict[str, dict[str, Any]]:
    from ray import serve

    return {n: serve.get_deployment_handle(n, APP).stats.remote().result() for n in names}


def _assert_error(r, status: int, code: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err


# -- health and model info -------------------------------------------------------------
def test_healthz_and_models(env):
    with env.client(key=None) as c:
        h = c.get("/healthz")
        assert h.status_code == 200
        assert h.json()["status"] == "ok"
        assert sorted(h.json()["modalities"]) == sorted(MODALITIES)
        _assert_error(c.get("/v1/models"), 401, "invalid_api_key")
    with env.client() as c:
        m = c.get("/v1/models").json()
    assert m["object"] == "list"
    (info,) = m["data"]
    assert info["id"] == "omniray-tiny"
    assert info["embedding_dim"] > 0
    # The gallery holds every modality of the split, with as many items as rows have it.
    for mod in MODALITIES:
        assert info["gallery"][mod] == sum(mod in r for r in env.rows)


# -- embeddings: every modality, same answer as the model called directly ---------------
@pytest.mark.parametrize("modality", MODALITIES)
def test_embeddings_match_direct_model(env, direct, modality):
    row = env.row_with(modality)
    rec = env.manifest[row["id"]]
    value = env.value(row["id"], modality)
    with env.client() as c:
        r = c.post("/v1/embeddings", json={"input": [{modality: value}], "model": "omniray-tiny"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "omniray-tiny"
    (item,) = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    got = np.asarray(item["embedding"], dtype=np.float32)
    ref = direct.embed(modality, direct.featurize(modality, rec[modality]))
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
    assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-3


def test_inline_arrays_pointcloud_and_signal(env, direct):
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(300, 3)).round(4)
    sig = rng.normal(size=(3, 200)).round(4)
    with env.client() as c:
        r = c.post(
            "/v1/embeddings",
            json={"input": [{"pointcloud": pts.tolist()}, {"signal": sig.tolist()}]},
        )
    assert r.status_code == 200, r.text
    d = r.json()["data"]
    feats = {
        "pointcloud": direct_feat(env, "pointcloud", pts),
        "signal": direct_feat(env, "signal", sig),
    }
    for i, m in enumerate(("pointcloud", "signal")):
        np.testing.assert_allclose(
            np.asarray(d[i]["embedding"]), direct.embed(m, feats[m]), atol=2e-4, rtol=1e-3
        )


def direct_feat(env: Env, m: str, arr: np.ndarray) -> np.ndarray:
    return env.featurizers[m].featurize(arr.astype(np.float32))


def test_openai_client_float_and_base64(env):
    import openai

    client = openai.OpenAI(base_url=f"{env.url}/v1", api_key=API_KEY, max_retries=0)
    texts = ["the digit seven", "two", "un huit"]
    # The client asks for base64 by default and decodes it itself.
    res = client.embeddings.create(model="omniray-tiny", input=texts)
    res_f = client.embeddings.create(model="omniray-tiny", input=texts, encoding_format="float")
    assert [d.index for d in res.data] == [0, 1, 2]
    for a, b in zip(res.data, res_f.data, strict=True):
        np.testing.assert_allclose(np.asarray(a.embedding), np.asarray(b.embedding), atol=1e-6)
    assert res.usage.prompt_tokens > 0
    with env.client() as c:
        one = c.post("/v1/embeddings", json={"input": "two", "encoding_format": "float"}).json()
    np.testing.assert_allclose(res_f.data[1].embedding, one["data"][0]["embedding"], atol=1e-6)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{env.url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="omniray-tiny", input=["x"]
        )


def test_text_request_touches_only_text_replicas(env):
    names = [f"{m}_encoder" for m in MODALITIES] + ["fusion"]
    before = _stats(names)
    with env.client() as c:
        for t in ("seven", "the digit three"):
            assert c.post("/v1/embeddings", json={"input": t}).status_code == 200
    after = _stats(names)
    assert after["text_encoder"]["items"] == before["text_encoder"]["items"] + 2
    for n in names:
        if n != "text_encoder":
            assert after[n] == before[n], f"{n} was called by a text request"


def test_dynamic_batching_forms_batches(env):
    row = env.row_with("image")
    img = env.b64(row["id"], "image")
    before = _stats(["image_encoder"])["image_encoder"]

    def one(_):
        with env.client() as c:
            return c.post("/v1/embeddings", json={"input": [{"image": img}] * 4}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(16)))
    assert codes == [200] * 16
    after = _stats(["image_encoder"])["image_encoder"]
    items = after["dynamic_items"] - before["dynamic_items"]
    batches = after["dynamic_batches"] - before["dynamic_batches"]
    assert items == 64
    # Concurrent requests were merged: fewer forward passes than items, none above the
    # configured max_batch_size (8 in tiny.yaml).
    assert batches < items
    assert after["max_dynamic_batch"] <= 8


# -- fuse, search, classify, describe --------------------------------------------------
def test_fuse_matches_direct(env, direct):
    import torch

    row = env.row_with("image", "audio", "text")
    rec = env.manifest[row["id"]]
    inp = {m: env.value(row["id"], m) for m in ("image", "audio", "text")}
    with env.client() as c:
        r = c.post("/v1/fuse", json={"input": inp})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body["gates"]) == {"image", "audio", "text"}
    assert all(0.0 <= g <= 1.0 for g in body["gates"].values())
    feats = {m: direct.features(m, direct.featurize(m, rec[m])) for m in inp}
    with torch.inference_mode():
        fused, gates = direct.model_.fuse_features(feats)
    np.testing.assert_allclose(body["embedding"], fused[0].numpy(), atol=2e-4, rtol=1e-3)
    order = list(direct.model_.config.modalities)
    for m, g in body["gates"].items():
        assert abs(g - float(gates[0, order.index(m)])) < 1e-4


@pytest.mark.parametrize("target", MODALITIES)
def test_search_finds_the_item_itself(env, target):
    row = env.row_with(target)
    query = env.value(row["id"], target)
    with env.client() as c:
        r = c.post("/v1/search", json={"query": {target: query}, "target": target, "k": 5})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert len(res) == 5
    # The item itself scores 1 (an exact duplicate planted in the corpus may tie with it).
    assert res[0]["score"] > 0.999
    assert row["id"] in [x["id"] for x in res if x["score"] > 0.999]
    scores = [x["score"] for x in res]
    assert scores == sorted(scores, reverse=True)
    assert [x["rank"] for x in res] == [1, 2, 3, 4, 5]


def test_search_cross_modal_matches_numpy(env, direct):
    row = env.row_with("text")
    rec = env.manifest[row["id"]]
    with env.client() as c:
        r = c.post("/v1/search", json={"query": {"text": rec["text"]}, "target": "image", "k": 3})
    assert r.status_code == 200, r.text
    q = direct.embed("text", direct.featurize("text", rec["text"]))
    gal = [(x["id"], direct.embed("image", x["image"])) for x in env.rows if "image" in x]
    scores = np.array([float(v @ q / np.linalg.norm(v) / np.linalg.norm(q)) for _, v in gal])
    top = np.argsort(-scores, kind="stable")[:3]
    assert [x["id"] for x in r.json()["results"]] == [gal[i][0] for i in top]


@pytest.mark.parametrize("modality", MODALITIES)
def test_classify_zero_shot_matches_direct(env, direct, modality):
    row = env.row_with(modality)
    labels = ["zero", "seven", "two"]
    with env.client() as c:
        r = c.post(
            "/v1/classify",
            json={"input": {modality: env.value(row["id"], modality)}, "labels": labels},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    probs = {s["label"]: s["probability"] for s in body["scores"]}
    assert set(probs) == set(labels)
    assert abs(sum(probs.values()) - 1.0) < 1e-5
    # Evaluation's classifier (models.zeroshot) with the export's templates, in-process.
    from models.zeroshot import zero_shot_classifier, zero_shot_scores

    def embed_texts(texts: list[str]) -> np.ndarray:
        return np.stack([direct.embed("text", direct.featurize("text", t)) for t in texts])

    classifier = zero_shot_classifier(embed_texts, labels, direct.templates)
    scale = min(
        float(direct.model_.logit_scale.detach().exp()), direct.model_.config.max_logit_scale
    )
    ref = zero_shot_scores(direct.embed(modality, row[modality]), classifier, scale).numpy()
    for i, x in enumerate(labels):
        assert abs(probs[x] - ref[i]) < 1e-4
    assert body["label"] == labels[int(np.argmax(ref))]


@pytest.mark.parametrize("modality", MODALITIES)
def test_describe_matches_direct_greedy(env, direct, modality):
    import torch

    row = env.row_with(modality)
    with env.client() as c:
        r = c.post(
            "/v1/describe",
            json={"input": {modality: env.value(row["id"], modality)}, "max_len": 8},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["text"], str)
    with torch.inference_mode():
        ref = direct.model_.generate_from_features(
            {modality: direct.features(modality, row[modality])}, max_len=8, num_beams=1
        )
    assert body["token_ids"] == [int(t) for t in ref[0]]


# -- bad input: documented 4xx, never 5xx, the service keeps answering ------------------
def _png_header(w: int, h: int) -> bytes:
    """A valid PNG header claiming w x h pixels (with a tiny IDAT): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )


def _wav(seconds: float, rate: int = 8000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * rate), np.int16), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _object_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _fuzz_cases(env: Env) -> list[tuple[str, str, Any, int, str | None]]:
    """(name, path, body (dict or raw bytes), expected status, expected code)."""
    img_row = env.row_with("image")
    png = (env.corpus / env.manifest[img_row["id"]]["image"]).read_bytes()
    ply_bomb = b"ply\nformat ascii 1.0\nelement vertex 9999999\nproperty float x\nend_header\n"
    E = "/v1/embeddings"
    return [
        ("malformed json", E, b"{bad json", 400, "invalid_json"),
        ("not utf8", E, b"\xff\xfe\x00", 400, "invalid_json"),
        (
            "deep nesting",
            E,
            b'{"input": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
            400,
            "invalid_json",
        ),
        ("body not object", E, [1, 2], 422, "wrong_type"),
        ("missing input", E, {"model": "omniray-tiny"}, 422, "invalid_field"),
        ("unknown field", E, {"input": "x", "temperature": 1}, 422, "invalid_field"),
        ("input wrong type", E, {"input": 5}, 422, "invalid_field"),
        ("token ids", E, {"input": [[1, 2, 3]]}, 422, "wrong_type"),
        ("empty list", E, {"input": []}, 422, "empty_input"),
        ("empty text", E, {"input": ""}, 400, "empty"),
        ("unknown modality", E, {"input": [{"smell": "x"}]}, 422, "unknown_modality"),
        ("two modalities", E, {"input": [{"text": "a", "image": "b"}]}, 422, "one_modality"),
        ("wrong model", E, {"input": "x", "model": "gpt-4"}, 422, "model_not_found"),
        ("bad encoding", E, {"input": "x", "encoding_format": "int8"}, 422, "invalid_field"),
        ("image not b64", E, {"input": [{"image": "!!!not base64!!!"}]}, 400, "invalid_base64"),
        ("image wrong type", E, {"input": [{"image": 12}]}, 422, "wrong_type"),
        (
            "image remote url",
            E,
            {"input": [{"image": "http://example.com/a.png"}]},
            400,
            "url_not_supported",
        ),
        ("image truncated", E, {"input": [{"image": _b64(png[: len(png) // 3])}]}, 400, None),
        (
            "image garbage",
            E,
            {"input": [{"image": _b64(b"hello world" * 10)}]},
            400,
            "decode_error",
        ),
        (
            "image huge dims",
            E,
            {"input": [{"image": _b64(_png_header(40000, 40000))}]},
            413,
            "too_large",
        ),
        (
            "audio garbage",
            E,
            {"input": [{"audio": _b64(b"RIFF\x00\x00\x00\x00WAVEjunk")}]},
            400,
            None,
        ),
        ("audio too long", E, {"input": [{"audio": _b64(_wav(11.0))}]}, 413, "too_large"),
        ("audio empty", E, {"input": [{"audio": ""}]}, 400, "empty"),
        (
            "video garbage",
            E,
            {"input": [{"video": _b64(b"\x00\x00\x00\x18ftypmp42" + b"x" * 99)}]},
            400,
            None,
        ),
        ("pointcloud 2 cols", E, {"input": [{"pointcloud": [[1, 2], [3, 4]]}]}, 400, "bad_shape"),
        ("image rank 4", E, {"input": [{"image": [[[[0]]]]}]}, 422, "wrong_shape"),
        (
            "pointcloud over max_points",
            E,
            {"input": [{"pointcloud": [[0.0, 0.0, 0.0]] * 20001}]},
            413,
            "too_large",
        ),
        ("pointcloud ragged", E, {"input": [{"pointcloud": [[1, 2, 3], [4]]}]}, 422, "wrong_shape"),
        (
            "pointcloud strings",
            E,
            {"input": [{"pointcloud": [["a", "b", "c"]]}]},
            422,
            "wrong_shape",
        ),
        (
            "pointcloud nan",
            E,
            b'{"input": [{"pointcloud": [[NaN, 1, 2], [0, 1, 2]]}]}',
            400,
            "non_finite",
        ),
        ("pointcloud too many", E, {"input": [{"pointcloud": _b64(ply_bomb)}]}, 413, "too_large"),
        ("signal too long", E, {"input": [{"signal": [[0.0] * 6000]}]}, 413, "too_large"),
        ("signal object npy", E, {"input": [{"signal": _b64(_object_npy())}]}, 400, "bad_dtype"),
        ("text too long", E, {"input": "a" * 3000}, 413, "too_large"),
        ("too many items", E, {"input": ["a"] * 17}, 413, "too_many_items"),
        ("body too large", E, {"input": "a", "user": "x" * (3 * 2**20)}, 413, "too_large"),
        ("fuse empty", "/v1/fuse", {"input": {}}, 422, "empty_input"),
        (
            "search bad k",
            "/v1/search",
            {"query": {"text": "a"}, "target": "image", "k": 1000},
            413,
            "too_large",
        ),
        (
            "search k type",
            "/v1/search",
            {"query": {"text": "a"}, "target": "image", "k": "x"},
            422,
            "invalid_field",
        ),
        (
            "search bad target",
            "/v1/search",
            {"query": {"text": "a"}, "target": "smell"},
            422,
            "unknown_target",
        ),
        (
            "classify no labels",
            "/v1/classify",
            {"input": {"text": "a"}, "labels": []},
            422,
            "invalid_field",
        ),
        (
            "classify dup labels",
            "/v1/classify",
            {"input": {"text": "a"}, "labels": ["x", "x"]},
            422,
            "invalid_field",
        ),
        (
            "describe bad beams",
            "/v1/describe",
            {"input": {"text": "a"}, "num_beams": 99},
            422,
            "invalid_field",
        ),
        ("unknown route", "/v1/nothing", {"input": "a"}, 404, "not_found"),
    ]


def test_fuzz_bad_inputs_give_documented_4xx(env):
    cases = _fuzz_cases(env)
    with env.client() as c:
        for name, path, body, status, code in cases:
            if isinstance(body, bytes):
                r = c.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(path, json=body)
            assert r.status_code < 500, (name, r.status_code, r.text[:300])
            try:
                _assert_error(r, status, code)
            except AssertionError as e:
                raise AssertionError(f"case {name!r}: {e}") from e
        # Auth: missing and wrong keys.
    with env.client(key=None) as c:
        _assert_error(c.post("/v1/embeddings", json={"input": "a"}), 401, "invalid_api_key")
    with env.client(key="nope") as c:
        _assert_error(c.post("/v1/embeddings", json={"input": "a"}), 401, "invalid_api_key")
    # The service still answers, and no replica was restarted by the bad input.
    with env.client() as c:
        assert c.get("/healthz").status_code == 200
        ok = c.post(
            "/v1/embeddings",
            json={
                "input": ["still alive", {"image": env.b64(env.row_with("image")["id"], "image")}]
            },
        )
        assert ok.status_code == 200 and len(ok.json()["data"]) == 2


def test_overload_gives_503_not_crashes(env):
    import asyncio

    import httpx

    row = env.row_with("video")
    body = {"input": [{"video": env.b64(row["id"], "video")}] * 8}

    async def fire(n: int) -> list[int]:
        async with httpx.AsyncClient(
            base_url=env.url,
            timeout=120,
            headers={"Authorization": f"Bearer {API_KEY}"},
            limits=httpx.Limits(max_connections=n),
        ) as c:
            rs = await asyncio.gather(*[c.post("/v1/embeddings", json=body) for _ in range(n)])
        for r in rs:
            if r.status_code == 503:
                _assert_error(r, 503, "overloaded")
        return [r.status_code for r in rs]

    codes = asyncio.run(fire(48))
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0, "max_inflight=8 should refuse some of 48 concurrent requests"
    assert codes.count(200) > 0
    with env.client() as c:
        assert c.post("/v1/embeddings", json={"input": "after the storm"}).status_code == 200


# -- generation (/v1/generate): every direction, files that featurize, hostile cases -------
GEN_TARGETS = ("image", "audio", "signal", "pointcloud")


def _generate(c, body: dict[str, Any]):
    return c.post("/v1/generate", json=body)


def test_models_lists_generation_directions(env):
    with env.client() as c:
        (info,) = c.get("/v1/models").json()["data"]
    assert "/v1/generate" in info["endpoints"]
    dirs = {(d["input"], d["target"]) for d in info["generation"]}
    for t in GEN_TARGETS:
        assert ("fused", t) in dirs
        for s in MODALITIES:
            assert ((s, t) in dirs) == (s != t), (s, t)


@pytest.mark.parametrize("target", GEN_TARGETS)
def test_generate_every_direction_over_http(env, target):
    """Every served input modality -> target: files of the declared type that the
    target's featurizer reads back; same seed = same bytes, other seed = other sample."""
    with env.client() as c:
        for source in MODALITIES:
            if source == target:
                continue
            row = env.row_with(source)
            body = {"input": {source: env.value(row["id"], source)}, "target": target, "n": 2}
            r = _generate(c, {**body, "seed": 3, "steps": 2})
            assert r.status_code == 200, (source, r.text[:300])
            out = r.json()
            assert out["object"] == "list" and out["target"] == target
            assert out["input_modalities"] == [source]
            assert [d["index"] for d in out["data"]] == [0, 1]
            assert [d["seed"] for d in out["data"]] == [3, 4]
            files = [base64.b64decode(d["b64"]) for d in out["data"]]
            f = env.featurizers[target]
            for d, data in zip(out["data"], files, strict=True):
                assert d["mime"] in {
                    "image/png",
                    "audio/wav",
                    "application/x-npy",
                    "application/x-ply",
                }
                arr = f.featurize(data, suffix=f.sniff(data))
                assert np.isfinite(arr.astype(np.float32)).all()
            assert files[0] != files[1]
            again = _generate(c, {**body, "seed": 3, "steps": 2}).json()
            assert [d["b64"] for d in again["data"]] == [d["b64"] for d in out["data"]]


def test_generate_from_several_inputs_uses_fusion_and_formats(env):
    row = env.row_with("text", "image")
    with env.client() as c:
        r = _generate(
            c,
            {
                "input": {m: env.value(row["id"], m) for m in ("text", "image")},
                "target": "signal",
                "format": "csv",
                "seed": 0,
            },
        )
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    assert out["input_modalities"] == ["text", "image"]
    (d,) = out["data"]
    assert d["mime"] == "text/csv"
    text = base64.b64decode(d["b64"]).decode()
    assert text.startswith("ch0,")


def test_generate_hostile_requests_give_4xx(env):
    text = {"text": "the digit seven"}
    cases = [
        ("unknown target", {"input": text, "target": "smell"}, 422, "unknown_target"),
        ("no head for target", {"input": text, "target": "text"}, 422, "unsupported_target"),
        (
            "target is input",
            {"input": {"image": "AAAA"}, "target": "image"},
            422,
            "target_is_input",
        ),
        ("n over limit", {"input": text, "target": "image", "n": 999}, 413, "too_large"),
        ("n zero", {"input": text, "target": "image", "n": 0}, 422, "invalid_field"),
        ("steps over limit", {"input": text, "target": "image", "steps": 10_000}, 413, "too_large"),
        ("negative seed", {"input": text, "target": "image", "seed": -1}, 422, "invalid_field"),
        ("bad format", {"input": text, "target": "image", "format": "gif"}, 422, "invalid_field"),
        ("empty input", {"input": {}, "target": "image"}, 422, "empty_input"),
        ("unknown field", {"input": text, "target": "image", "size": 3}, 422, "invalid_field"),
        (
            "undecodable input",
            {"input": {"audio": base64.b64encode(b"RIFF nonsense").decode()}, "target": "image"},
            400,
            None,
        ),
        ("bad base64", {"input": {"image": "%%%"}, "target": "audio"}, 400, "invalid_base64"),
    ]
    with env.client() as c:
        for name, body, status, code in cases:
            r = _generate(c, body)
            assert r.status_code < 500, (name, r.status_code, r.text[:300])
            try:
                _assert_error(r, status, code)
            except AssertionError as e:
                raise AssertionError(f"case {name!r}: {e}") from e
        assert _generate(c, {"input": text, "target": "image"}).status_code == 200
