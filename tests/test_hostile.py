"""Hostile inputs against the featurizers, ``prepare`` and the running service.

Classes of attack (inputs generated in :mod:`hostile_cases`, nothing large stored): lying
headers in every container format read (MP4, AVI, MKV, PLY, PCD, OFF, PTS, WAV), allocation
bombs, resource-cost bombs, slow clients, encoding attacks, numeric overflows. Each asserts
that the job finishes with its good rows, that the process tree (Ray workers and replicas
included) stays under a memory bound, that the service answers 4xx in the OpenAI shape, that
no replica restarted, and that a normal request succeeds right after.

The service tests deploy the app of ``tests/test_serve.py`` (its module-scoped ``env``
fixture, imported here).
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time

import numpy as np
import pytest
from hostile_cases import (
    PeakMemory,
    attacks,
    ffmpeg_clip,
    have_ffmpeg,
    mp4_lying_stts,
    ply_bomb,
)
from test_serve import API_KEY, APP, _assert_error, env  # noqa: F401 - the serve fixture

from pipelines.featurize import SampleError, get_featurizer
from pipelines.featurize.sandbox import run_isolated

GiB = 2**30
ATTACKS = attacks()


# -- featurizers: header claims refused before any decoder allocates --------------------
@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_lying_headers_refused_or_decoded_at_bounded_cost(attack):
    import psutil

    f = get_featurizer(attack.modality)
    before = psutil.Process().memory_info().rss
    if attack.reasons:
        with pytest.raises(SampleError) as e:
            f.from_bytes(attack.data, attack.suffix)
        assert e.value.reason in attack.reasons, (e.value.reason, e.value.detail)
    else:  # a valid file at an awkward size or rate: accepted
        out = f.from_bytes(attack.data, attack.suffix)
        assert out.shape == f.max_output_shape() or out.shape[1:] == f.max_output_shape()[1:]
    assert psutil.Process().memory_info().rss - before < 300 * 2**20


@pytest.mark.skipif(not have_ffmpeg(), reason="needs the ffmpeg CLI")
def test_decoder_abort_costs_only_the_sandbox(monkeypatch):
    """With the header check out of the way, decord aborts on the lying clip (a C++
    std::bad_alloc): the child dies, this process gets ``decoder_crashed`` and goes on."""
    from pipelines.featurize.video import ContainerClaims, VideoFeaturizer

    f = get_featurizer("video")
    monkeypatch.setattr(VideoFeaturizer, "check_header", lambda self, d, s=None: ContainerClaims())
    with pytest.raises(SampleError) as e:
        f.from_bytes(mp4_lying_stts(), ".mp4")
    assert e.value.reason == "decoder_crashed", e.value.detail
    assert f.from_bytes(ffmpeg_clip(), ".mp4").shape == f.output_shape()


def test_sandbox_limits_memory_and_time():
    def hog() -> dict[str, np.ndarray]:
        return {"x": np.ones(2 * GiB // 8)}  # 2 GiB

    with pytest.raises(SampleError) as e:
        run_isolated(hog, memory_mb=256, timeout_s=30)
    assert e.value.reason == "too_large" and "MiB" in e.value.detail

    def slow() -> dict[str, np.ndarray]:
        time.sleep(30)
        return {}

    t0 = time.monotonic()
    with pytest.raises(SampleError) as e:
        run_isolated(slow, memory_mb=256, timeout_s=0.5)
    assert e.value.reason == "too_large" and "time limit" in e.value.detail
    assert time.monotonic() - t0 < 20  # killed, not waited for
    out = run_isolated(lambda: {"y": np.arange(5)}, memory_mb=256, timeout_s=30)
    assert out["y"].tolist() == [0, 1, 2, 3, 4]


def _pid() -> dict[str, np.ndarray]:
    import os

    return {"pid": np.array(os.getpid())}


def test_sandbox_child_is_reused_and_replaced_after_a_death():
    """One decode server per process and memory budget serves call after call; a job that
    kills it, exceeds its memory or its time gets its error, and the next job runs in a
    fresh child (a fork per call cost 5-25x a small clip's decode)."""
    import os
    import signal

    from pipelines.featurize.sandbox import server_pid

    first = int(run_isolated(_pid, memory_mb=300, timeout_s=30)["pid"])
    assert first != os.getpid() and server_pid(300) == first
    assert int(run_isolated(_pid, memory_mb=300, timeout_s=30)["pid"]) == first

    def abort() -> dict[str, np.ndarray]:
        os.kill(os.getpid(), signal.SIGABRT)
        return {}

    with pytest.raises(SampleError) as e:
        run_isolated(abort, memory_mb=300, timeout_s=30)
    assert e.value.reason == "decoder_crashed" and "SIGABRT" in e.value.detail
    second = int(run_isolated(_pid, memory_mb=300, timeout_s=30)["pid"])
    assert second != first

    def hog() -> dict[str, np.ndarray]:
        return {"x": np.ones(2 * GiB // 8)}

    with pytest.raises(SampleError) as e:
        run_isolated(hog, memory_mb=300, timeout_s=30)
    assert e.value.reason == "too_large"
    # Within budget after a refused hog: the budget is per job, not used up.
    big = run_isolated(lambda: {"x": np.ones(40 * 2**20 // 8)}, memory_mb=300, timeout_s=30)
    assert big["x"].shape == (40 * 2**20 // 8,)

    with pytest.raises(SampleError) as e:
        run_isolated(lambda: time.sleep(30) or {}, memory_mb=300, timeout_s=0.5)
    assert e.value.reason == "too_large" and "time limit" in e.value.detail
    third = int(run_isolated(_pid, memory_mb=300, timeout_s=30)["pid"])
    assert third not in (first, second)
    # A job that cannot be pickled still runs isolated, in a child of its own.
    import threading

    lock = threading.Lock()
    own = run_isolated(
        lambda: {"pid": np.array(os.getpid() + 0 * lock.locked())}, memory_mb=300, timeout_s=30
    )
    assert int(own["pid"]) not in (os.getpid(), third) and server_pid(300) == third


def test_resampling_cost_bounded_for_any_rate():
    from pipelines.featurize.audio import MAX_RESAMPLE_FACTOR, _polyphase_filter, resample_factors

    for rate in (383_987, 16_001, 1_009, 96_001, 44_100, 48_000, 8_000):
        up, down = resample_factors(rate, 16_000)
        assert max(up, down) <= MAX_RESAMPLE_FACTOR
        assert abs(up / down - 16_000 / rate) / (16_000 / rate) < 1e-3
    assert resample_factors(44_100, 16_000) == (160, 441)  # common rates stay exact
    info = _polyphase_filter.cache_info()
    assert info.maxsize is not None and info.currsize <= info.maxsize
    # A one-hour clip costs what its kept centre window costs.
    f = get_featurizer("audio")
    start, stop, _ = f._window(3600 * 383_987, 383_987)
    assert stop - start < 10 * 383_987


# -- prepare: a hostile corpus finishes, good rows kept, bounded memory ----------------------
def _manifest_lines(good: dict[str, dict], attack_rows: list[dict]) -> list[bytes]:
    lines = [json.dumps(r).encode() for r in good.values()]
    lines.append(b'{"id": "enc-latin1", "text": "caf\xe9"}')  # not UTF-8
    lines.append(b'{"id": "enc-surrogate", "text": "lone \\ud800 half"}')
    lines.append(b'{"id": "num-huge", "label": ' + b"9" * 5000 + b"}")
    lines.append(b"")  # blank lines are skipped, not rows
    lines += [json.dumps(r).encode() for r in attack_rows]
    lines.append(json.dumps({"id": "uri-http", "image": "http://127.0.0.1:9/a.png"}).encode())
    lines.append(json.dumps({"id": "uri-s3", "image": "s3://bucket/a.png"}).encode())
    return lines


def test_prepare_hostile_corpus_finishes_with_good_rows(ray_local, tmp_path):
    from pipelines.config import load_data_config
    from pipelines.prepare import run_prepare

    root = tmp_path / "corpus"
    (root / "files").mkdir(parents=True)
    rng = np.random.default_rng(0)
    good: dict[str, dict] = {}
    for i in range(6):
        row = {"id": f"good-{i}", "text": f"a good caption number {i}", "label": str(i % 2)}
        for m in ("image", "audio", "pointcloud") + (("video",) if have_ffmpeg() else ()):
            data, suffix = get_featurizer(m).example(rng, i)
            if suffix is None:
                continue
            (root / "files" / f"{m}{i}{suffix}").write_bytes(data)
            row[m] = f"files/{m}{i}{suffix}"
        good[row["id"]] = row
    attack_rows = []
    for a in ATTACKS:
        (root / "files" / f"{a.name}{a.suffix}").write_bytes(a.data)
        attack_rows.append(
            {"id": f"atk-{a.name}", "text": "carrier", a.modality: f"files/{a.name}{a.suffix}"}
        )
    lines = _manifest_lines(good, attack_rows)
    (root / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    cfg = load_data_config(None, ["execution.progress_bars=false"])
    with PeakMemory() as mem:
        stats = run_prepare(root / "manifest.jsonl", out, cfg, verbose=False)
    assert stats["accounting"]["ok"]
    quarantine = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    by_id: dict[str | None, list[dict]] = {}
    for q in quarantine:
        by_id.setdefault(q["id"], []).append(q)
    # Every good row is written whole.
    assert not set(good) & set(by_id), [by_id[k] for k in set(good) & set(by_id)]
    import pyarrow.parquet as pq

    written = {}
    for split in ("train", "val", "test"):
        for p in (out / split).glob("*.parquet"):
            t = pq.read_table(p, columns=["id", "modalities"])
            written.update(
                zip(t.column("id").to_pylist(), t.column("modalities").to_pylist(), strict=True)
            )
    for rid, row in good.items():
        assert set(written[rid]) == set(row) - {"id", "label"}, (rid, written[rid])
    # Each attack lost only its hostile modality, with a fitting reason.
    for a in ATTACKS:
        rid = f"atk-{a.name}"
        if not a.reasons:
            assert rid not in by_id and a.modality in written[rid]
            continue
        (q,) = by_id[rid]
        assert q["modality"] == a.modality and q["reason"] in a.reasons, q
        assert written[rid] == ["text"]
    # Undecodable and unparsable lines: parse_error with their line number.
    parse = {q["line"]: q for q in quarantine if q["reason"] == "parse_error"}
    n = len(good)
    assert set(parse) == {n + 1, n + 2, n + 3}, parse
    assert "not UTF-8" in parse[n + 1]["detail"] and "surrogate" in parse[n + 2]["detail"]
    # Remote URLs: a fitting reason, and nothing fetched.
    for rid in ("uri-http", "uri-s3"):
        (q,) = [q for q in by_id[rid] if q["modality"] == "image"]
        assert q["reason"] == "unsupported_uri", q
    assert stats["rows_read"] == n + 3 + len(ATTACKS) + 2
    # No decoder allocated for what a header claimed (before: 18.8 GB for one PLY).
    assert mem.peak_process < 3 * GiB, (mem.peak_process, mem.peak_name)
    assert mem.growth < 4 * GiB, mem.growth


# -- the service ---------------------------------------------------------------------------
def _replicas() -> dict[str, int]:
    """Deployment -> pid of its (single) replica, asked through its handle."""
    from ray import serve

    names = [f"{m}_encoder" for m in ("text", "image", "audio", "video", "pointcloud", "signal")]
    return {n: serve.get_deployment_handle(n, APP).info.remote().result()["pid"] for n in names}


def _router_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("router", APP).stats.remote().result()


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _raw_post(url: str, path: str, body: bytes, extra_headers: bytes = b"") -> tuple[int, bytes]:
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Authorization: Bearer " + API_KEY.encode() + b"\r\n" + extra_headers
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )  # fmt: skip
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def test_service_hostile_inputs_answer_4xx_without_restarts(env):  # noqa: F811
    pids = _replicas()
    E = "/v1/embeddings"
    # (name, path, body, accepted statuses, accepted error codes or None)
    cases: list[tuple[str, str, dict | bytes, set[int], set[str] | None]] = []
    for a in ATTACKS:
        if a.reasons:  # too_large -> 413, the other reasons -> 400
            body = {"input": [{a.modality: _b64(a.data)}]}
            cases.append((a.name, E, body, {400, 413}, set(a.reasons)))
    # The PLY with a comment before its count, at a size the tiny limits allow (20k points).
    cases.append(("ply_comment_1e8", E, {"input": [{"pointcloud": _b64(ply_bomb(10**8))}]},
                  {413}, {"too_large"}))  # fmt: skip
    many_keys = b"{" + b",".join(b'"k%d":0' % i for i in range(150_000)) + b', "input": "x"}'
    big_int = b"1" + b"0" * 300
    cases += [
        # resource-cost bombs in the body
        ("1e5 unknown keys", E, many_keys, {422}, {"invalid_field"}),
        ("1e5 int labels", "/v1/classify",
         {"input": {"text": "a"}, "labels": list(range(100_000))}, {413}, {"too_many_items"}),
        ("wide input dict", "/v1/fuse", {"input": {f"m{i}": 1 for i in range(50_000)}}, {422},
         {"invalid_field"}),
        # numeric overflows
        ("5000-digit int", E, b'{"input": "x", "dimensions": ' + b"9" * 5000 + b"}", {400},
         {"invalid_json"}),
        ("huge k", "/v1/search", {"query": {"text": "a"}, "target": "image", "k": 10**300},
         {413}, {"too_large"}),
        ("300-digit int point", E, b'{"input": [{"pointcloud": [[' + big_int + b", 0, 0]]}]}",
         {400}, {"non_finite"}),
        ("1e400 in a signal", E, b'{"input": [{"signal": [[1e400, 0, 0, 0]]}]}', {400},
         {"non_finite"}),
        ("huge int in tabular", E, b'{"input": [{"tabular": {"a": ' + big_int + b"}}]}",
         {400}, None),
        # encoding attacks: lone surrogates (echoed before: a plain-text 500)
        ("surrogate key", E, b'{"input": [{"\\ud800": "x"}]}', {400}, {"invalid_json"}),
        ("surrogate label", "/v1/classify",
         b'{"input": {"text": "a"}, "labels": ["ok", "\\udfff"]}', {400}, {"invalid_json"}),
        ("surrogate model", E, b'{"input": "x", "model": "\\udbff"}', {400}, {"invalid_json"}),
        ("control chars unknown key", E, {"input": "x", "\x1b[31m\u2028": 1}, {422},
         {"invalid_field"}),
        ("non-ascii base64", E, {"input": [{"image": "\u00e9" * 12}]}, {400},
         {"invalid_base64"}),
    ]  # fmt: skip
    with PeakMemory() as mem, env.client() as c:
        for name, path, body, statuses, codes in cases:
            t0 = time.perf_counter()
            if isinstance(body, bytes):
                r = c.post(path, content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(path, json=body)
            assert r.status_code < 500, (name, r.status_code, r.text[:300])
            assert r.headers["content-type"].startswith("application/json"), name
            try:
                assert r.status_code in statuses, (r.status_code, r.text[:300])
                _assert_error(r, r.status_code)
            except AssertionError as e:
                raise AssertionError(f"case {name!r}: {e}") from e
            if codes:
                assert r.json()["error"]["code"] in codes, (name, r.json())
            r.content.decode("ascii")  # every answer is ASCII JSON
            assert time.perf_counter() - t0 < 60, name
        # Undecodable header bytes: shielded in front of Ray Serve's proxy (400, JSON).
        status, payload = _raw_post(env.url, E, b'{"input": "x"}', b"X-Evil: caf\xe9\xff\r\n")
        assert status == 400, (status, payload[:200])
        assert json.loads(payload)["error"]["code"] == "bad_header"
    assert mem.peak_process < 3 * GiB, (mem.peak_process, mem.peak_name)
    # No replica died or restarted, none was retried, and plain requests still work.
    assert _replicas() == pids
    stats = _router_stats()
    assert stats["replica_deaths"] == 0 and stats["replica_retries"] == 0, stats
    with env.client() as c:
        ok = c.post("/v1/embeddings", json={"input": ["still fine", {"audio": env.b64(
            env.row_with("audio")["id"], "audio")}]})  # fmt: skip
        assert ok.status_code == 200, ok.text
        lab = c.post("/v1/classify", json={"input": {"text": "a"}, "labels": ["x", "é ☃"]})
        assert lab.status_code == 200 and {s["label"] for s in lab.json()["scores"]} == {
            "x",
            "é ☃",
        }


def test_slow_clients_hold_no_slot_and_are_dropped(env):  # noqa: F811
    """Clients that send headers and a few body bytes, then nothing: a plain request is
    still answered (before: 503, they held every in-flight slot), and each slow sender
    gets 408 once ``body_timeout_s`` passed."""
    host, port = env.url.split("//")[1].split(":")
    n_slow = 3 * env.args["limits"]["max_inflight"]
    slow = []
    for _ in range(n_slow):
        s = socket.create_connection((host, int(port)), timeout=60)
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
            + b"Content-Length: 1000\r\n\r\n" + b'{"input": "'
        )  # fmt: skip
        slow.append(s)
    try:
        time.sleep(1.0)  # let every slow request reach the router

        async def plain() -> list[int]:
            import httpx

            async with httpx.AsyncClient(
                base_url=env.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
            ) as c:
                rs = await asyncio.gather(
                    *[c.post("/v1/embeddings", json={"input": f"plain {i}"}) for i in range(4)]
                )
            return [r.status_code for r in rs]

        assert asyncio.run(plain()) == [200] * 4
        assert _router_stats()["receiving"] >= 1
        for s in slow:
            head = s.recv(4096)
            assert head.split()[1] == b"408", head[:200]
            assert b'"body_timeout"' in head or b"body_timeout" in s.recv(4096)
    finally:
        for s in slow:
            s.close()
    assert _router_stats()["slow_dropped"] >= n_slow
    with env.client() as c:
        assert c.post("/v1/embeddings", json={"input": "after"}).status_code == 200
