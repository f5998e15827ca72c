"""``prepare`` on a real mixed corpus nobody here wrote, with hostile files mixed in.

Data from packages: scikit-learn's digits (written as PNG) and scikit-image's photos
(written as JPEG crops), aeon's UEA recordings (BasicMotions: 6 channels; JapaneseVowels:
12 channels, variable length, NaN-padded to a common length as ``.ts`` readers do), speech
from ``espeak-ng`` when it is on PATH. One caption per class (repeated captions), a
repeated id, fixed splits, a control-character caption, and hostile files: a truncated
PNG, a zero-byte WAV, a path outside the root, an exact copy of an image, a bad split.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import load_data_config
from pipelines.prepare import run_prepare
from pipelines.schema import SPLITS

aeon_datasets = pytest.importorskip("aeon.datasets")
skdata = pytest.importorskip("skimage.data")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

#: class -> (caption shared by the class's rows, words espeak-ng says)
CLASSES = {
    "standing": ("a person standing still", "standing"),
    "running": ("a person running", "running"),
    "walking": ("a person walking", "walking"),
    "badminton": ("a person playing badminton", "badminton"),
    "vowel": ("a man saying a Japanese vowel", "ah"),
}
ROWS_PER_CLASS = 10
PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "coins", "moon", "brick",
          "grass", "gravel")  # fmt: skip


def _read_split_tables(out: Path) -> dict[str, pa.Table]:
    return {
        s: pa.concat_tables([pq.read_table(f) for f in sorted((out / s).glob("*.parquet"))])
        for s in SPLITS
    }


def _check_accounting(out: Path, n_rows: int) -> list[dict]:
    """Exact accounting: written + dropped == read; returns the quarantine records."""
    stats = json.loads((out / "stats.json").read_text())
    quarantine = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    written = sum(t.num_rows for t in _read_split_tables(out).values())
    dropped = sum(1 for q in quarantine if q["modality"] is None)
    assert stats["rows_read"] == n_rows == written + dropped
    assert stats["accounting"]["ok"] and written == stats["rows_written"]["total"]
    return quarantine


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    return b.getvalue()


def _jpeg(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=90)
    return b.getvalue()


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _espeak(text: str, speed: int, pitch: int, path: Path) -> bool:
    if shutil.which("espeak-ng") is None:
        return False
    subprocess.run(
        ["espeak-ng", "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return True


@pytest.fixture(scope="module")
def real_corpus(tmp_path_factory):
    """``(root, rows, expected modalities per kept row id, expected quarantine, speech)``."""
    base = tmp_path_factory.mktemp("real")
    root = base / "corpus"
    for d in ("images", "audio", "signals"):
        (root / d).mkdir(parents=True)
    (base / "outside.png").write_bytes(_png(np.zeros((8, 8), np.uint8)))

    motions, motion_y = aeon_datasets.load_basic_motions(split="train")  # (40, 6, 100)
    vowels, _ = aeon_datasets.load_japanese_vowels(split="train")  # list of (12, L_i)
    vowels = vowels[:ROWS_PER_CLASS]
    longest = max(v.shape[1] for v in vowels)
    digits = sklearn_datasets.load_digits()
    photos = [np.asarray(getattr(skdata, p)()) for p in PHOTOS]

    rows: list[dict] = []
    expected: dict[str, list[str]] = {}
    speech = False
    n = 0
    for ci, (label, (caption, words)) in enumerate(CLASSES.items()):
        if label == "vowel":
            recs = []
            for v in vowels:  # NaN padding at the end, as aeon/sktime exports have it
                pad = np.full((12, longest), np.nan)
                pad[:, : v.shape[1]] = v
                recs.append(pad)
        else:
            recs = list(motions[motion_y == label][:ROWS_PER_CLASS])
        assert len(recs) == ROWS_PER_CLASS
        for k, rec in enumerate(recs):
            rid = f"{label}-{k:02d}"
            row = {"id": rid, "label": label, "text": caption}
            if n % 2 == 0:  # a handwritten digit of this class, as shipped (8x8, 0..16)
                img = (digits.images[digits.target == ci][k] * 15).astype(np.uint8)
                (root / f"images/{rid}.png").write_bytes(_png(img))
                row["image"] = f"images/{rid}.png"
            else:  # a 160-px crop of a photo
                photo = photos[n % len(photos)]
                y0 = 40 * (n // len(photos))
                (root / f"images/{rid}.jpg").write_bytes(_jpeg(photo[y0 : y0 + 160, :160]))
                row["image"] = f"images/{rid}.jpg"
            (root / f"signals/{rid}.npy").write_bytes(_npy(rec))
            row["signal"] = f"signals/{rid}.npy"
            if _espeak(words, 110 + 7 * k, 30 + 5 * k, root / f"audio/{rid}.wav"):
                row["audio"] = f"audio/{rid}.wav"
                speech = True
            rows.append(row)
            expected[rid] = [m for m in ("text", "image", "audio", "signal") if m in row]
            n += 1

    # Fixed splits, honoured whatever the stratified dealing would have done.
    rows[0]["split"] = "test"
    rows[1]["split"] = "val"
    rows[2]["split"] = " Train "
    # A caption with a few control characters: cleaned, kept, counted.
    rows[3]["text"] = "a person standing still\x00\x07"
    # Hostile files and rows.
    (root / "images/truncated.png").write_bytes((root / rows[4]["image"]).read_bytes()[:60])
    rows[4]["image"] = "images/truncated.png"
    expected[rows[4]["id"]].remove("image")
    (root / "audio/zero.wav").write_bytes(b"")
    rows[5]["audio"] = "audio/zero.wav"
    if "audio" in expected[rows[5]["id"]]:
        expected[rows[5]["id"]].remove("audio")
    rows[6]["image"] = "../outside.png"
    expected[rows[6]["id"]].remove("image")
    shutil.copyfile(root / rows[0]["image"], root / "images/copy.png")
    rows[7]["image"] = "images/copy.png"  # an exact copy of another sample's image
    expected[rows[7]["id"]].remove("image")
    rows.insert(9, {"id": "stray", "text": "a row with an unknown split", "split": "holdout"})
    # A repeated id: the first row (above) is kept, this later one quarantined.
    rows.append({"id": rows[8]["id"], "label": "running", "text": "a second row, same id"})
    quarantine = {
        (rows[4]["id"], "image"): "truncated",
        (rows[5]["id"], "audio"): "empty",
        (rows[6]["id"], "image"): "outside_root",
        (rows[7]["id"], "image"): f"duplicate_of:{rows[0]['id']}",
        ("stray", None): "bad_split",
        (rows[8]["id"], None): "duplicate_id",
    }
    return root, rows, expected, quarantine, speech


@pytest.mark.slow
def test_real_mixed_corpus_keeps_every_good_row(ray_local, real_corpus, tmp_path):
    root, rows, expected, want_quarantine, speech = real_corpus
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_data_config(
        None,
        [
            "execution.progress_bars=false",
            "execution.rows_per_block=8",  # the repeated id lands in another block
            "features.signal.channels=null",
            "features.signal.layout=channels_first",
        ],
    )
    out = tmp_path / "out"
    stats = run_prepare(manifest, out, cfg, verbose=False)
    quarantine = _check_accounting(out, len(rows))
    got_q = {}
    for q in quarantine:
        got_q.setdefault((q["id"], q["modality"]), q["reason"])
    assert got_q == want_quarantine

    kept: dict[str, tuple[str, list[str], str | None]] = {}
    tables = _read_split_tables(out)
    for s, t in tables.items():
        for rid, mods, label in zip(
            t.column("id").to_pylist(),
            t.column("modalities").to_pylist(),
            t.column("label").to_pylist(),
            strict=True,
        ):
            kept[rid] = (s, mods, label)
    # Every good row with every good modality; repeated captions survive.
    assert {rid: mods for rid, (_, mods, _) in kept.items()} == expected
    assert all("text" in mods for _, mods, _ in kept.values())
    assert stats["modalities"]["text"]["total"] == len(expected) == 5 * ROWS_PER_CLASS
    assert stats["modalities"]["signal"]["total"] == len(expected)
    if speech:
        assert stats["modalities"]["audio"]["total"] == len(expected) - 1
    # The first of two rows with one id survived (its label, not the second's).
    first = rows[8]
    assert kept[first["id"]][2] == first["label"]
    # Fixed splits honoured; the stratified split has every class in val and test.
    assert kept[rows[0]["id"]][0] == "test"
    assert kept[rows[1]["id"]][0] == "val"
    assert kept[rows[2]["id"]][0] == "train"
    for s in SPLITS:
        assert set(stats["splits"][s]["labels"]) == set(CLASSES), s
    assert stats["warnings"] == []
    # The control characters were stripped and counted.
    assert stats["cleaned"]["control_chars"] == 1
    from pipelines.featurize import get_featurizer
    from pipelines.schema import unpack_table

    text = get_featurizer("text", tokenizer_dir=out / "tokenizer")
    split = kept[rows[3]["id"]][0]
    t = tables[split]
    row = t.filter(pa.compute.equal(t.column("id"), rows[3]["id"]))
    assert text.detokenize(unpack_table(row, ["text"])["text"][0]) == "a person standing still"
    # Mixed channel counts in one corpus: 6-axis motion and 12-channel speech recordings.
    chans = set()
    for t in tables.values():
        for shape in t.column("signal_shape").to_pylist():
            if shape is not None:
                chans.add(shape[0])
    assert chans == {6, 12}
