"""Pretrained towers through ``transformers`` (encoder kind ``hf``), on tiny random towers
built here with ``transformers`` config classes (2-layer BERT, ViT, wav2vec2): no network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from common.towers import CACHE_SUFFIX, TowerError, tower_revision  # noqa: E402
from tests.towers_fixtures import make_bert, make_vit, make_wav2vec2  # noqa: E402

LABELS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {
        "text": make_bert(root / "bert"),
        "image": make_vit(root / "vit"),
        "audio": make_wav2vec2(root / "w2v"),
    }


def _features(towers, **extra):
    from pipelines.config import FeatureConfig

    sec = {
        "text": {"tower": str(towers["text"]), "max_len": 16},
        "image": {"tower": str(towers["image"])},
        "video": {"tower": str(towers["image"]), "num_frames": 2},
        "audio": {"tower": str(towers["audio"]), "clip_seconds": 0.5},
    }
    for m, kv in extra.items():
        sec[m].update(kv)
    return FeatureConfig.from_config_dict(sec)


def _model_cfg(featurizers, **encoders):
    from jobs.exports import model_sizes
    from models import OmniConfig

    kw = model_sizes(featurizers)
    for m, over in encoders.items():
        kw["encoders"][m].update(over)
    return OmniConfig.from_name("tiny", modalities=list(featurizers), num_classes=10, **kw)


@pytest.fixture(scope="module")
def featurized(towers):
    """Featurizers of the three towers (video on the image tower) and 4 featurized rows."""
    from pipelines.featurize import build_featurizers

    feats = build_featurizers(_features(towers), ["text", "image", "audio", "video"])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        row = {"label": str(i)}
        for m, f in feats.items():
            if m == "video":
                raw = rng.integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)
                row[m] = f.from_array(raw)
            else:
                raw, suffix = f.example(rng, i)
                row[m] = f.featurize(raw, suffix)
        rows.append(row)
    return feats, rows


def test_processor_is_the_featurizer(featurized):
    feats, rows = featurized
    r = rows[0]
    # text: the tower tokenizer's ids ([CLS] ... [SEP])
    tok = feats["text"].processor
    assert r["text"][0] == tok.cls_token_id and r["text"][-1] == tok.sep_token_id
    assert r["text"].dtype == np.int32
    # image/video: the processor's 32-pixel output (tower resolution), uint8
    assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
    assert r["video"].shape == (2, 32, 32, 3)
    # audio: the feature extractor's normalized waveform at 16 kHz, (T, 1)
    assert r["audio"].shape[1] == 1 and r["audio"].shape[0] <= 8000
    assert abs(float(r["audio"].astype(np.float32).mean())) < 1e-2  # zero-mean normalization
    cfg = _model_cfg(feats)
    assert cfg.encoders["text"]["kind"] == "hf"
    assert cfg.vocab_size == feats["text"].tower_config.vocab_size >= len(tok)
    assert cfg.encoders["image"]["revision"] == tower_revision(str(feats["image"].tower_ref))


def _trainable(enc):
    return {n for n, p in enc.named_parameters() if p.requires_grad}


def test_frozen_last_k_lora_trainable_sets(featurized):
    from models.encoders import build_encoder

    feats, _ = featurized
    connector = {
        "connector.0.weight", "connector.0.bias", "connector.1.weight", "connector.1.bias",
        "modality_embed", "mask_token", "norm.weight", "norm.bias",
    }  # fmt: skip
    cfg = _model_cfg({"text": feats["text"]})
    enc = build_encoder("text", cfg)
    assert _trainable(enc) == connector
    enc.set_tower_training("last_k")  # last_k=1: the second (last) BERT layer
    tower_layer1 = {n for n, _ in enc.named_parameters() if n.startswith("tower.encoder.layer.1.")}
    assert tower_layer1 and _trainable(enc) == connector | tower_layer1
    with pytest.raises(ValueError, match="without adapters"):
        enc.set_tower_training("lora")

    cfg = _model_cfg({"text": feats["text"]}, text={"train": "lora", "lora_r": 2})
    enc = build_encoder("text", cfg)
    lora = _trainable(enc) - connector
    # LoRA A/B of query and value in both layers, nothing else of the tower.
    assert len(lora) == 2 * 2 * 2
    assert all(
        ("lora_A" in n or "lora_B" in n) and (".query." in n or ".value." in n) for n in lora
    )
    enc.set_tower_training("frozen")
    assert _trainable(enc) == connector


def test_connector_only_recipe_and_stage_modes(featurized):
    from jobs.training.config import StageSection
    from jobs.training.engine import apply_freeze
    from models.model import build_model

    feats, _ = featurized
    cfg = _model_cfg(feats)
    model = build_model(cfg)
    counts = apply_freeze(model, StageSection(freeze="connectors"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(
        n.split(".", 2)[2].split(".")[0] in ("connector", "modality_embed", "mask_token", "norm")
        for n in names
    )
    assert counts["trainable_fraction"] < 0.05
    apply_freeze(model, StageSection(freeze="none", towers={"text": "last_k"}))
    enc = model.encoders
    assert any(p.requires_grad for p in enc["text"].tower.parameters())
    assert not any(p.requires_grad for p in enc["image"].tower.parameters())


def test_export_roundtrip_and_cached_features(featurized, tmp_path):
    """Model + towers + processors travel in the export; the loaded export featurizes and
    embeds identically; cached tower features give the same embeddings as the tower."""
    import yaml

    from jobs.exports import load_export, write_export
    from models.data import collate
    from models.model import build_model
    from models.pretrained import save_pretrained

    feats, rows = featurized
    cfg = _model_cfg(feats)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # A tower tensor that training changed (as last_k does) must stay in model.safetensors.
    with torch.no_grad():
        changed = "encoders.image.tower.layernorm.weight"
        dict(model.named_parameters())[changed].add_(0.5)
    weights, shards = tmp_path / "w", tmp_path / "shards"
    save_pretrained(model, weights)
    shards.mkdir()
    data_cfg = {"features": feats["text"].config.to_config_dict()}
    (shards / "data_config.yaml").write_text(yaml.safe_dump(data_cfg))
    out = write_export(
        weights, tmp_path / "export", shards_dir=shards, metrics={}, training_info={}
    )
    assert (out / "towers" / "text" / "tokenizer.json").is_file()
    assert (out / "towers" / "image" / "preprocessor_config.json").is_file()
    assert (
        yaml.safe_load((out / "model_config.yaml").read_text())["encoders"]["text"]["tower"]
        == "towers/text"
    )
    # Each tower's weights are stored once: in towers/<m>/, not again in model.safetensors
    # (except what differs from the tower, e.g. trained layers).
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())  # noqa: SIM118
        assert json.loads(f.metadata()["external_towers"]) == ["audio", "image", "text", "video"]
    own = set(model.state_dict())
    assert {k for k in own - stored if ".tower." not in k} == set()
    for m in ("text", "image", "audio", "video"):
        assert not any(k.startswith(f"encoders.{m}.tower.") for k in stored - {changed})
    assert changed in stored
    assert (out / "model.safetensors").stat().st_size < (
        weights / "model.safetensors"
    ).stat().st_size
    # The export works without the original tower directories.
    moved = {m: f.tower_ref for m, f in feats.items()}
    ex = load_export(out)
    torch.testing.assert_close(
        dict(ex.model.named_parameters())[changed], dict(model.named_parameters())[changed]
    )
    batch = collate(rows, modalities=list(feats), label_names=LABELS)
    with torch.no_grad():
        for m in ("text", "image", "audio", "video"):
            again = ex.featurizers[m]
            assert again.tower_ref != moved[m]
            a = model.encode_features(m, batch).embed
            b = ex.model.encode_features(m, batch).embed
            torch.testing.assert_close(a, b)
        # cached features == recomputed: the frozen tower's output fed back as the cache
        from jobs.tower_cache import tower_feature_rows

        for m in ("text", "image", "audio"):
            enc = model.encoders[m]
            cached = tower_feature_rows(enc, [r[m] for r in rows])
            rows_c = [{**r, f"{m}{CACHE_SUFFIX}": c} for r, c in zip(rows, cached, strict=True)]
            bc = collate(rows_c, modalities=list(feats), label_names=LABELS)
            assert f"{m}{CACHE_SUFFIX}" in bc
            torch.testing.assert_close(
                model.encode_features(m, bc).embed,
                model.encode_features(m, batch).embed,
                atol=2e-3,
                rtol=2e-3,
            )


def test_bad_towers(towers, tmp_path, monkeypatch):
    from common.config import ConfigError
    from models.encoders import build_encoder
    from pipelines.featurize import get_featurizer

    def feat(m, path, **kw):
        fc = _features(towers, **{m: {"tower": str(path), **kw}})
        return get_featurizer(m, fc)

    with pytest.raises(TowerError, match="tower directory not found: .*nowhere"):
        feat("text", tmp_path / "nowhere")
    bad = tmp_path / "malformed"
    shutil.copytree(towers["text"], bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(TowerError, match=f"{bad}.*config.json"):
        feat("text", bad)
    (bad / "config.json").unlink()
    with pytest.raises(TowerError, match="no config.json"):
        feat("text", bad)
    # processor not matching its model: a 64-pixel processor on a 32-pixel ViT
    mism = tmp_path / "vit_mismatch"
    shutil.copytree(towers["image"], mism)
    pp = json.loads((mism / "preprocessor_config.json").read_text())
    pp["size"] = {"height": 64, "width": 64}
    (mism / "preprocessor_config.json").write_text(json.dumps(pp))
    with pytest.raises(
        TowerError, match="processor does not match the model.*64x64.*image_size=32"
    ):
        feat("image", mism)
    # a tokenizer larger than the model's embeddings
    small = tmp_path / "bert_small_vocab"
    shutil.copytree(towers["text"], small)
    c = json.loads((small / "config.json").read_text())
    c["vocab_size"] = 10
    (small / "config.json").write_text(json.dumps(c))
    with pytest.raises(TowerError, match="tokenizer has .* the model's embeddings only 10"):
        feat("text", small)
    # text longer than the tower's positions (64)
    with pytest.raises(TowerError, match="max_len=100 exceeds the tower's 64"):
        feat("text", towers["text"], max_len=100)
    # hidden size / token count not fitting the connector
    f = feat("text", towers["text"])
    with pytest.raises(TowerError, match="hidden size 32 does not fit the connector.*48"):
        build_encoder("text", _model_cfg({"text": f}, text={"hidden": 48}))
    fi = feat("image", towers["image"])
    with pytest.raises(TowerError, match="gives 17 tokens .* at most 8"):
        build_encoder("image", _model_cfg({"image": fi}, image={"max_tokens": 8}))
    with pytest.raises(TowerError, match="revision .* differs"):
        build_encoder("text", _model_cfg({"text": f}, text={"revision": "0" * 16}))
    # a hub id with no network (offline mode keeps the test fast; the path is from_pretrained)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(TowerError, match="'someorg/tiny-tower' is not a local directory .*hub id"):
        feat("text", "someorg/tiny-tower")
    # unknown encoder kind / a tower on a modality towers do not serve
    from models import OmniConfig

    with pytest.raises(ConfigError, match="unknown kind 'nope'"):
        OmniConfig.from_name("tiny", modalities=["text"], encoders={"text": {"kind": "nope"}})
    with pytest.raises(ConfigError, match="no pretrained-tower featurizer for 'signal'"):
        from pipelines.config import FeatureConfig

        FeatureConfig.from_config_dict({"signal": {"tower": str(towers["text"])}})


@pytest.mark.slow
def test_end_to_end_prepare_train_export_evaluate_serve(
    ray_local, tiny_corpus, towers, tmp_path, capsys
):
    """Tiny towers through the whole job: prepare (text features cached by a Ray Data actor)
    -> train (2 workers, DeepSpeed ZeRO-2; align = the connector-only recipe, finetune trains
    the image tower's last layer) -> export (towers travel) -> evaluate -> serve over HTTP
    (INT8 replicas, batching, 4xx on bad input)."""
    import base64
    import json as _json
    import urllib.error
    import urllib.request

    import yaml
    from ray import serve

    from common.config import load_config
    from jobs import prepare
    from jobs.evaluation.config import EvalConfig
    from jobs.evaluation.run import run_evaluation
    from jobs.training.config import load_train_config
    from jobs.training.runner import run_training
    from serve.app import build_app
    from tests.test_serve import _free_port

    shards = tmp_path / "shards"
    rc = prepare.main(
        [
            "--manifest", str(tiny_corpus / "manifest.jsonl"), "--out", str(shards),
            "--config", "configs/data/omnidigits.yaml",
            f"features.text.tower={towers['text']}", "features.text.cache=true",
            "features.text.max_len=24",
            f"features.image.tower={towers['image']}",
            f"features.audio.tower={towers['audio']}", "features.audio.clip_seconds=0.5",
            "execution.progress_bars=false",
        ]
    )  # fmt: skip
    assert rc == 0
    rec = _json.loads((shards / "tower_cache.json").read_text())
    assert rec["text"]["revision"] == tower_revision(str(towers["text"]))
    import pyarrow.parquet as pq

    assert f"text{CACHE_SUFFIX}" in pq.read_table(shards / "train").column_names

    cfg = load_train_config(
        "configs/train/tiny.yaml",
        [
            f"data.shards_dir={shards}", f"runs_dir={tmp_path / 'runs'}",
            "data.modalities=[text,image,audio]", "pretrain.steps=2", "align.steps=3",
            "finetune.steps=2", "align.freeze=connectors", "finetune.towers={image: last_k}",
            "pretrain.checkpoint_every=2", "align.checkpoint_every=3",
            "finetune.checkpoint_every=2",
        ],
    )  # fmt: skip
    res = run_training(cfg, ["pretrain", "align", "finetune"])
    out = capsys.readouterr().out
    assert "[align] trainable parameters:" in out and "freeze=connectors" in out
    export = Path(res["export_dir"])
    mc = yaml.safe_load((export / "model_config.yaml").read_text())
    assert {m: mc["encoders"][m]["tower"] for m in ("text", "image", "audio")} == {
        "text": "towers/text", "image": "towers/image", "audio": "towers/audio"
    }  # fmt: skip

    ev = run_evaluation(export, shards, load_config(EvalConfig, "configs/eval/default.yaml", []))
    assert ev and "retrieval" in _json.dumps(ev)

    sargs = yaml.safe_load(Path("configs/serve/tiny.yaml").read_text())["applications"][0]["args"]
    sargs.update(export_dir=str(export), quantization="int8")
    sargs["gallery"]["split_dir"] = str(shards / "test")
    sargs["features"] = {"text": {"max_chars": 200}}
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})

    def post(body):
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/embeddings",
            data=_json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, _json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, _json.loads(e.read())

    try:
        serve.run(build_app(sargs), name="towers", route_prefix="/")
        png, _ = (
            __import__("pipelines.featurize", fromlist=["x"])
            .get_featurizer("image")
            .example(np.random.default_rng(0), 3)
        )
        code, body = post({"input": ["the digit seven", {"image": base64.b64encode(png).decode()}]})
        assert code == 200 and len(body["data"]) == 2
        assert all(np.isfinite(d["embedding"]).all() for d in body["data"])
        code, body = post({"input": [{"image": base64.b64encode(b"not a png").decode()}]})
        assert 400 <= code < 500, body
        code, body = post({"input": "x" * 500})
        assert code == 413, body
    finally:
        try:
            serve.delete("towers")
        finally:
            serve.shutdown()
