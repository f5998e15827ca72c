"""Tests of the OmniDigits demo corpus builder (``jobs.demo.corpus``).

No Ray: the builder uses a process pool. Files are decoded with the same libraries the
pipeline uses (PIL, soundfile, decord, open3d, numpy).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs.demo.corpus import (
    DIGIT_NAMES,
    FILE_MODALITIES,
    MODALITIES,
    CorpusError,
    build_corpus,
    file_digest,
)
from jobs.demo.corpus.plan import _make_writer, _plan_rows
from jobs.demo.corpus.render_signal import _trajectory

REPO = Path(__file__).resolve().parents[1]


def _read_manifest(root: Path) -> list[dict]:
    with open(root / "manifest.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _info(root: Path) -> dict:
    return json.loads((root / "corpus_info.json").read_text())


def _load(root: Path, modality: str, rel: str) -> dict:
    """Decodes one file the way the pipeline would and returns facts to check.

    Raises on undecodable files; the caller checks emptiness / finiteness.
    """
    path = root / rel
    if modality == "image":
        from PIL import Image

        with Image.open(path) as im:
            im.load()  # PIL parses lazily: force the full decode
            arr = np.asarray(im.convert("RGB"))
        return {"array": arr, "finite": True, "size": arr.shape[0] * arr.shape[1]}
    if modality == "audio":
        import soundfile as sf

        x, rate = sf.read(path, dtype="float32")
        return {"array": x, "rate": rate, "finite": bool(np.isfinite(x).all()), "size": len(x)}
    if modality == "video":
        import decord

        vr = decord.VideoReader(str(path))
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()  # (F, H, W, 3)
        return {"array": frames, "finite": True, "size": len(frames)}
    if modality == "pointcloud":
        import open3d as o3d

        p = np.asarray(o3d.io.read_point_cloud(str(path)).points)  # (N, 3)
        return {"array": p, "finite": bool(np.isfinite(p).all()), "size": len(p)}
    if modality == "signal":
        if path.suffix == ".csv":
            header = path.read_text().splitlines()[0]
            assert header == "x,y,pen"
            x = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32).T  # (3, L)
        else:
            x = np.load(path, allow_pickle=False)
        return {"array": x, "finite": bool(np.isfinite(x).all()), "size": x.size}
    raise AssertionError(modality)


def _decodes(root: Path, modality: str, rel: str) -> bool:
    try:
        facts = _load(root, modality, rel)
    except Exception:
        return False
    return facts["size"] > 0 and facts["finite"]


@pytest.fixture(scope="module")
def messy_corpus(tmp_path_factory) -> Path:
    """A small corpus with many corrupt files and duplicates, to exercise every kind."""
    out = tmp_path_factory.mktemp("omnidigits_messy")
    build_corpus(out, n=40, seed=7, workers=2, corrupt_frac=0.1, dup_frac=0.1)
    return out


def test_manifest_follows_contract_1(tiny_corpus: Path) -> None:
    root = Path(tiny_corpus).resolve()
    rows = _read_manifest(root)
    assert len(rows) == 60
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids)
    allowed = {"id", "label", "group", *MODALITIES}
    for r in rows:
        assert set(r) <= allowed, r
        assert r["label"] in {str(d) for d in range(10)}
        assert r["group"].startswith("writer-")
        present = [m for m in MODALITIES if m in r]
        assert present, f"row {r['id']} has no modality"
        if "text" in r:
            assert isinstance(r["text"], str) and r["text"].strip()
        for m in FILE_MODALITIES:
            if m in r:
                rel = Path(r[m])
                assert not rel.is_absolute()
                resolved = (root / rel).resolve()
                assert resolved.is_relative_to(root)
                assert resolved.is_file()
    for m in MODALITIES:
        assert any(m in r for r in rows), f"no row has {m}"
    # Several writers, each owning rows of more than one digit.
    groups = {r["group"] for r in rows}
    assert len(groups) >= 3

    info = _info(root)
    assert info["rows"] == 60
    assert info["params"]["seed"] == 0
    for m in MODALITIES:
        assert info["counts"][m] == sum(m in r for r in rows)
    assert sum(info["labels"].values()) == 60
    assert info["build_seconds"] > 0


@pytest.mark.parametrize("fixture", ["tiny_corpus", "messy_corpus"])
def test_every_file_decodes_unless_listed_corrupt(fixture: str, request) -> None:
    root = Path(request.getfixturevalue(fixture))
    rows = _read_manifest(root)
    corrupt = {(c["id"], c["modality"]) for c in _info(root)["corrupt"]}
    checked = dict.fromkeys(FILE_MODALITIES, 0)
    for r in rows:
        for m in FILE_MODALITIES:
            if m not in r:
                continue
            ok = _decodes(root, m, r[m])
            if (r["id"], m) in corrupt:
                assert not ok, f"{r[m]} is listed corrupt but decodes cleanly"
                continue
            assert ok, f"{r[m]} ({r['id']}) does not decode"
            checked[m] += 1
    assert all(v > 0 for v in checked.values()), checked


def test_decoded_content_has_expected_shapes(tiny_corpus: Path) -> None:
    root = Path(tiny_corpus)
    rows = _read_manifest(root)
    corrupt = {(c["id"], c["modality"]) for c in _info(root)["corrupt"]}
    ambiguous = {(a["id"], a["modality"]) for a in _info(root)["ambiguous"]}
    rates, channels, exts = set(), set(), set()
    for r in rows:
        for m in FILE_MODALITIES:
            if m not in r or (r["id"], m) in corrupt | ambiguous:
                continue
            exts.add(Path(r[m]).suffix)
            a = _load(root, m, r[m])["array"]
            if m == "image":
                assert a.shape[0] == a.shape[1] and 32 <= a.shape[0] <= 64
                # dark ink on light paper: some pixels much darker than the background
                assert a.max() - a.min() > 100
            elif m == "audio":
                f = _load(root, m, r[m])
                rates.add(f["rate"])
                channels.add(1 if a.ndim == 1 else a.shape[1])
                assert 0.2 < len(a) / f["rate"] < 3.0  # a spoken word
                assert np.abs(a).max() > 0.05  # not silence
            elif m == "video":
                assert a.shape[1:] == (64, 64, 3) and 12 <= a.shape[0] <= 20
                assert a.std() > 5  # something is drawn
            elif m == "pointcloud":
                assert a.ndim == 2 and a.shape[1] == 3 and 1024 <= len(a) <= 2048
            else:
                assert a.dtype == np.float32 and a.shape[0] == 3
                assert 100 <= a.shape[1] <= 300
                assert set(np.unique(a[2])) <= {0.0, 1.0} and a[2].sum() > 50
    assert rates <= {16000, 22050} and len(rates) == 2
    assert channels <= {1, 2}
    assert {".png", ".wav", ".mp4", ".ply", ".npy"} <= exts


def test_corrupt_files_and_duplicates_are_listed_and_real(messy_corpus: Path) -> None:
    root = messy_corpus
    info = _info(root)
    rows = {r["id"]: r for r in _read_manifest(root)}
    corrupt = info["corrupt"]
    # ~10% of ~190 files, of several modalities and kinds
    assert len(corrupt) >= 10
    assert len({c["modality"] for c in corrupt}) >= 4
    assert len({c["kind"] for c in corrupt}) >= 4
    for c in corrupt:
        assert rows[c["id"]][c["modality"]] == c["path"]
        if c["kind"] == "empty":
            assert (root / c["path"]).stat().st_size == 0
    assert sorted(info["corrupt_ids"]) == sorted({c["id"] for c in corrupt})

    dups = info["duplicates"]
    assert len(dups) == 4 and {d["kind"] for d in dups} <= {"exact", "near"}
    for d in dups:
        a, b = rows[d["id"]], rows[d["duplicate_of"]]
        assert a["id"] != b["id"] and a["label"] == b["label"] and a["group"] == b["group"]
        assert {m for m in MODALITIES if m in a} == {m for m in MODALITIES if m in b}
        for m in ("audio", "video", "pointcloud", "signal"):
            if m in a:  # never the same path, always the same bytes
                assert a[m] != b[m]
                assert (root / a[m]).read_bytes() == (root / b[m]).read_bytes()
        if d["kind"] == "exact":
            assert a.get("text") == b.get("text")
            if "image" in a:
                assert (root / a["image"]).read_bytes() == (root / b["image"]).read_bytes()
        else:
            if "text" in a:
                assert a["text"] != b["text"]
                assert a["text"].strip(" .!").lower() == b["text"].strip(" .!").lower()
            if "image" in a:
                ia = _load(root, "image", a["image"])["array"].astype(np.float32)
                ib = _load(root, "image", b["image"])["array"].astype(np.float32)
                assert ia.shape == ib.shape and 0 < np.abs(ia - ib).mean() < 40


def test_corrupt_signal_never_needs_pickle(messy_corpus: Path) -> None:
    # A "pickle" corruption is an object array: loading it safely must fail.
    pickled = [c for c in _info(messy_corpus)["corrupt"] if c["kind"] == "pickle"]
    for c in pickled:
        assert c["path"].endswith(".npy")
        with pytest.raises(ValueError, match="allow_pickle"):
            np.load(messy_corpus / c["path"], allow_pickle=False)


def test_same_seed_is_byte_identical_and_independent_of_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import jobs.demo.corpus.build as dc

    # Small corpora render in-process; force the process pool (and >1 chunk) for "a".
    monkeypatch.setattr(dc, "_MIN_ROWS_FOR_POOL", 0)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    kw = {"n": 90, "corrupt_frac": 0.05, "dup_frac": 0.1}
    build_corpus(a, seed=1, workers=2, **kw)
    assert _info(a)["params"]["processes"] == 2
    build_corpus(b, seed=1, workers=1, **kw)
    build_corpus(c, seed=2, workers=1, **kw)
    da, db, dc_ = file_digest(a), file_digest(b), file_digest(c)
    assert "manifest.jsonl" in da and sum(k.endswith(".mp4") for k in da) > 30
    assert da == db
    assert (a / "manifest.jsonl").read_bytes() != (c / "manifest.jsonl").read_bytes()
    assert da != dc_


def test_ambiguous_instances_change_only_themselves(tmp_path: Path) -> None:
    """hard_frac renders some instances ambiguous (vague caption, occluded scan, noisy
    speech, blurred clip, partial scan, interrupted trace); every other file and caption
    is byte-identical to the corpus built without them."""
    kw = {"n": 30, "seed": 3, "workers": 1, "corrupt_frac": 0.0, "dup_frac": 0.0}
    clear, hard = tmp_path / "clear", tmp_path / "hard"
    build_corpus(clear, hard_frac=0.0, **kw)
    build_corpus(hard, hard_frac=0.4, **kw)
    info = _info(hard)
    amb = {(a["id"], a["modality"]) for a in info["ambiguous"]}
    assert _info(clear)["ambiguous"] == []
    assert {m for _, m in amb} == set(MODALITIES)  # every modality has some
    rows_c = {r["id"]: r for r in _read_manifest(clear)}
    rows_h = {r["id"]: r for r in _read_manifest(hard)}
    assert rows_c.keys() == rows_h.keys()
    digits = {w for names in DIGIT_NAMES.values() for w in names} | set("0123456789")
    for i, rh in rows_h.items():
        rc = rows_c[i]
        assert {k for k in rc if k != "text"} == {k for k in rh if k != "text"}
        if "text" in rh:
            if (i, "text") in amb:  # a caption that never names the digit
                assert not set(rh["text"].lower().replace(",", " ").split()) & digits
            else:
                assert rh["text"] == rc["text"]
        for m in FILE_MODALITIES:
            if m not in rh:
                continue
            same = (hard / rh[m]).read_bytes() == (clear / rc[m]).read_bytes()
            assert same != ((i, m) in amb), (i, m)
            if (i, m) not in amb:
                continue
            a, c = _load(hard, m, rh[m])["array"], _load(clear, m, rc[m])["array"]
            if m == "pointcloud":  # a partial scan: about a third of the points
                assert 0.2 * len(c) <= len(a) <= 0.45 * len(c)
            elif m == "signal":  # an interrupted trace
                assert a.shape[0] == 3 and 0.15 * c.shape[1] <= a.shape[1] <= 0.4 * c.shape[1]
            elif m == "image":  # occluded: a large part of the scan is plain paper
                assert a.shape == c.shape and (a != c).mean() > 0.2
            else:  # audio / video: same length, heavily changed content
                assert a.shape == c.shape
                diff = np.abs(a.astype(np.float32) - c.astype(np.float32)).mean()
                assert diff > 0.5 * np.abs(c.astype(np.float32) - c.mean()).mean(), (i, m)


def test_plan_uses_distinct_source_images_and_keeps_a_modality() -> None:
    rows = _plan_rows(300, 0, modality_drop=0.9, corrupt_frac=0.0, dup_frac=0.0)
    full = _plan_rows(600, 0, modality_drop=0.0, corrupt_frac=0.0, dup_frac=0.0)
    # under ~180 images per digit, every row showing an image draws its own handwritten one
    for plan in (rows, full):
        srcs = [r.image_src for r in plan if "image" in r.formats]
        assert len(srcs) > 10 and len(set(srcs)) == len(srcs)
    assert len([r for r in full if "image" in r.formats]) == 600
    for r in rows:
        assert r.text is not None or r.formats or r.tabular
    assert all(r.text and set(r.formats) == set(FILE_MODALITIES) for r in full)
    # a writer is one voice and one group
    voices: dict[str, str] = {}
    for r in rows:
        assert voices.setdefault(r.group, r.writer.voice) == r.writer.voice


def test_pen_trajectories_identify_their_digit() -> None:
    """A nearest-template classifier on trajectories generalizes across unseen writers."""

    def feat(t: np.ndarray) -> np.ndarray:
        # resample the pen-down path to 64 points: (128,)
        xy = t[t[:, 2] > 0.5, :2]
        idx = np.linspace(0, len(xy) - 1, 64)
        return np.stack([np.interp(idx, np.arange(len(xy)), xy[:, i]) for i in range(2)], 1)

    train_w = [_make_writer(0, w) for w in range(8)]
    test_w = [_make_writer(0, w) for w in range(100, 110)]
    templates = np.stack(
        [
            np.mean([feat(_trajectory(d, w, np.random.default_rng(w.wid))) for w in train_w], 0)
            for d in range(10)
        ]
    )  # (10, 64, 2)
    correct = 0
    for w in test_w:
        for d in range(10):
            t = _trajectory(d, w, np.random.default_rng(1000 + w.wid))
            assert 100 <= len(t) <= 300
            dist = np.linalg.norm((templates - feat(t)[None]).reshape(10, -1), axis=1)
            correct += int(np.argmin(dist) == d)
    assert correct / (10 * len(test_w)) >= 0.9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n": 0}, "n must be a positive integer"),
        ({"n": 5, "workers": 0}, "workers"),
        ({"n": 5, "modality_drop": 1.0}, "modality_drop"),
        ({"n": 5, "corrupt_frac": -0.1}, "corrupt_frac"),
        ({"n": 5, "dup_frac": "x"}, "dup_frac"),
        ({"n": 5, "hard_frac": 0.9}, "hard_frac"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path: Path, kwargs: dict, match: str) -> None:
    kw = {"seed": 0, **kwargs}
    with pytest.raises(CorpusError, match=match):
        build_corpus(tmp_path / "c", **kw)
    assert not (tmp_path / "c").exists()  # nothing written for bad arguments


def test_existing_corpus_is_kept_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "c"
    build_corpus(out, n=3, seed=0, workers=1)
    before = file_digest(out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CorpusError, match="overwrite"):
        build_corpus(out, n=3, seed=5, workers=1)
    after = file_digest(out)
    assert after.pop("notes.txt") and after == before  # the old corpus is untouched
    build_corpus(out, n=3, seed=5, workers=1, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # only the build's own files replaced
    assert file_digest(out)["manifest.jsonl"] != before["manifest.jsonl"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.demo.corpus", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_help_and_bad_args(tmp_path: Path) -> None:
    h = _cli("--help")
    assert h.returncode == 0
    assert "--modality-drop" in h.stdout and "--corrupt-frac" in h.stdout
    bad = _cli("--out", str(tmp_path / "x"), "--n", "zero")
    assert bad.returncode == 2 and "invalid int value" in bad.stderr
    bad = _cli("--out", str(tmp_path / "x"), "--n", "-3")
    assert bad.returncode == 2 and "n must be a positive integer" in bad.stderr
    missing = _cli("--n", "3")
    assert missing.returncode == 2 and "--out" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_cli_builds_a_corpus(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = _cli("--out", str(out), "--n", "4", "--seed", "3", "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout
    assert len(_read_manifest(out)) == 4
    assert _info(out)["params"]["workers"] == 2
