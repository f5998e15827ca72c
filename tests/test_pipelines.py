"""The prepare pipeline: unit tests of its pieces and end-to-end runs on Ray Data."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image, ImageEnhance

from common.config import ConfigError
from common.modalities import MODALITIES
from pipelines.config import DataConfig, load_data_config
from pipelines.dedupe import find_duplicates, image_phash, text_minhash
from pipelines.featurize import SampleError
from pipelines.paths import PathResolver
from pipelines.plan import split_groups
from pipelines.prepare import run_prepare
from pipelines.schema import SPLITS, shard_schema, unpack_table
from pipelines.stages import ManifestError

ROOT = Path(__file__).resolve().parents[1]


def _quiet_config(**overrides) -> DataConfig:
    cfg = load_data_config(
        None, ["execution.progress_bars=false"] + [f"{k}={v}" for k, v in overrides.items()]
    )
    return cfg


# ----------------------------------------------------------------------- unit tests


def test_all_data_configs_load():
    files = sorted((ROOT / "configs" / "data").glob("*.yaml"))
    assert files, "no data configs"
    for f in files:
        cfg = load_data_config(f)
        assert isinstance(cfg, DataConfig)
    with pytest.raises(ConfigError, match="unknown key"):
        load_data_config(files[0], ["features.image.sise=3"])
    with pytest.raises(ConfigError, match="sum to 1"):
        load_data_config(None, ["split.train=0.9"])
    with pytest.raises(ConfigError, match="split.val must be >= 0"):
        load_data_config(None, ["split.val=-0.1", "split.train=1.0"])


def test_path_resolver_refuses_outside_root(tmp_path):
    root = tmp_path / "corpus"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(b"x")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    os.symlink(secret, root / "img" / "link.png")
    r = PathResolver(str(root))
    assert r.read("img/a.png", 100) == b"x"
    assert r.read("img/../img/a.png", 100) == b"x"
    for bad in ["../secret.txt", "img/../../secret.txt", str(secret), "img/link.png",
                f"file://{secret}", "/etc/passwd"]:  # fmt: skip
        with pytest.raises(SampleError) as e:
            r.read(bad, 100)
        assert e.value.reason == "outside_root", bad
    with pytest.raises(SampleError) as e:
        r.read("img/missing.png", 100)
    assert e.value.reason == "not_found"
    assert PathResolver(str(root), [str(tmp_path)]).read(str(secret), 100) == b"do not read"


def test_find_duplicates_deterministic_smallest_id_survives():
    ids = ["c", "a", "b", "d"]
    exact = ["h1", "h1", "h2", "h1"]
    dups = find_duplicates(ids, exact=exact)
    assert {ids[k]: (ids[v[0]], v[1]) for k, v in dups.items()} == {
        "c": ("a", "exact"),
        "d": ("a", "exact"),
    }
    # Order of the input does not matter.
    perm = [3, 2, 1, 0]
    dups2 = find_duplicates([ids[i] for i in perm], exact=[exact[i] for i in perm])
    assert {[ids[i] for i in perm][k] for k in dups2} == {"c", "d"}


def test_phash_and_minhash_near_duplicates():
    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((32, 32))
    near = ImageEnhance.Brightness(base).enhance(1.08)
    other = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((32, 32))
    ph = [image_phash(np.asarray(im.convert("RGB"))) for im in (base, near, other)]
    dups = find_duplicates(["a", "b", "c"], phash=ph, hamming=4)
    assert dups == {1: (0, "near")}
    texts = [
        "The quick brown fox jumps over the lazy dog near the river bank",
        "the quick brown fox jumps over the lazy dog near the river bank!",
        "A completely different sentence about handwritten digits and audio",
    ]
    mh = [text_minhash(t) for t in texts]
    assert find_duplicates(["x", "y", "z"], minhash=mh, jaccard=0.8) == {1: (0, "near")}


def test_phash_bits_equal_the_median_reference():
    # image_phash thresholds at np.partition's middle element; the reference below is the
    # former np.median formula: the same 64 bits on photos-like, flat and tiny images.
    import scipy.fft

    def reference(a):
        if a.shape[:2] != (32, 32):
            grey = Image.fromarray(a, "RGB").convert("L")
            img = np.asarray(grey.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
        else:
            img = a.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        low = scipy.fft.dctn(img, type=2, norm="ortho")[:8, :8].ravel()
        bits = low > np.median(low[1:])
        return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])

    rng = np.random.default_rng(1)
    images = [(rng.random((224, 224, 3)) * 255).astype(np.uint8) for _ in range(30)]
    smooth = Image.fromarray(images[0]).resize((8, 8)).resize((224, 224), Image.BICUBIC)
    images += [np.asarray(smooth), np.full((224, 224, 3), 7, np.uint8)]
    images += [(rng.random((32, 32, 3)) * 255).astype(np.uint8) for _ in range(5)]
    assert [image_phash(a) for a in images] == [reference(a) for a in images]


def test_head_modalities_and_warm_decoder_only_warm_what_the_manifest_uses(tmp_path, monkeypatch):
    from common.config import to_dict
    from pipelines import stages
    from pipelines.manifest import head_modalities

    mods = stages.pipeline_modalities()
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "image": "a.png", "text": ""}\nnot json\n{"id": "b", "text": "hi"}\n')
    assert head_modalities(str(m), mods) == [x for x in mods if x in ("image", "text")]
    (tmp_path / "m.csv").write_text("id,audio,label\nx,x.wav,1\n")
    assert head_modalities(str(tmp_path / "m.csv"), mods) == ["audio"]
    assert head_modalities(str(tmp_path / "missing.jsonl"), mods) is None
    warmed = []
    for name, cls in stages.FEATURIZERS.items():
        monkeypatch.setattr(cls, "warm_up", lambda self, n=name: warmed.append(n))
    args = {"config": to_dict(_quiet_config()), "root": str(tmp_path), "jsonl": True}
    stages.warm_decoder(**args, source="w1", modalities=["image"])
    assert warmed == ["image"]
    warmed.clear()
    stages.warm_decoder(**args, source="w2")  # None: every featurizer
    assert sorted(warmed) == sorted(mods)


def test_decode_block_equals_the_batches_it_is_made_of(tmp_path):
    # Stage 1's plain task decodes a whole read block in batch_size slices: the same rows
    # as decode_batch on each slice (what Ray Data's map_batches ran before), in order.
    from common.config import to_dict
    from pipelines import stages

    img = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(img, "PNG")
    (tmp_path / "a.png").write_bytes(img.getvalue())
    lines = [json.dumps({"id": f"r{i}", "image": "a.png", "text": f"t {i}"}) for i in range(7)]
    lines += ["not json", json.dumps({"id": "m", "image": "missing.png"})]
    block = pa.table({"text": lines, "line": list(range(1, len(lines) + 1))})
    args = {"config": to_dict(_quiet_config()), "root": str(tmp_path), "jsonl": True, "source": "s"}
    whole = stages.decode_block(block, 4, **args)
    parts = [stages.decode_batch(block.slice(i, 4), **args) for i in range(0, block.num_rows, 4)]
    assert whole.equals(pa.concat_tables(parts)) and whole.num_rows == 9
    empty = stages.decode_block(block.slice(0, 0), 4, **args)
    assert empty.num_rows == 0 and empty.schema == whole.schema


def test_split_groups_deterministic_and_nonempty():
    cfg = DataConfig()
    groups = {f"g{i}": 10 for i in range(20)}
    a = split_groups(groups, cfg)
    assert a == split_groups(dict(reversed(list(groups.items()))), cfg)
    counts = {s: sum(1 for v in a.values() if v == s) for s in SPLITS}
    assert counts == {"train": 16, "val": 2, "test": 2}
    assert set(split_groups({"a": 5, "b": 5, "c": 5}, cfg).values()) == set(SPLITS)


def test_cli_rejects_bad_config(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "--manifest", "m.jsonl", "--out", str(tmp_path),
         "features.nope=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "unknown key" in r.stderr


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_estimate_rows(tmp_path, fmt):
    from pipelines.manifest import estimate_rows

    rows = [{"id": f"r{i:05d}", "text": "x" * (i % 50), "label": str(i % 10)} for i in range(3000)]
    path = _write_manifest(tmp_path, rows, fmt)
    est = estimate_rows(str(path))
    if fmt == "parquet":
        assert est == 3000  # from the footers
    else:
        # A 64 KiB head of a ~0.2 MB file: close, never off by a factor.
        assert 0.8 * 3000 <= est <= 1.25 * 3000, est
    small = _write_manifest(tmp_path, rows[:5], fmt, name="small")
    assert estimate_rows(str(small)) in (5, 6)  # exact up to a CSV header line
    assert estimate_rows(f"file://{small}") == estimate_rows(str(small))
    assert estimate_rows(str(tmp_path / "missing.jsonl")) is None


def test_read_yields_blocks_of_rows_per_block(ray_local, tmp_path):
    # The read task itself splits the manifest into ~rows_per_block-row blocks, so no
    # repartition step runs between the read and the decode tasks.
    from pipelines.manifest import estimate_rows, read_manifest

    rows = [{"id": f"r{i:04d}", "text": "t"} for i in range(100)]
    path = _write_manifest(tmp_path, rows, "jsonl")
    n = -(-estimate_rows(str(path)) // 16)
    ds, jsonl = read_manifest(str(path), _quiet_config(), n)
    sizes = [b.num_rows for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    assert jsonl and sum(sizes) == 100 and len(sizes) == n == 7
    assert max(sizes) - min(sizes) <= 1


def test_warm_decoder_fills_the_decode_cache(tmp_path):
    # The warm-up task leaves behind the decoder the first decode task of the same run
    # uses (same cache key), with every featurizer's lazy libraries loaded.
    import sys

    from common.config import to_dict
    from pipelines import stages

    args = {
        "config": to_dict(_quiet_config()),
        "root": str(tmp_path),
        "jsonl": True,
        "source": str(tmp_path / "m.jsonl"),
    }
    stages.warm_decoder(**args)
    dec = stages._decoder(**args)
    assert "open3d" in sys.modules and "decord" in sys.modules
    batch = pa.table({"text": [json.dumps({"id": "a", "text": "hello"})]})
    out = stages.decode_batch(batch, **args)
    assert stages._decoder(**args) is dec and out.column("id").to_pylist() == ["a"]
    other = dict(args, source=str(tmp_path / "other.jsonl"))
    assert stages._decoder(**other) is not dec  # another run never reuses it


# ------------------------------------- samples, not captions; ids; splits (no Ray)


def _plan(rows: list[dict], root: Path, cfg: DataConfig):
    """Stage 1 in-process on JSONL ``rows`` (in manifest order), then the driver's plan."""
    from common.config import to_dict
    from pipelines.plan import plan_rows
    from pipelines.stages import DecodeRows, key_columns

    lines = pa.table({"text": [json.dumps(r) for r in rows]})
    t = DecodeRows(to_dict(cfg), str(root), True, "m.jsonl")(lines)
    keys = {c: t.column(c).to_pylist() for c in key_columns()}
    return plan_rows(keys, cfg)


def _reasons(quarantine: list[dict]) -> dict:
    return {(q["id"], q["modality"]): q["reason"] for q in quarantine}


def test_repeated_captions_kept_media_duplicates_dropped(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(_digit_image(1)))
    (tmp_path / "b.png").write_bytes(_png(_digit_image(1)))  # the same picture
    (tmp_path / "c.png").write_bytes(_png(_digit_image(2)))
    cap = "a photo of the digit one, written with a blue pen"
    rows = [
        {"id": "r1", "image": "a.png", "text": cap, "label": "1"},
        {"id": "r2", "image": "b.png", "text": cap, "label": "1"},  # a whole duplicated row
        {"id": "r3", "image": "c.png", "text": cap, "label": "1"},  # same caption, new medium
        {"id": "r4", "text": cap.upper() + "!", "label": "1"},  # near-equal caption alone
        {"id": "r5", "image": "b.png", "text": "another caption", "label": "1"},
    ]
    plan, quarantine, info = _plan(rows, tmp_path, _quiet_config())
    got = _reasons(quarantine)
    assert got == {
        ("r2", "image"): "duplicate_of:r1",
        ("r2", "text"): "duplicate_of:r1",  # the whole row was a copy
        ("r2", None): "no_valid_modality",
        ("r5", "image"): "duplicate_of:r1",  # a new caption of duplicated content stays
    }
    assert plan["kept"] == 4 and info["duplicates"]["text/row"] == 1
    # Caption dedupe is an opt-in filter.
    plan, quarantine, _ = _plan(rows, tmp_path, _quiet_config(**{"dedupe.captions": "true"}))
    got = _reasons(quarantine)
    assert got[("r3", "text")] == got[("r4", "text")] == "duplicate_of:r1"
    # Which modalities are captions is a featurizer property (inline by default).
    from pipelines.dedupe import exact_modalities, near_modalities
    from pipelines.featurize import FEATURIZERS

    caps = {m for m in FEATURIZERS if FEATURIZERS[m].is_caption()}
    assert caps == {m for m in FEATURIZERS if MODALITIES[m].inline} and caps
    assert not caps & set(exact_modalities(DataConfig().dedupe))
    assert not caps & set(near_modalities(DataConfig().dedupe))
    with pytest.raises(ValueError, match="dedupe.captions=true"):
        exact_modalities(_quiet_config(**{"dedupe.exact": f"[{sorted(caps)[0]}]"}).dedupe)


def test_repeated_id_keeps_its_first_row_and_bad_split_is_quarantined(tmp_path):
    rows = [
        {"id": "x", "text": "the first row with id x"},
        {"id": "y", "text": "a row with a bad split", "split": "validation"},
        {"id": "x", "text": "the second row with id x"},
        {"id": "y", "text": "the good row with id y", "split": "TEST"},
        {"id": "x", "text": "the third row with id x"},
    ]
    plan, quarantine, info = _plan(rows, tmp_path, _quiet_config())
    recs = sorted((q["reason"], q["detail"]) for q in quarantine)
    assert [r for r, _ in recs] == ["bad_split", "duplicate_id", "duplicate_id"]
    assert "'validation' is not one of train, val, test" in recs[0][1]
    assert "row 1 (kept)" in recs[1][1] and plan["drop_index"] == [2, 4]
    assert plan["kept"] == 2 and plan["split_rows"].get("test") == 1
    assert info["rows_dropped"] == 3 and "x" not in plan["drop_rows"]


def test_splits_fixed_stratified_and_loud(tmp_path):
    labels = ["cat", "dog", "owl", "fox"]
    rows = [
        {"id": f"{lab}-{i:02d}", "text": f"{lab} {i}", "label": lab}
        for lab in labels
        for i in range(10)
    ]
    rows += [{"id": f"fixed-{i}", "text": f"x {i}", "label": "cat", "split": "test"}
             for i in range(3)]  # fmt: skip
    cfg = _quiet_config()
    plan, _, info = _plan(rows, tmp_path, cfg)
    for s in SPLITS:  # every class in every split
        assert set(info["labels"][s]) == set(labels), (s, info["labels"][s])
    assert all(g in info["groups"]["test"] for g in ("fixed-0", "fixed-1", "fixed-2"))
    assert info["warnings"] == []
    # Deterministic by salt: the same plan in another row order, another with another salt.
    plan2, _, _ = _plan(rows[::-1], tmp_path, cfg)
    assert plan2["group_split"] == plan["group_split"]
    plan3, _, _ = _plan(rows, tmp_path, _quiet_config(**{"split.salt": "other"}))
    assert plan3["group_split"] != plan["group_split"]
    # Two groups: one trains, one tests, and the empty val split is reported.
    two = [{"id": f"r{i}", "text": f"t {i}", "group": f"g{i % 2}"} for i in range(20)]
    plan, _, info = _plan(two, tmp_path, cfg)
    assert plan["split_rows"] == {"train": 10, "test": 10}
    assert any(w.startswith("val split is empty") for w in info["warnings"])
    # Unstratified: a class may miss a split, and that is reported.
    few = [{"id": f"r{i}", "text": f"t {i}", "label": "ab"[i % 2], "group": f"g{i}"}
           for i in range(6)]  # fmt: skip
    few[-1]["split"] = few[-2]["split"] = "test"
    _, _, info = _plan(few, tmp_path, _quiet_config(**{"split.stratify": "false"}))
    assert any("split lacks" in w or "never sees" in w for w in info["warnings"])


def test_split_ratio_error_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_data_config(ROOT / "configs/data/omnidigits.yaml", ["split.train=0.9"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "split.train + split.val + split.test must sum to 1" in msg and "= 1.1" in msg
    # The README's example is valid.
    lines = (ROOT / "README.md").read_text().splitlines()
    i = next(i for i, x in enumerate(lines) if "jobs.prepare --manifest my/" in x)
    command = [lines[i]]
    while command[-1].endswith("\\"):
        i += 1
        command.append(lines[i])
    overrides = [w for w in " ".join(command).split() if "=" in w and not w.startswith("-")]
    assert any(o.startswith("split.") for o in overrides)
    load_data_config(ROOT / "configs/data/omnidigits.yaml", overrides)


def test_text_control_characters_stripped_and_counted():
    from pipelines.featurize import get_featurizer

    f = get_featurizer("text")
    assert f.decode_noted("a cat\x00\x00 on a mat") == (
        "a cat on a mat",
        {"control_chars": 1, "control_chars_removed": 2},
    )
    text, notes = f.decode_noted("\x1b[31mred\x1b[0m alert")
    assert text == "red alert" and notes["control_chars_removed"] == 9
    assert f.decode_noted("plain\ttext") == ("plain text", {})
    with pytest.raises(SampleError) as e:
        f.decode("\x00\x01\x02\x03ab")
    assert e.value.reason == "control_chars" and "max_control_fraction" in e.value.detail


# -------------------------------------------------------------- the hostile corpus


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def _png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def _wav(x: np.ndarray, rate: int = 16000) -> bytes:
    b = io.BytesIO()
    sf.write(b, x, rate, format="WAV", subtype="PCM_16")
    return b.getvalue()


def _npy(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    b = io.BytesIO()
    np.save(b, a, allow_pickle=allow_pickle)
    return b.getvalue()


def _ply(points: np.ndarray) -> bytes:
    head = (
        f"ply\nformat ascii 1.0\nelement vertex {len(points)}\n"
        "property float x\nproperty float y\nproperty float z\nend_header\n"
    )
    return (head + "\n".join(" ".join(str(v) for v in p) for p in points) + "\n").encode()


class _Payload:
    """Pickling this runs a shell command: the pipeline must never unpickle it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _digit_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize(
        (48, 48), Image.Resampling.NEAREST
    )


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A small corpus with one of every failure, plus good rows; returns (root, rows, expected)."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "corpus"
    for d in ("images", "audio", "video", "points", "signals", "texts"):
        (root / d).mkdir(parents=True)
    (base / "outside.png").write_bytes(_png(_digit_image(99)))
    marker = base / "pwned"
    rng = np.random.default_rng(0)
    tone = (0.2 * np.sin(np.arange(16000) * 0.05)).astype(np.float32)
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=10",
         "-frames:v", "12", "-pix_fmt", "yuv420p", str(root / "video" / "good.mp4")],
        check=True,
    )  # fmt: skip
    files = {
        "images/good1.png": _png(_digit_image(1)),
        "images/good2.png": _png(_digit_image(2)),
        "images/exact_dup.png": _png(_digit_image(1)),
        "images/near_dup.png": _png(ImageEnhance.Brightness(_digit_image(2)).enhance(1.07)),
        "images/truncated.png": _png(_digit_image(3))[:300],
        "images/bomb.png": b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", 60_000, 60_000, 8, 2, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
        + _chunk(b"IEND", b""),
        "audio/good.wav": _wav(tone),
        "audio/zero.wav": b"",
        "video/garbage.mp4": rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "points/good.ply": _ply(rng.standard_normal((400, 3))),
        "points/nan.ply": _ply(np.where(rng.random((400, 1)) < 0.05, np.nan, rng.random((400, 3)))),
        "signals/good.npy": _npy(rng.standard_normal((3, 200)).astype(np.float32)),
        "signals/evil.npy": _npy(np.array([_Payload(str(marker))], dtype=object), True),
        "signals/good.csv": ("x,y,pen\n" + "\n".join(f"{i},{i * i},1" for i in range(60))).encode(),
        "texts/good.txt": b"a handwritten seven\n",
        "texts/bad_utf8.txt": b"caf\xe9 \xff\xfe broken",
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    rows = [
        {"id": "h-001", "text": "the digit one", "image": "images/good1.png",
         "audio": "audio/good.wav", "video": "video/good.mp4", "pointcloud": "points/good.ply",
         "signal": "signals/good.npy", "label": "1", "group": "w1"},
        {"id": "h-002", "text": "texts/good.txt", "image": "images/good2.png",
         "signal": "signals/good.csv", "label": "2", "group": "w2", "split": "val"},
        {"id": "h-003", "text": "a brand new caption", "image": "images/exact_dup.png",
         "label": "1", "group": "w3"},
        {"id": "h-004", "image": "images/near_dup.png", "audio": "audio/zero.wav",
         "label": "2", "group": "w4"},
        {"id": "h-005", "text": "still fine", "image": "images/truncated.png", "group": "w5"},
        {"id": "h-006", "image": "images/bomb.png", "text": "bomb caption", "group": "w6"},
        {"id": "h-007", "video": "video/garbage.mp4", "pointcloud": "points/nan.ply",
         "signal": "signals/evil.npy", "group": "w7"},
        {"id": "h-008", "image": "../outside.png", "text": "escape attempt", "group": "w8"},
        {"id": "h-009", "text": "\x00\x01\x02\x03\x04\x1b[31m\x07", "group": "w9"},
        {"id": "h-010", "text": "texts/bad_utf8.txt", "image": "images/good1.png", "group": "w10"},
        {"id": "h-011", "text": "The quick brown fox jumps over the lazy dog by the river",
         "group": "w11"},
        {"id": "h-012", "text": "the quick brown fox jumps over the lazy dog by the river!",
         "group": "w12"},
        {"text": "a row without id", "image": "images/good2.png", "group": "w13"},
        {"id": "h-dup", "text": "first of two rows with one id", "group": "w14"},
        {"id": "h-dup", "text": "second of two rows with one id", "group": "w14"},
        {"id": "h-016", "label": "5", "group": "w15"},
        {"id": "h-017", "text": "clean\ttabs and\x07 a bell", "pointcloud": "points/good.ply",
         "group": "w16"},
    ]  # fmt: skip
    expected = {
        # (id, modality) -> reason
        ("h-003", "image"): "duplicate_of:h-001",
        ("h-004", "image"): "duplicate_of:h-002",
        ("h-004", "audio"): "empty",
        ("h-005", "image"): "truncated",
        ("h-006", "image"): "too_large",
        ("h-007", "video"): "decode_error",
        ("h-007", "pointcloud"): "non_finite",
        ("h-007", "signal"): "bad_dtype",
        ("h-008", "image"): "outside_root",
        ("h-009", "text"): "control_chars",
        ("h-010", "text"): "decode_error",
        ("h-010", "image"): "duplicate_of:h-001",
        ("h-017", "pointcloud"): "duplicate_of:h-001",
        (None, None): "missing_id",
        ("h-dup", None): "duplicate_id",
        ("h-004", None): "no_valid_modality",
        ("h-007", None): "no_valid_modality",
        ("h-009", None): "no_valid_modality",
        ("h-010", None): "no_valid_modality",
        ("h-016", None): "no_valid_modality",
    }
    return root, rows, expected, marker


def _write_manifest(root: Path, rows: list[dict], fmt: str, name: str = "manifest") -> Path:
    path = root / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        cols = ["id", "text", "image", "audio", "video", "pointcloud", "signal", "label", "group"]
        cols += sorted({k for r in rows for k in r} - set(cols))
        table = pa.table({c: pa.array([r.get(c) for r in rows], type=pa.string()) for c in cols})
        if fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, path)
        else:
            pq.write_table(table, path)
    return path


def _read_split_tables(out: Path) -> dict[str, pa.Table]:
    tables = {}
    for s in SPLITS:
        files = sorted(glob.glob(str(out / s / "*.parquet")))
        tables[s] = (
            pa.concat_tables([pq.read_table(f) for f in files])
            if files
            else shard_schema().empty_table()
        )
    return tables


def _check_accounting(out: Path, n_rows: int) -> tuple[dict, list[dict]]:
    stats = json.loads((out / "stats.json").read_text())
    quarantine = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    tables = _read_split_tables(out)
    written = sum(t.num_rows for t in tables.values())
    dropped_rows = sum(1 for q in quarantine if q["modality"] is None)
    assert stats["rows_read"] == n_rows
    assert written == stats["rows_written"]["total"]
    assert written + dropped_rows == n_rows
    assert stats["accounting"]["ok"]
    return stats, quarantine


def test_hostile_corpus_quarantined_with_reasons(ray_local, hostile, tmp_path):
    root, rows, expected, marker = hostile
    bad_line = '{"id": "h-bad", "text": "unterminated'
    manifest = root / "hostile.jsonl"
    manifest.write_text(
        "\n".join(json.dumps(r) for r in rows[:5]) + "\n" + bad_line + "\n"
        + "\n".join(json.dumps(r) for r in rows[5:]) + "\n"
    )  # fmt: skip
    out = tmp_path / "out"
    stats = run_prepare(manifest, out, _quiet_config(), verbose=False)
    stats2, quarantine = _check_accounting(out, len(rows) + 1)
    assert stats2["rows_read"] == stats["rows_read"]
    got = {}
    for q in quarantine:
        got.setdefault((q["id"], q["modality"]), q["reason"])
    for key, reason in expected.items():
        assert got.get(key) == reason, (key, got.get(key), reason)
    parse = [q for q in quarantine if q["reason"] == "parse_error"]
    assert len(parse) == 1 and "unterminated" in parse[0]["detail"]
    # A repeated id keeps its first row; the second is quarantined.
    dup_id = [q for q in quarantine if q["reason"] == "duplicate_id"]
    assert len(dup_id) == 1 and "kept" in dup_id[0]["detail"]
    assert not marker.exists(), "an object .npy was unpickled"
    # Outside-root paths are recorded, never read.
    assert any(q["path"] == "../outside.png" for q in quarantine)

    tables = _read_split_tables(out)
    kept = {}
    for s, t in tables.items():
        for r_id, mods in zip(t.column("id").to_pylist(), t.column("modalities").to_pylist(),
                              strict=True):  # fmt: skip
            kept[r_id] = (s, mods)
    # Rows keep what survived; failed modalities are null.
    assert kept["h-005"][1] == ["text"]
    assert kept["h-006"][1] == ["text"]
    assert kept["h-008"][1] == ["text"]
    assert kept["h-003"][1] == ["text"]
    assert kept["h-017"][1] == ["text"]
    assert set(kept["h-001"][1]) == {k for k in rows[0] if k in MODALITIES}
    assert kept["h-002"] == ("val", ["text", "image", "signal"])  # its split column
    # Captions are not deduplicated on their own (dedupe.captions is off): a near-equal
    # caption of another sample stays.
    assert kept["h-012"][1] == ["text"] and kept["h-dup"][1] == ["text"]
    assert {"h-004", "h-007", "h-009", "h-010", "h-016"}.isdisjoint(kept)
    assert stats["rows_written"]["total"] == len(kept) == 10
    # h-017's bell was stripped and counted; h-009 (mostly control characters) refused.
    assert stats["cleaned"]["control_chars"] == 1
    assert stats["cleaned"]["by_modality"] == {"text": {"control_chars": 1,
                                                        "control_chars_removed": 1}}  # fmt: skip
    # Text cleaning reached the tokens: control characters gone, tabs became spaces.
    from pipelines.featurize import get_featurizer

    text = get_featurizer("text", tokenizer_dir=out / "tokenizer")
    split, _ = kept["h-017"]
    t = tables[split]
    row = t.filter(pa.compute.equal(t.column("id"), "h-017"))
    ids = unpack_table(row, ["text"])["text"][0]
    assert text.detokenize(ids) == "clean tabs and a bell"
    split, _ = kept["h-dup"]
    t = tables[split]
    row = t.filter(pa.compute.equal(t.column("id"), "h-dup"))
    assert text.detokenize(unpack_table(row, ["text"])["text"][0]) == (
        "first of two rows with one id"
    )


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_formats_agree(ray_local, hostile, tmp_path, fmt):
    root, rows, _, _ = hostile
    rows = [r for r in rows if r.get("id") != "h-dup"]  # keep the comparison simple
    outs = {}
    for f in ("jsonl", fmt):
        manifest = _write_manifest(root, rows, f, name=f"m_{fmt}_{f}")
        outs[f] = tmp_path / f
        run_prepare(manifest, outs[f], _quiet_config(), verbose=False)
        _check_accounting(outs[f], len(rows))
    a, b = _read_split_tables(outs["jsonl"]), _read_split_tables(outs[fmt])
    for s in SPLITS:
        assert a[s].equals(b[s]), s
    qa = (outs["jsonl"] / "quarantine.jsonl").read_text()
    qb = (outs[fmt] / "quarantine.jsonl").read_text()
    assert qa == qb


def test_unknown_columns_error_or_warn(ray_local, hostile, tmp_path):
    root, rows, _, _ = hostile
    extra = [dict(r, license="cc-by") for r in rows[:3]]
    manifest = _write_manifest(root, extra, "parquet", name="unknown_cols")
    with pytest.raises(ManifestError, match="unknown column"):
        run_prepare(manifest, tmp_path / "e", _quiet_config(), verbose=False)
    jl = _write_manifest(root, extra, "jsonl", name="unknown_cols")
    stats = run_prepare(jl, tmp_path / "w", _quiet_config(unknown_columns="warn"), verbose=False)
    assert stats["ignored_columns"] == ["license"]
    with pytest.raises(ManifestError, match="not found"):
        run_prepare(root / "nope.jsonl", tmp_path / "x", _quiet_config(), verbose=False)
    broken = root / "broken.csv"
    broken.write_text("id,text\nh-1,fine\nh-2,too,many,fields\n")
    with pytest.raises(ManifestError, match="broken.csv"):
        run_prepare(broken, tmp_path / "b", _quiet_config(), verbose=False)
    with pytest.raises(ManifestError, match="unknown manifest format"):
        run_prepare(Path(__file__), tmp_path / "f", _quiet_config(), verbose=False)


# ------------------------------------------------------------- the demo corpus


@pytest.mark.slow
def test_tiny_corpus_end_to_end_deterministic(ray_local, tiny_corpus, tmp_path):
    manifest = Path(tiny_corpus) / "manifest.jsonl"
    cfg = load_data_config(ROOT / "configs/data/omnidigits.yaml", ["execution.progress_bars=false"])
    n_rows = sum(1 for line in manifest.read_text().splitlines() if line.strip())
    out1, out2 = tmp_path / "run1", tmp_path / "run2"
    stats = run_prepare(manifest, out1, cfg, verbose=False)
    _check_accounting(out1, n_rows)
    run_prepare(manifest, out2, cfg, verbose=False)

    # Determinism: byte-identical shards, quarantine and tokenizer.
    files1 = sorted(p.relative_to(out1) for p in out1.rglob("*.parquet"))
    files2 = sorted(p.relative_to(out2) for p in out2.rglob("*.parquet"))
    assert files1 == files2 and files1
    for f in files1:
        assert (out1 / f).read_bytes() == (out2 / f).read_bytes(), f
    for f in ("quarantine.jsonl", "tokenizer/tokenizer.json", "data_config.yaml"):
        assert (out1 / f).read_bytes() == (out2 / f).read_bytes(), f

    # Schema and shapes per modality; splits disjoint by group.
    import ray.data

    from pipelines.config import load_feature_config
    from pipelines.featurize import get_featurizer

    fc = load_feature_config(out1 / "data_config.yaml")
    feats = {m: get_featurizer(m, fc) for m in MODALITIES}
    tables = _read_split_tables(out1)
    groups = {}
    for s, t in tables.items():
        assert t.schema.equals(shard_schema(), check_metadata=False)
        ids = t.column("id").to_pylist()
        assert ids == sorted(ids) or len(stats["splits"][s]["files"]) > 1
        cols = unpack_table(t)
        groups[s] = set(cols["group"])
        for i, mods in enumerate(cols["modalities"]):
            assert mods, "a written row without modalities"
            for m in MODALITIES:
                arr = cols[m][i]
                assert (arr is not None) == (m in mods)
                if arr is None:
                    continue
                # The featurizer's declared shapes (None: a variable, bounded axis).
                f = feats[m]
                assert arr.dtype == f.dtype and arr.ndim == len(f.output_shape())
                for got, want, most in zip(
                    arr.shape, f.output_shape(), f.max_output_shape(), strict=True
                ):
                    assert (got == want) if want is not None else 1 <= got <= most, (m, arr.shape)
                assert np.isfinite(arr.astype(np.float64)).all()
    assert groups["train"] and groups["val"] and groups["test"]
    assert not (groups["train"] & groups["val"] or groups["train"] & groups["test"])
    assert not groups["val"] & groups["test"]
    # Ray Data reads the shards too.
    ds = ray.data.read_parquet(str(out1 / "train"))
    assert ds.count() == stats["rows_written"]["train"]

    # Many small blocks and shards: the block -> shard exchange puts every row in its
    # split, each shard sorted, the same rows as with one shard per split.
    out3 = tmp_path / "run3"
    small = load_data_config(
        ROOT / "configs/data/omnidigits.yaml",
        ["execution.progress_bars=false", "execution.rows_per_block=8", "rows_per_shard=7"],
    )
    stats3 = run_prepare(manifest, out3, small, verbose=False)
    _check_accounting(out3, n_rows)
    assert len(stats3["splits"]["train"]["files"]) >= 3
    for s, t in _read_split_tables(out3).items():
        files = sorted((out3 / s).glob("*.parquet"))
        # Rows go to shards by a hash of their id: ceil(rows / 7) shards, none empty.
        assert len(files) == len(stats3["splits"][s]["files"]) <= -(-t.num_rows // 7)
        for f in files:
            ids = pq.read_table(f).column("id").to_pylist()
            assert ids == sorted(ids) and ids
        assert sorted(t.column("id").to_pylist()) == sorted(tables[s].column("id").to_pylist())

    # Stats: pairs per combination, consistent with the rows.
    pairs = stats["pairs"]
    text_image = sum(
        1
        for t in tables.values()
        for mods in t.column("modalities").to_pylist()
        if "text" in mods and "image" in mods
    )
    assert pairs["text-image"]["total"] == text_image
    info = json.loads((Path(tiny_corpus) / "corpus_info.json").read_text())
    quarantine = [json.loads(x) for x in (out1 / "quarantine.jsonl").read_text().splitlines()]
    flagged = {(q["id"], q["modality"]) for q in quarantine}
    for c in info.get("corrupt", []):
        assert (c["id"], c["modality"]) in flagged, c
    for d in info.get("duplicates", []):
        assert any(q["id"] == d["id"] and q["reason"].startswith("duplicate_of:")
                   for q in quarantine), d  # fmt: skip
    # data_config.yaml is the resolved config, loadable as is: the input config plus the
    # sections fitted featurizers learnt from the training split.
    from dataclasses import replace

    from pipelines.featurize import FEATURIZERS

    written = load_data_config(out1 / "data_config.yaml")
    assert replace(written, features=cfg.features) == cfg
    for m in FEATURIZERS:
        if not FEATURIZERS[m].is_fitted():
            assert written.features.section(m) == cfg.features.section(m), m


def test_rerun_replaces_stale_shards(ray_local, hostile, tmp_path):
    root, rows, _, _ = hostile
    out = tmp_path / "o"
    (out / "train").mkdir(parents=True)
    stale = out / "train" / "train-00007-of-00009.parquet"
    shutil.copyfile(Path(__file__), stale)
    manifest = _write_manifest(root, rows[:3], "jsonl", name="small")
    # A given tokenizer is used (and copied), not retrained.
    from pipelines.tokenizer import train_tokenizer

    train_tokenizer(["some other corpus text"] * 10, tmp_path / "tok", vocab_size=300)
    cfg = _quiet_config(tokenizer_path=str(tmp_path / "tok"))
    # Given as a URI: read through pyarrow's filesystems, paths resolved under it.
    stats = run_prepare(f"file://{manifest}", out, cfg, verbose=False)
    assert not stale.exists()
    _check_accounting(out, 3)
    assert stats["tokenizer"]["trained"] is False
    assert (out / "tokenizer/tokenizer.json").read_bytes() == (
        tmp_path / "tok/tokenizer.json"
    ).read_bytes()


def test_fit_hook_train_items_and_section_updates(monkeypatch):
    """The two-phase hook without Ray: only kept TRAIN items reach ``fit`` (in id order),
    and its section updates land in the resolved config."""
    from pipelines.featurize import FEATURIZERS
    from pipelines.plan import train_items
    from pipelines.prepare import fit_featurizers

    plan = {
        "drop_rows": ["d"],
        "drop_mods": {"c": ["image"]},
        "group_split": {"a": "train", "b": "val", "c": "train", "d": "train", "g": "train"},
    }
    ids = ["e", "a", "b", "c", "d"]
    got = train_items({"image": [5, 1, 2, 3, 4]}, ids, plan, ["g", None, None, None, None])
    assert got == {"image": [1, 5]}

    seen = []

    def fit(self, items):
        seen.append(items)
        return {"size": 16}

    monkeypatch.setattr(FEATURIZERS["image"], "fit", fit)
    cfg = _quiet_config()
    fitted = fit_featurizers(cfg, got)
    assert seen == [[1, 5]] and fitted.features.image.size == 16
    assert cfg.features.image.size == 32  # the input config is untouched


def test_phash_skips_images_stored_below_its_resolution():
    """Distinct 8x8 scans of one digit hash within a few bits of each other (scikit-learn's
    digits lost 48 of 1,797 rows so): images stored smaller than ``phash_min_side`` are only
    deduplicated exactly; larger ones are still compared."""
    import io

    from PIL import Image
    from sklearn.datasets import load_digits

    from pipelines.config import DedupeConfig
    from pipelines.dedupe import near_key

    digits = load_digits().images  # (1797, 8, 8), values 0..16
    cfg = DedupeConfig()

    def png(a: np.ndarray, side: int) -> tuple[np.ndarray, bytes]:
        im = Image.fromarray((a * 15).astype(np.uint8)).resize((side, side))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        return np.asarray(im.convert("RGB").resize((32, 32))), buf.getvalue()

    item, data = png(digits[0], 8)
    assert near_key("phash", item, cfg, data) is None
    item, data = png(digits[0], 64)
    assert near_key("phash", item, cfg, data) is not None
    assert near_key("phash", item, cfg) is not None  # an inline array: compared


def test_stage2_in_process_drops_routes_and_writes_sorted(tmp_path):
    """Stage 2 without Ray (FinalizeRows -> route_block -> write_group): dropped rows and
    modalities stay out, rows reach their (split, shard) in any block order, each shard
    is written sorted by id with its tensors intact (one byte string per tensor)."""
    from common.config import to_dict
    from pipelines.schema import TENSOR_TYPE, read_shard
    from pipelines.shards import route_block, write_group
    from pipelines.stages import DecodeRows, FinalizeRows

    cfg = load_data_config(ROOT / "configs/data/omnidigits.yaml")
    rng = np.random.default_rng(0)
    ids = [f"r{i:02d}" for i in (5, 3, 9, 1, 7, 0, 8, 2, 6, 4)]  # not in id order
    sig = {i: rng.normal(size=(3, 40)).round(3) for i in ids}
    for i in ids:
        np.save(tmp_path / f"{i}.npy", sig[i].astype(np.float32))
    rows = [{"id": i, "label": str(k % 2), "signal": f"{i}.npy"} for k, i in enumerate(ids)]
    lines = pa.table({"text": [json.dumps(r) for r in rows]})
    block = DecodeRows(to_dict(cfg), str(tmp_path), True, "m.jsonl")(lines)
    split_of = {i: ("test" if i in ("r03", "r08") else "train") for i in ids}
    plan = {
        "drop_rows": ["r09"],
        "drop_index": [],
        "drop_mods": {"r07": ["signal"]},
        "group_split": split_of,
        "num_shards": {"train": 2, "val": 0, "test": 1},
    }
    final = FinalizeRows(to_dict(cfg), plan, None)(block)
    assert "r09" not in final.column("id").to_pylist()
    groups = [("train", 0), ("train", 1), ("test", 0)]
    parts = route_block(final, groups)
    assert sum(p.num_rows for p in parts) == 9
    for (split, shard), p in zip(groups, parts, strict=True):
        assert set(p.column("_split").to_pylist()) <= {split}
        assert set(p.column("_shard").to_pylist()) <= {shard}
    # Two blocks of one group (halves of the parts) concatenate into one sorted shard.
    seen = []
    for p in parts:
        half = p.num_rows // 2
        w = write_group(str(tmp_path / "out"), plan["num_shards"], p.slice(half), p.slice(0, half))
        if not p.num_rows:
            assert w.num_rows == 0
            continue
        path = tmp_path / "out" / w.column("file")[0].as_py()
        assert pq.read_schema(path).field("signal").type == TENSOR_TYPE
        got = read_shard(path, ["signal"])
        assert got["id"] == sorted(got["id"]) and len(got["id"]) == p.num_rows
        for rid, x, mods in zip(got["id"], got["signal"], got["modalities"], strict=True):
            seen.append(rid)
            if rid == "r07":
                assert x is None and "signal" not in mods
            else:
                assert x.shape == (3, 128) and "signal" in mods
    assert sorted(seen) == sorted(set(ids) - {"r09"})
