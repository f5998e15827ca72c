"""``jobs.embed`` / ``jobs.index`` and the service's embedding-directory gallery.

One embedding run of the ``tiny_corpus`` fixture (2 actors, several parts) is shared by
the module; a second, windowed run embeds a small manifest of long audio and signals.
The service test deploys one application on that embedding directory.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobs.embedding.config import EmbedConfig, WindowConfig


def _export(root: Path, corpus: Path, seed: int = 0) -> Path:
    from serve.devtools import DEFAULT_TEXTS, make_untrained_export

    recs = [json.loads(x) for x in (corpus / "manifest.jsonl").read_text().splitlines() if x]
    texts = list(DEFAULT_TEXTS) + [r["text"] for r in recs if r.get("text")]
    return make_untrained_export(root, size="tiny", texts=texts, seed=seed)


@pytest.fixture(scope="module")
def embedded(ray_local, tiny_corpus, tmp_path_factory):
    from jobs.embedding.index import build_index
    from jobs.embedding.run import run_embed

    root = tmp_path_factory.mktemp("embed")
    export = _export(root / "export", Path(tiny_corpus))
    out = root / "emb"
    cfg = EmbedConfig(rows_per_part=16, actors=2, cpus_per_actor=0.5, batch_size=16)
    stats = run_embed(export, out, manifest=str(Path(tiny_corpus) / "manifest.jsonl"), config=cfg)
    build_index(out)
    return {"export": export, "out": out, "stats": stats, "cfg": cfg, "root": root}


def _records(out: Path):
    import pyarrow as pa

    return pa.concat_tables(pq.read_table(f) for f in sorted((out / "parts").glob("*.parquet")))


def test_embed_outputs_and_exact_accounting(embedded, tiny_corpus):
    from jobs.exports import load_export
    from models.data import collate
    from serve.devtools import featurize_manifest_rows

    out, stats = embedded["out"], embedded["stats"]
    lines = [x for x in (Path(tiny_corpus) / "manifest.jsonl").read_text().splitlines() if x]
    assert stats["accounting"]["ok"]
    assert stats["rows_read"] == len(lines)
    assert stats["rows_embedded"] + stats["rows_dropped"] == len(lines)
    assert stats["parts"] == {"total": 4, "skipped_finished": 0, "written": 4}
    assert stats["actors"] == 2
    # Every (row, modality) the export's featurizers accept is embedded, nothing else; the
    # others are in quarantine.jsonl with a reason (reference: a plain loop, no Ray).
    ref = featurize_manifest_rows(Path(tiny_corpus) / "manifest.jsonl", embedded["export"])
    want = {(r["id"], m) for r in ref for m in r if m not in ("id", "label", "group")}
    t = _records(out)
    got = set(zip(t.column("id").to_pylist(), t.column("modality").to_pylist(), strict=True))
    assert got == want
    assert t.column_names == [
        "id", "label", "modality", "segment", "start_s", "end_s", "embedding", "fused"
    ]  # fmt: skip
    q = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    assert len(q) == stats["quarantined"]["total"]
    recs = {json.loads(x)["id"]: json.loads(x) for x in lines}
    n_values = sum(
        1 for r in recs.values() for m in stats["modalities"] if r.get(m) not in (None, "")
    )
    assert len(want) + sum(1 for x in q if x["modality"]) == n_values
    # Fused: once per multi-modality row; the embeddings are the model's own.
    fused = [f for f in t.column("fused").to_pylist() if f is not None]
    assert len(fused) == stats["fused_rows"] == sum(1 for r in ref if len(r) - 3 > 1)
    meta = json.loads((out / "embed.json").read_text())
    assert len(meta["revision"]) == 16 and meta["embed_dim"] == len(fused[0])
    ex = load_export(embedded["export"])
    row = next(r for r in ref if "image" in r and "audio" in r)
    for m in ("image", "audio"):
        direct = ex.model.encode_features(m, collate([{m: row[m]}], modalities=(m,)))
        sel = [
            i
            for i, (a, b) in enumerate(
                zip(t.column("id").to_pylist(), t.column("modality").to_pylist(), strict=True)
            )
            if a == row["id"] and b == m
        ]
        got_v = np.asarray(t.column("embedding")[sel[0]].as_py())
        assert float(got_v @ direct.embed[0].detach().numpy()) > 0.999


def test_embed_resume_skips_finished_parts_and_refuses_other_export(
    embedded, tiny_corpus, tmp_path
):
    from jobs.embedding.output import EmbeddingDirError
    from jobs.embedding.run import run_embed

    out, cfg = embedded["out"], embedded["cfg"]
    manifest = str(Path(tiny_corpus) / "manifest.jsonl")
    before = {f.name: f.stat().st_mtime_ns for f in (out / "parts").glob("*.parquet")}
    (out / "parts" / "part-00002.parquet").unlink()  # as if the job died during part 2
    stats = run_embed(embedded["export"], out, manifest=manifest, config=cfg)
    assert stats["parts"] == {"total": 4, "skipped_finished": 3, "written": 1}
    after = {f.name: f.stat().st_mtime_ns for f in (out / "parts").glob("*.parquet")}
    assert {k: v for k, v in after.items() if k != "part-00002.parquet"} == {
        k: v for k, v in before.items() if k != "part-00002.parquet"
    }
    assert stats["rows_read"] == embedded["stats"]["rows_read"]
    assert stats["accounting"]["ok"]
    # Another model revision, or other settings: refused without --overwrite.
    other = _export(tmp_path / "other", Path(tiny_corpus), seed=1)
    with pytest.raises(EmbeddingDirError, match="revision"):
        run_embed(other, out, manifest=manifest, config=cfg)
    with pytest.raises(EmbeddingDirError, match="rows_per_part"):
        run_embed(embedded["export"], out, manifest=manifest, config=EmbedConfig(rows_per_part=7))
    from jobs.embedding.index import build_index

    build_index(out)  # the resumed run removed the index of the old parts


def test_embed_cli_one_line_errors(embedded, tmp_path, capsys):
    from jobs.embed import main

    cases = [
        (["--export", str(tmp_path / "nope"), "--manifest", "m.jsonl"], "export directory not found"),
        (["--export", str(embedded["export"]), "--manifest", str(tmp_path / "x.jsonl")], "manifest not found"),
        (["--export", str(embedded["export"]), "--manifest", "m.jsonl", "windows.image.seconds=2"], "windows.image"),
        (["--export", str(embedded["export"]), "--manifest", "m.jsonl", "bogus=1"], "bogus"),
    ]  # fmt: skip
    for argv, needle in cases:
        assert main([*argv, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and "\n" not in err, err


def test_index_hnsw_recall_stored(embedded, tmp_path):
    from jobs.embedding.index import IndexConfig, build_index, read_index_info
    from jobs.embedding.output import EmbeddingDirError

    out = tmp_path / "emb"
    shutil.copytree(embedded["out"], out)
    info = build_index(out, IndexConfig(kind="hnsw", recall_queries=20))
    for m, e in info["modalities"].items():
        assert e["kind"] == "hnsw" and (out / "index" / e["file"]).is_file(), m
        assert 0.9 <= e["recall_at_10"]["recall"] <= 1.0  # tiny galleries: HNSW ~ exact
    assert read_index_info(out)["modalities"].keys() == info["modalities"].keys()
    # The service's loader serves the HNSW index: a gallery vector finds itself first.
    from serve.gallery import load_embedding_galleries, search_galleries

    gal = load_embedding_galleries(out, ["image", "audio"])
    assert type(gal["image"].index).__name__ == "HnswIndex"
    t = _records(out).to_pylist()
    audio = [r for r in t if r["modality"] == "audio"]
    mat = np.asarray([r["embedding"] for r in audio])
    sims = mat @ mat.T - 2 * np.eye(len(audio))
    row = audio[int(np.argmin(sims.max(axis=1)))]  # no planted duplicate ties with it
    hits = search_galleries(gal, ["image", "audio"], np.asarray(row["embedding"]), 3)
    assert hits[0]["id"] == row["id"] and hits[0]["modality"] == "audio"
    assert hits[0]["score"] > 0.999 and [h["rank"] for h in hits] == [1, 2, 3]
    next((out / "parts").glob("*.parquet")).unlink()
    with pytest.raises(EmbeddingDirError, match="rebuild"):
        read_index_info(out)


# -- long media: windows -------------------------------------------------------------------
def _wav(seconds: float, sr: int = 16_000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(
        buf, (0.3 * np.sin(2 * np.pi * 220 * t * (1 + t / 10))).astype(np.float32), sr, format="WAV"
    )
    return buf.getvalue()


def test_window_spans_and_featurizer_windows():
    from pipelines.config import FeatureConfig
    from pipelines.featurize import get_featurizer
    from pipelines.featurize.base import window_spans

    assert window_spans(10, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert window_spans(9, 4, 2) == [(0, 4), (2, 6), (4, 8), (6, 9)]
    assert window_spans(3, 4, 2) == [(0.0, 3.0)]
    fc = FeatureConfig()
    audio = get_featurizer("audio", fc)
    data = _wav(10.0)
    segs = audio.decode_windows(data, ".wav", window_s=4, hop_s=2)
    assert [(s, e) for s, e, _ in segs] == [(0, 4), (2, 6), (4, 8), (6, 10)]
    x, sr = sf.read(io.BytesIO(data), dtype="float32")
    np.testing.assert_array_equal(segs[1][2], audio.from_array(x[2 * sr : 6 * sr], sample_rate=sr))
    sig = get_featurizer("signal", fc)
    rec = np.random.default_rng(0).normal(size=(3, 1000))
    segs = sig.decode_windows(rec, window_s=3.0, hop_s=3.0, rate_hz=100)
    assert [(s, e) for s, e, _ in segs] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    np.testing.assert_allclose(segs[2][2], sig.from_array(rec[:, 600:900]), rtol=1e-6)
    # Not windowed: one segment without times.
    img = get_featurizer("image", fc)
    raw, suffix = img.example(np.random.default_rng(0))
    ((s, e, _),) = img.decode_windows(raw, suffix, window_s=1, hop_s=1)
    assert s is None and e is None


def test_embed_windows_long_audio_and_signal(embedded, tmp_path):
    from jobs.embedding.run import run_embed

    corpus = tmp_path / "long"
    corpus.mkdir()
    (corpus / "a.wav").write_bytes(_wav(5.0))
    (corpus / "b.wav").write_bytes(_wav(1.5))
    np.save(corpus / "s.npy", np.random.default_rng(1).normal(size=(3, 700)).astype(np.float32))
    (corpus / "bad.wav").write_bytes(_wav(1.0)[:9000])  # cut: the header promises more
    rows = [
        {"id": "a", "audio": "a.wav", "signal": "s.npy"},
        {"id": "b", "audio": "b.wav"},
        {"id": "c", "audio": "bad.wav"},
        {"id": "a", "audio": "b.wav"},
        {"audio": "b.wav"},
    ]
    (corpus / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EmbedConfig(
        modalities=["audio", "signal"],
        windows={"audio": WindowConfig(2.0, 1.0), "signal": WindowConfig(3.0, rate_hz=100)},
        rows_per_part=3,
        actors=1,
        cpus_per_actor=0.5,
    )
    out = tmp_path / "emb"
    stats = run_embed(embedded["export"], out, manifest=str(corpus / "m.jsonl"), config=cfg)
    assert stats["accounting"]["ok"] and stats["rows_read"] == 5
    assert stats["rows_embedded"] == 2 and stats["rows_dropped"] == 3
    assert stats["quarantined"]["by_reason"] == {
        "truncated": 1, "no_valid_modality": 1, "duplicate_id": 1, "missing_id": 1
    }  # fmt: skip
    t = _records(out).to_pylist()
    segs = {(r["id"], r["modality"]): [] for r in t}
    for r in t:
        segs[(r["id"], r["modality"])].append((r["segment"], r["start_s"], r["end_s"]))
    # 5 s, window 2 s, hop 1 s: 4 windows; 1.5 s: one; 700 steps at 100 Hz, 3 s windows: 3.
    assert segs[("a", "audio")] == [(0, 0.0, 2.0), (1, 1.0, 3.0), (2, 2.0, 4.0), (3, 3.0, 5.0)]
    assert segs[("b", "audio")] == [(0, 0.0, 1.5)]
    assert segs[("a", "signal")] == [(0, 0.0, 3.0), (1, 3.0, 6.0), (2, 6.0, 7.0)]
    assert stats["segments"] == {"audio": 5, "signal": 3}
    assert stats["fused_rows"] == 1  # row a: audio + signal, fused from the whole items


# -- the service on an embedding directory -------------------------------------------------
def test_service_refuses_bad_galleries(embedded, tiny_corpus, tmp_path):
    from jobs.embedding.output import EmbeddingDirError
    from serve.app import build_app

    base = {"export_dir": str(embedded["export"]), "modalities": ["text", "image"]}
    with pytest.raises(EmbeddingDirError, match="not found"):
        build_app({**base, "gallery": {"embeddings_dir": str(tmp_path / "missing")}})
    with pytest.raises(EmbeddingDirError, match="not an embedding directory"):
        build_app({**base, "gallery": {"embeddings_dir": str(tmp_path)}})
    other = _export(tmp_path / "other", Path(tiny_corpus), seed=2)
    with pytest.raises(EmbeddingDirError, match="revision"):
        build_app({"export_dir": str(other), "gallery": {"embeddings_dir": str(embedded["out"])}})
    bad = tmp_path / "dim"
    shutil.copytree(embedded["out"], bad)
    meta = json.loads((bad / "embed.json").read_text())
    (bad / "embed.json").write_text(json.dumps({**meta, "embed_dim": meta["embed_dim"] + 1}))
    with pytest.raises(EmbeddingDirError, match="dim"):
        build_app({**base, "gallery": {"embeddings_dir": str(bad)}})
    with pytest.raises(ValueError, match="not both"):
        build_app({**base, "gallery": {"embeddings_dir": str(bad), "split_dir": str(bad)}})


def test_service_searches_an_embedding_directory(embedded, tiny_corpus):
    import base64

    import httpx
    from ray import serve

    from serve.app import build_app

    out = embedded["out"]
    t = _records(out).to_pylist()
    vec = {(r["id"], r["modality"], r["segment"]): np.asarray(r["embedding"]) for r in t}
    images = [(k[0], v) for k, v in vec.items() if k[1] == "image"]
    mat = np.stack([v for _, v in images])
    sims = mat @ mat.T - 2 * np.eye(len(images))
    # A known item without a (planted) near-duplicate, so rank 1 is unambiguous.
    pick = next(i for i in range(len(images)) if sims[i].max() < 0.999)
    rid = images[pick][0]
    manifest = {
        json.loads(x)["id"]: json.loads(x)
        for x in (Path(tiny_corpus) / "manifest.jsonl").read_text().splitlines()
        if x
    }
    img = base64.b64encode((Path(tiny_corpus) / manifest[rid]["image"]).read_bytes()).decode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = {
        "export_dir": str(embedded["export"]),
        "model_name": "omniray-tiny",
        "modalities": ["image", "text"],
        "gallery": {"embeddings_dir": str(out)},
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(args), name="embed_gallery", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            r = c.post("/v1/search", json={"query": {"image": img}, "target": "image", "k": 3})
            assert r.status_code == 200, r.text
            res = r.json()["results"]
            assert res[0]["id"] == rid and res[0]["score"] > 0.999
            assert res[0]["modality"] == "image" and res[0]["segment"] == 0
            assert res[0]["start_s"] is None
            r = c.post("/v1/search", json={"query": {"image": img}, "target": "any", "k": 5})
            assert r.status_code == 200, r.text
            res = r.json()["results"]
            assert res[0]["id"] == rid and [x["rank"] for x in res] == [1, 2, 3, 4, 5]
            assert {x["modality"] for x in res} <= set(
                json.loads((out / "embed.json").read_text())["modalities"]
            )
            # /v1/embeddings and jobs.embed agree on the same row.
            e = c.post("/v1/embeddings", json={"input": [{"image": img}]}).json()
            v = np.asarray(e["data"][0]["embedding"])
            cos = (
                float(v @ vec[(rid, "image", 0)])
                / np.linalg.norm(v)
                / np.linalg.norm(vec[(rid, "image", 0)])
            )
            assert cos >= 0.999
            h = c.get("/healthz").json()
            assert h["gallery"]["image"] == len(images)
            bad = c.post("/v1/search", json={"query": {"image": img}, "target": "nope", "k": 3})
            assert bad.status_code == 422 and "any" in bad.json()["error"]["message"]
    finally:
        try:
            serve.delete("embed_gallery")
        finally:
            serve.shutdown()


def test_parts_are_fixed_row_ranges_of_every_manifest_format(tmp_path):
    import pyarrow as pa

    from jobs.embedding.parts import plan_manifest, read_part

    rows = [{"id": f"r{i:03d}", "text": f"row {i}", "label": str(i % 3)} for i in range(23)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "m.csv").write_text(
        "id,text,label\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n" for r in rows)
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet", row_group_size=10)
    for name, col in (("m.jsonl", "text"), ("m.csv", "id")):
        parts = plan_manifest(str(tmp_path / name), 10)
        assert len(parts) == 3
        got = [read_part(p.to_row()).column(col).to_pylist() for p in parts]
        assert [len(g) for g in got] == [10, 10, 3]
        if col == "id":
            assert sum(got, []) == [r["id"] for r in rows]  # leading zeros kept: strings
        else:
            assert [json.loads(x)["id"] for x in sum(got, [])] == [r["id"] for r in rows]
    parts = plan_manifest(str(tmp_path / "m.parquet"), 10)
    assert [read_part(p.to_row()).num_rows for p in parts] == [10, 10, 3]


def test_embed_prepared_split_and_refuse_foreign_one(embedded, tiny_corpus, tmp_path):
    from jobs.embedding.run import run_embed
    from pipelines.stages import ManifestError
    from serve.devtools import featurize_manifest_rows, write_gallery_split

    export = embedded["export"]
    rows = featurize_manifest_rows(Path(tiny_corpus) / "manifest.jsonl", export, max_rows=12)
    shards = tmp_path / "shards"
    split = write_gallery_split(rows, shards / "test")
    shutil.copy(export / "data_config.yaml", shards / "data_config.yaml")
    shutil.copytree(export / "tokenizer", shards / "tokenizer")
    cfg = EmbedConfig(actors=1, cpus_per_actor=0.5, modalities=["text", "image"])
    stats = run_embed(export, tmp_path / "emb", data=str(split), config=cfg)
    with_any = [r for r in rows if "text" in r or "image" in r]
    assert stats["accounting"]["ok"] and stats["rows_read"] == len(rows)
    assert stats["rows_embedded"] == len(with_any)
    assert stats["items"] == {m: sum(m in r for r in rows) for m in ("text", "image")}
    # A split featurized with another tokenizer would embed to garbage: refused.
    (shards / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(ManifestError, match="tokenizer"):
        run_embed(export, tmp_path / "emb2", data=str(split), config=cfg)
