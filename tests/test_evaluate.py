"""End to end: ``jobs.evaluate`` on a tiny untrained export and tiny hand-written shards."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import yaml

from common.config import load_config, save_yaml
from jobs import evaluate
from jobs.evaluation.config import EvalConfig
from pipelines.schema import write_shard

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three"]
LABELS = ["0", "1", "2", "3"]
SPLIT_MODS = ("text", "image", "audio", "pointcloud", "signal")  # no video in the split
ALIGNED = [["text", "image"], ["text", "audio"]]
TEMPLATES = ["{label}", "the digit {label}", "a handwritten {label}"]  # the export's


def _rows(n: int, seed: int) -> dict[str, list]:
    """Featurized rows shaped like INTERFACES §1; every 4th row lacks audio."""
    from pipelines.featurize import get_featurizer

    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {m: [] for m in (*SPLIT_MODS, "video")}
    cols.update(id=[], label=[], group=[], modalities=[])
    for i in range(n):
        lab = i % len(LABELS)
        cols["id"].append(f"r{seed}-{i:03d}")
        cols["label"].append(LABELS[lab])
        cols["group"].append(f"g{i}")
        present = [m for m in SPLIT_MODS if not (m == "audio" and i % 4 == 3)]
        cols["modalities"].append(present)
        cols["text"].append(_rows.text.from_text(f"the digit {WORDS[lab]}"))
        cols["image"].append(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        cols["audio"].append(
            rng.normal(size=(int(rng.integers(40, 128)), 40)).astype(np.float16)
            if "audio" in present
            else None
        )
        cols["pointcloud"].append(rng.normal(size=(256, 3)).astype(np.float16))
        cols["signal"].append(rng.normal(size=(3, 128)).astype(np.float16))
        cols["video"].append(None)
    del get_featurizer
    return cols


def _write_shard(path: Path, cols: dict[str, list]) -> None:
    write_shard(path, cols, sort=False)  # modalities absent from ``cols`` are null


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """A shards dir (test split in two files) and a tiny untrained export with training info."""
    from models import OmniConfig, build_model
    from pipelines.config import DataConfig
    from pipelines.featurize import get_featurizer
    from pipelines.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("evaluate")
    shards = root / "shards"
    texts = [f"the digit {w}" for w in WORDS] + [f"a handwritten {w}" for w in WORDS]
    train_tokenizer(texts * 4, shards / "tokenizer", vocab_size=300)
    save_yaml(DataConfig(), shards / "data_config.yaml")
    _rows.text = get_featurizer("text", DataConfig().features, tokenizer_dir=shards / "tokenizer")
    _write_shard(shards / "test" / "part-00000.parquet", _rows(14, seed=0))
    _write_shard(shards / "test" / "part-00001.parquet", _rows(10, seed=1))
    _write_shard(shards / "train" / "part-00000.parquet", _rows(8, seed=2))

    cfg = OmniConfig.from_name("tiny", vocab_size=300, num_classes=len(LABELS))
    export = root / "export"
    build_model(cfg).save_pretrained(export)
    shutil.copytree(shards / "tokenizer", export / "tokenizer")
    shutil.copy2(shards / "data_config.yaml", export / "data_config.yaml")
    (export / "metrics.json").write_text(json.dumps({"stages": {"finetune": {"loss": 1.0}}}))
    (export / "zero_shot.yaml").write_text(
        yaml.safe_dump(
            {"templates": TEMPLATES, "label_text": dict(zip(LABELS, WORDS, strict=True))}
        )
    )
    (export / "training.yaml").write_text(
        yaml.safe_dump({"aligned_pairs": ALIGNED, "label_names": LABELS, "model": "tiny"})
    )
    return {"root": root, "shards": shards, "export": export}


def _copy_featurizer_files(src: Path, dst: Path) -> None:
    """The tokenizer and data config every export carries (no zero_shot.yaml: an old export)."""
    shutil.copytree(src / "tokenizer", dst / "tokenizer", dirs_exist_ok=True)
    shutil.copy2(src / "data_config.yaml", dst / "data_config.yaml")


def _copy_export(setup, name: str) -> Path:
    dst = setup["root"] / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(setup["export"], dst)
    return dst


def test_eval_config_yamls_validate():
    for path in sorted((ROOT / "configs" / "eval").glob("*.yaml")):
        cfg = load_config(EvalConfig, path)
        assert cfg.split in ("train", "val", "test")
    with pytest.raises(ValueError, match="unknown key"):
        load_config(EvalConfig, None, ["no_such_key=1"])
    with pytest.raises(ValueError, match="label"):
        load_config(EvalConfig, None, ["prompt_templates=[no placeholder]"])


def test_cli_end_to_end(setup, tmp_path):
    """``python -m jobs.evaluate`` as a user runs it: metrics, PNGs, merge, summary."""
    out = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.evaluate",
            "--export",
            str(setup["export"]),
            "--data",
            str(setup["shards"]),
            "--split",
            "test",
            "--out",
            str(out),
            "--config",
            str(ROOT / "configs/eval/default.yaml"),
            "batch_size=7",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "R@1" in proc.stdout and "emergent alignment" in proc.stdout
    res = json.loads((out / "metrics.json").read_text())

    assert res["n_rows"] == 24 and res["modalities"] == list(SPLIT_MODS)
    assert res["rows_per_modality"]["audio"] == 19 and res["rows_per_modality"]["text"] == 24
    assert res["config"]["batch_size"] == 7
    # Every ordered pair of the modalities present, values in [0, 1].
    expected = {f"{a}->{b}" for a in SPLIT_MODS for b in SPLIT_MODS if a != b}
    assert set(res["retrieval"]) == expected
    for key, entry in res["retrieval"].items():
        for level in ("category", "instance"):
            for k in (1, 5, 10):
                assert 0.0 <= entry[level][f"R@{k}"] <= 1.0, (key, level, k)
            assert entry[level]["R@1"] <= entry[level]["R@5"] <= entry[level]["R@10"]
        n_both = 19 if "audio" in key else 24
        assert entry["gallery_size"] == n_both and entry["instance"]["n_queries"] == n_both
        # Label counts 7/7/5/5; rows without audio are all label "3" (7, 7, 5 remain).
        chance = (7 * 7 + 7 * 7 + 5 * 5) / 19**2 if "audio" in key else 148 / 24**2
        assert entry["category"]["chance@1"] == pytest.approx(chance)
    # Video: the model has it, the split does not -> recorded, not a crash.
    assert "modality:video" in res["skipped"]

    # Emergent pairs = every pair not aligned in training (training.yaml).
    em = res["emergent_alignment"]
    assert em["source"] == "training.yaml"
    aligned = {frozenset(p) for p in ALIGNED}
    want = {k for k in expected if frozenset(k.split("->")) not in aligned}
    assert set(em["emergent_pairs"]) == want and len(want) == 16
    assert set(em["R@1"]) == want
    assert em["mean_R@1"] == pytest.approx(
        np.mean([res["retrieval"][k]["category"]["R@1"] for k in want])
    )
    assert 0.0 <= em["mean_R@1_aligned"] <= 1.0
    # Headline views agree with the details.
    assert res["emergent"]["mean_R@1"] == em["mean_R@1"]
    assert set(res["retrieval_summary"]["R@1"]) == expected
    assert res["mean_R@1"] == pytest.approx(
        np.mean([res["retrieval"][k]["category"]["R@1"] for k in expected]), abs=1e-4
    )

    zs = res["zero_shot"]
    assert zs["class_names"] == LABELS
    assert zs["example_prompts"][1] == "the digit zero"  # label_text from the export
    assert zs["label_text_source"] == "export"
    assert zs["templates"] == TEMPLATES and zs["templates_source"] == "export"
    assert set(zs["per_modality"]) == set(SPLIT_MODS)
    for v in zs["per_modality"].values():
        assert 0.0 <= v["accuracy"] <= 1.0 and v["chance"] == 0.25
        assert 0.0 <= v["balanced_accuracy"] <= 1.0 and set(v["per_class_recall"]) == set(LABELS)

    # Per-sample head classification: every row fused over its modalities, each modality.
    cl = res["classification"]
    assert cl["class_names"] == LABELS and cl["fused"]["n"] == 24
    assert {m: v["n"] for m, v in cl["per_modality"].items()} == res["rows_per_modality"]
    for v in [cl["fused"], *cl["per_modality"].values()]:
        assert np.sum(v["confusion"]) == pytest.approx(v["n"])
        assert v["support"] == ({"0": 7, "1": 7, "2": 5, "3": 5} if v["n"] == 24 else v["support"])
    # The console's table: head and zero-shot per-sample accuracy/balanced per modality.
    table = proc.stdout.split("[evaluate] accuracy/balanced per sample")[1].splitlines()
    assert "head" in table[0] and "zero-shot" in table[0] and "(4 classes" in table[0]
    assert [ln.split()[1] for ln in table[1 : 2 + len(SPLIT_MODS)]] == ["fused", *SPLIT_MODS]
    recall = (out / "per_class_recall.csv").read_text().splitlines()
    assert recall[0].endswith(",".join(LABELS)) and len(recall) == 1 + 2 * len(SPLIT_MODS) + 1

    fu = res["fusion"]
    assert fu["modalities"] == list(SPLIT_MODS) and fu["n"] == 19
    assert 0.0 <= fu["fused_accuracy"] <= 1.0
    assert fu["best_single_accuracy"] == max(fu["single_accuracy"].values())
    assert fu["fusion_gain"] == pytest.approx(fu["fused_accuracy"] - fu["best_single_accuracy"])
    # Every modality pair with enough rows gets its own fused-vs-best-single comparison.
    pw = fu["pairwise"]
    assert set(pw["pairs"]) <= {f"{a}+{b}" for a, b in combinations(SPLIT_MODS, 2)}
    assert pw["pairs"], pw
    for v in pw["pairs"].values():
        assert v["n"] >= 16  # min_fusion_rows
        assert v["fusion_gain"] == pytest.approx(v["fused_accuracy"] - v["best_single_accuracy"])
    gains = [v["fusion_gain"] for v in pw["pairs"].values()]
    assert pw["mean_gain"] == pytest.approx(sum(gains) / len(gains))
    assert pw["pairs_with_gain"] == sum(g > 0 for g in gains)

    names = ("retrieval_r1", "embeddings_2d", "zero_shot", "fusion")
    for name in (*names, "confusion_classification", "confusion_zero_shot"):
        png = out / f"{name}.png"
        assert png.is_file() and png.stat().st_size > 2000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Merged into the export's metrics.json, training metrics kept.
    merged = json.loads((setup["export"] / "metrics.json").read_text())
    assert merged["stages"] == {"finetune": {"loss": 1.0}}
    assert merged["evaluation"]["test"]["retrieval"] == res["retrieval"]


def test_in_process_variants(setup, tmp_path):
    """No training info: emergent skipped, then given on the command line; no head: fusion skipped."""
    from models import OmniConfig, build_model

    export = _copy_export(setup, "export_noinfo")
    (export / "training.yaml").unlink()
    before = (export / "metrics.json").read_text()
    cfg = EvalConfig(plots=False, merge_into_export=False, label_names=LABELS)
    res = evaluate.run_evaluation(export, setup["shards"], cfg, tmp_path / "a")
    assert "skipped" in res["emergent_alignment"]
    assert "--aligned-pairs" in res["emergent_alignment"]["skipped"]
    assert "fused_accuracy" in res["fusion"]  # label_names came from the config
    assert not (tmp_path / "a" / "retrieval_r1.png").exists()
    assert (export / "metrics.json").read_text() == before  # merge_into_export=false

    rc = evaluate.main(
        [
            "--export",
            str(export),
            "--data",
            f"file://{setup['shards']}",  # URIs go through pyarrow.fs
            "--out",
            str(tmp_path / "b"),
            "--aligned-pairs",
            "image-audio,text-image",
            "plots=false",
            "merge_into_export=false",
        ]
    )
    assert rc == 0
    em = json.loads((tmp_path / "b" / "metrics.json").read_text())["emergent_alignment"]
    assert em["source"] == "command line"
    assert "image->audio" not in em["emergent_pairs"] and "text->audio" in em["emergent_pairs"]
    assert len(em["emergent_pairs"]) == 16

    # Fusion-set choice: explicit modalities, and too few rows -> skipped with the reason.
    res = evaluate.run_evaluation(
        export,
        setup["shards"],
        EvalConfig(
            plots=False,
            merge_into_export=False,
            label_names=LABELS,
            fusion_modalities=["image", "signal"],
        ),
        tmp_path / "e",
    )
    assert res["fusion"]["modalities"] == ["image", "signal"] and res["fusion"]["n"] == 24
    res = evaluate.run_evaluation(
        export,
        setup["shards"],
        EvalConfig(plots=False, merge_into_export=False, label_names=LABELS, min_fusion_rows=100),
        tmp_path / "f",
    )
    assert "fewer than 100 labelled rows" in res["fusion"]["skipped"]
    assert "not cross-modal" in res["zero_shot"]["per_modality"]["text"]["note"], res["zero_shot"]
    # A template that makes an empty prompt: zero-shot skipped with the reason.
    res = evaluate.run_evaluation(
        export,
        setup["shards"],
        EvalConfig(
            plots=False,
            merge_into_export=False,
            prompt_templates=[" {label} "],
            label_text={"0": " "},
        ),
        tmp_path / "g",
    )
    assert "cannot be tokenized" in res["zero_shot"]["skipped"]

    # An export without a classification head.
    nohead = setup["root"] / "export_nohead"
    build_model(OmniConfig.from_name("tiny", vocab_size=300, num_classes=0)).save_pretrained(nohead)
    _copy_featurizer_files(setup["export"], nohead)
    res = evaluate.run_evaluation(nohead, setup["shards"], cfg, tmp_path / "c")
    assert "classification head" in res["fusion"]["skipped"]
    assert "per_modality" in res["zero_shot"]

    # Restricting the model to fewer modalities than the split has: recorded, rest evaluated.
    small = setup["root"] / "export_small"
    mcfg = OmniConfig.from_name("tiny", vocab_size=300, num_classes=4, modalities=["text", "image"])
    build_model(mcfg).save_pretrained(small)
    _copy_featurizer_files(setup["export"], small)
    res = evaluate.run_evaluation(small, setup["shards"], cfg, tmp_path / "d")
    assert set(res["retrieval"]) == {"text->image", "image->text"}
    assert "no branch" in res["skipped"]["modality:audio"]
    assert res["emergent_alignment"]["skipped"]


def test_head_accuracy_is_per_sample(setup, tmp_path):
    """The head's per-modality and fused reports equal a direct forward of each row with
    that modality alone / with all of its modalities; fusion reuses the same logits."""
    import torch

    from jobs.evaluation import metrics as M
    from jobs.evaluation.data import load_split
    from jobs.evaluation.encode import _collate, encode_samples
    from jobs.exports import load_export

    cfg = EvalConfig(plots=False, merge_into_export=False, label_text={"0": "nil"})
    res = evaluate.run_evaluation(setup["export"], setup["shards"], cfg, tmp_path / "o")
    assert res["zero_shot"]["label_text_source"] == "config"
    data = load_split(setup["shards"], "test")
    model = load_export(setup["export"]).model
    with torch.no_grad():
        for m in ("audio", "signal"):
            rows = data.rows_with([m])
            out = model(_collate([{m: data.tensors[m][i]} for i in rows], [m]), modalities=[m])
            want = M.class_score_accuracy(
                out.modality_logits[m].numpy(), [data.labels[i] for i in rows], LABELS
            )
            got = res["classification"]["per_modality"][m]
            assert got["accuracy"] == pytest.approx(want["accuracy"])
            assert got["confusion"] == want["confusion"]
        # Row 3 lacks audio: its fused prediction is over the four modalities it has.
        sp = encode_samples(model, data, list(SPLIT_MODS), batch_size=5)
        mods = [m for m in SPLIT_MODS if data.tensors[m][3] is not None]
        assert "audio" not in mods and sp.row_modalities[3] == tuple(mods)
        out = model(_collate([{m: data.tensors[m][3] for m in mods}], mods), modalities=mods)
        np.testing.assert_allclose(sp.fused_logits[3], out.logits[0].numpy(), atol=1e-4)


def test_label_only_corpus_gets_a_head_accuracy(setup, tmp_path):
    """A signal-only corpus with labels (no text branch): the head gives an accuracy, and
    what needs text or two modalities is skipped with the reason."""
    from models import OmniConfig, build_model
    from pipelines.config import DataConfig

    cols = _rows(20, seed=7)
    n = len(cols["id"])
    for m in ("text", "image", "audio", "pointcloud"):
        cols[m] = [None] * n
    cols["modalities"] = [["signal"]] * n
    shards = tmp_path / "shards"
    shards.mkdir()
    save_yaml(DataConfig(), shards / "data_config.yaml")
    _write_shard(shards / "test" / "part-00000.parquet", cols)
    export = tmp_path / "export"
    mcfg = OmniConfig.from_name("tiny", num_classes=4, modalities=["signal"])
    build_model(mcfg).save_pretrained(export)
    shutil.copy2(shards / "data_config.yaml", export / "data_config.yaml")
    (export / "training.yaml").write_text(yaml.safe_dump({"label_names": LABELS}))
    res = evaluate.run_evaluation(
        export, shards, EvalConfig(merge_into_export=False), tmp_path / "o"
    )
    cl = res["classification"]
    assert cl["per_modality"]["signal"]["n"] == 20 and cl["fused"]["n"] == 20
    assert 0.0 <= cl["fused"]["balanced_accuracy"] <= 1.0
    assert "text branch" in res["zero_shot"]["skipped"]
    assert "skipped" in res["fusion"]
    assert (tmp_path / "o" / "confusion_classification.png").stat().st_size > 2000
    text = evaluate.format_summary(res)
    assert "classification head, per sample (4 classes" in text and "signal" in text


def test_auto_fusion_set_considers_subsets():
    """Rows with {t,i,a,v} or {t,i,a,p}: no exact combination has 3 rows, {t,i,a} has 6."""
    from jobs.evaluation.data import SplitData
    from jobs.evaluation.fusion import auto_fusion_modalities

    x = np.zeros(1)
    rows = [("text", "image", "audio", "video")] * 3 + [
        ("text", "image", "audio", "pointcloud")
    ] * 3
    mods = ["text", "image", "audio", "video", "pointcloud"]
    data = SplitData(ids=[str(i) for i in range(6)], labels=["a"] * 6)
    data.tensors = {m: [x if m in r else None for r in rows] for m in mods}
    assert auto_fusion_modalities(data, mods, 4) == ["text", "image", "audio"]
    assert auto_fusion_modalities(data, mods, 3) == ["text", "image", "audio", "video"]
    assert auto_fusion_modalities(data, mods, 7) is None


def test_unlabelled_split(setup, tmp_path):
    """No labels: instance-level retrieval only; zero-shot and fusion skipped with reasons."""
    cols = _rows(12, seed=3)
    cols["label"] = [None] * 12
    shards = tmp_path / "shards"
    _write_shard(shards / "test" / "part-00000.parquet", cols)
    cfg = EvalConfig(merge_into_export=False, projection="tsne")
    res = evaluate.run_evaluation(setup["export"], shards, cfg, tmp_path / "out")
    assert res["retrieval_level"] == "instance"
    entry = res["retrieval"]["image->text"]
    assert entry["category"] is None and entry["instance"]["n_queries"] == 12
    # Zero-shot uses the export's label names but no row has a known label.
    assert all("skipped" in v for v in res["zero_shot"]["per_modality"].values())
    assert "skipped" in res["fusion"]
    assert (tmp_path / "out" / "embeddings_2d.png").stat().st_size > 2000
    assert "mean_R@1" in res["emergent_alignment"]  # instance-level R@1 of emergent pairs


def _run_main(capsys, *argv: str) -> tuple[int, str]:
    rc = evaluate.main(list(argv))
    return rc, capsys.readouterr().err


def test_bad_inputs_exit_cleanly(setup, tmp_path, capsys):
    data = str(setup["shards"])
    rc, err = _run_main(capsys, "--export", str(tmp_path / "nope"), "--data", data)
    assert rc == 2 and "export directory not found" in err

    rc, err = _run_main(capsys, "--export", str(setup["shards"]), "--data", data)
    assert rc == 2 and "not found" in err and "model.safetensors" in err

    export = _copy_export(setup, "export_bad")
    before = (export / "metrics.json").read_text()
    rc, err = _run_main(capsys, "--export", str(export), "--data", data, "--split", "val")
    assert rc == 2 and "split 'val' not found" in err and "['test', 'train']" in err

    rc, err = _run_main(capsys, "--export", str(export), "--data", str(tmp_path / "none"))
    assert rc == 2 and "data directory not found" in err

    rc, err = _run_main(capsys, "--export", str(export), "--data", f"file://{tmp_path}/nope")
    assert rc == 2 and "data directory not found" in err

    rc, err = _run_main(capsys, "--export", str(export), "--data", data, "bogus_key=3")
    assert rc == 2 and "unknown key" in err

    rc, err = _run_main(capsys, "--export", str(export), "--data", data, "--aligned-pairs", "text")
    assert rc == 2 and "two different modalities" in err

    (export / "model_config.yaml").write_text("d_model: [64\nn_heads: 4\n")  # broken YAML
    rc, err = _run_main(capsys, "--export", str(export), "--data", data)
    assert rc == 2 and "unreadable" in err and "model_config.yaml" in err

    (export / "model_config.yaml").write_text("d_model: 64\nno_such_field: 1\n")
    rc, err = _run_main(capsys, "--export", str(export), "--data", data)
    assert rc == 2 and "model_config.yaml" in err and "no_such_field" in err

    # Nothing was lost or half-written in the export by the failed runs.
    assert (export / "metrics.json").read_text() == before
    assert not (export / "eval").exists()


def test_split_not_matching_the_model_is_a_clear_error(setup, tmp_path, capsys):
    """Signals with 5 channels where the export expects 3: exit 2 naming the modality."""
    cols = _rows(6, seed=5)
    cols["signal"] = [np.zeros((5, 128), np.float16) for _ in cols["signal"]]
    mixed = tmp_path / "mixed"
    shutil.copytree(setup["shards"], mixed)
    _write_shard(mixed / "test" / "part-00002.parquet", cols)
    only_bad = tmp_path / "only_bad"
    _write_shard(only_bad / "test" / "part-00000.parquet", cols)
    common = ["--export", str(setup["export"]), "--out", str(tmp_path / "o")]
    rc, err = _run_main(capsys, *common, "--data", str(mixed), "merge_into_export=false")
    # Refused when batched (fixed channel count) or by the encoder (variable channels, at
    # most the export's): either way one line naming the modality.
    assert rc == 2 and ("cannot batch" in err or "cannot encode the split" in err), err
    assert "signal" in err and "5" in err and err.count("\n") == 1
    rc, err = _run_main(capsys, *common, "--data", str(only_bad), "merge_into_export=false")
    assert rc == 2 and "cannot encode the split" in err and "signal" in err and "data_config" in err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_cli_error_is_one_line_without_traceback(setup, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.evaluate",
            "--export",
            str(setup["export"]),
            "--data",
            str(setup["shards"]),
            "--split",
            "nosuch",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "split 'nosuch' not found" in proc.stderr


def test_fusion_pass_embeddings_match_single_modality_pass(setup):
    """Rows embedded during the fusion pass reuse those embeddings: they must equal what a
    single-modality pass gives (branches are independent of the other modalities)."""
    from jobs.evaluation.data import load_split
    from jobs.evaluation.encode import embed_rows, head_logits
    from jobs.exports import load_export

    data = load_split(setup["shards"], "test")
    model = load_export(setup["export"]).model
    mods = ["text", "audio", "signal"]
    rows = data.rows_with(mods)[:9]
    emb, fused, single = head_logits(model, data, mods, rows, batch_size=4)
    assert fused.shape == (9, len(LABELS)) and set(single) == set(mods)
    for m in mods:
        alone = embed_rows(model, data, m, rows, batch_size=3)
        np.testing.assert_allclose(emb[m], alone, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(alone, axis=1), 1.0, atol=1e-4)


def test_load_export_fails_loudly_and_old_exports_load(setup, tmp_path, caplog):
    """One loader: a missing file or sizes that disagree name the path; an export without
    zero_shot.yaml (written before it existed) loads with the default templates."""
    from common.config import read_yaml
    from jobs.exports import ExportError, load_export
    from models.zeroshot import DEFAULT_TEMPLATES

    ex = load_export(setup["export"])
    assert ex.templates == TEMPLATES and ex.info["label_names"] == LABELS
    assert set(ex.featurizers) == set(ex.config.modalities) == set(ex.model.modalities)

    old = _copy_export(setup, "export_old")
    (old / "zero_shot.yaml").unlink()
    with caplog.at_level("WARNING"):
        assert load_export(old, modalities=["image"]).templates == list(DEFAULT_TEMPLATES)
    assert "zero_shot.yaml" in caplog.text

    for name in ("data_config.yaml", "tokenizer"):
        broken = _copy_export(setup, f"export_no_{name}")
        target = broken / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(ExportError, match=name):
            load_export(broken)

    # The data config says images are 48 px, the model was built for 32 px.
    wrong = _copy_export(setup, "export_wrong_size")
    data_cfg = read_yaml(wrong / "data_config.yaml")
    data_cfg.setdefault("features", {}).setdefault("image", {})["size"] = 48
    (wrong / "data_config.yaml").write_text(yaml.safe_dump(data_cfg))
    with pytest.raises(ExportError, match="image"):
        load_export(wrong)
