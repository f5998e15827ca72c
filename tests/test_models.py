"""Model tests: every registered encoder, the assembled model, modality separation,
save/load, freeze policies, decoding, INT8, collate and the size configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError
from models import ENCODERS, MODEL_SIZES, OmniConfig, OmniModel, build_encoder, build_model
from models.data import collate, synthetic_samples
from models.quant import count_quantized_linears, quantize_int8

REPO = Path(__file__).resolve().parents[1]
LABELS = [str(i) for i in range(10)]
#: The gate slots the fusion fingerprints were taken with (a new modality adds a slot).
SIX = ["text", "image", "audio", "video", "pointcloud", "signal"]


@pytest.fixture(autouse=True)
def _single_thread():
    # The CI box has 2 shared cores: intra-op threads only oversubscribe them.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def cfg() -> OmniConfig:
    return OmniConfig.from_name("tiny", num_classes=10)


def make_batch(cfg: OmniConfig, n: int = 4, seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    return collate(synthetic_samples(cfg, n, seed=seed, **kw), label_names=LABELS)


def fresh_model(cfg: OmniConfig, seed: int = 0, **kw) -> OmniModel:
    torch.manual_seed(seed)
    return build_model(cfg, **kw)


# ---------------------------------------------------------------- encoders (registry)
@pytest.mark.parametrize("modality", sorted(ENCODERS))
def test_encoder_contract(modality: str, cfg: OmniConfig) -> None:
    torch.manual_seed(0)
    enc = build_encoder(modality, cfg)
    batch = make_batch(cfg, n=3)
    tokens, mask = enc(batch)
    assert tokens.dim() == 3 and tokens.shape[0] == 3 and tokens.shape[2] == cfg.d_model
    assert mask.shape == tokens.shape[:2] and mask.dtype == torch.bool
    assert torch.isfinite(tokens).all()
    assert mask.any(1).all()
    # Masked modelling: targets per token, only valid tokens masked, at least one per row.
    out = enc.encode(batch, mask_ratio=0.5)
    assert out.masked is not None and out.targets is not None
    assert out.targets.shape[:2] == mask.shape
    assert not (out.masked & ~out.mask).any()
    assert (out.masked.sum(1) >= 1).all()
    # Gradient reaches every parameter (mask token only through masked encoding).
    (tokens.square().mean() + out.tokens.square().mean()).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("modality", sorted(ENCODERS))
def test_encoder_deterministic_under_seed(modality: str, cfg: OmniConfig) -> None:
    batch = make_batch(cfg, n=2)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        enc = build_encoder(modality, cfg)
        torch.manual_seed(7)
        outs.append(enc.encode(batch, mask_ratio=0.5))
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert torch.equal(outs[0].masked, outs[1].masked)


@pytest.mark.parametrize("modality", sorted(ENCODERS))
def test_encoder_rejects_wrong_shape(modality: str, cfg: OmniConfig) -> None:
    enc = build_encoder(modality, cfg)
    bad = {modality: torch.zeros(2, 3, dtype=torch.long if modality == "text" else torch.float)}
    if modality == "text":
        bad = {"text": torch.zeros(2, cfg.max_text_len + 5, dtype=torch.long)}
    with pytest.raises(ValueError):
        enc(bad)
    with pytest.raises(KeyError, match=modality):
        enc({})


def test_variable_length_padding_is_masked(cfg: OmniConfig) -> None:
    """Padding must not change a row's tokens: same sample alone vs padded in a batch."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    samples = synthetic_samples(cfg, 3, seed=1, modalities=["text", "audio"])
    samples[0]["text"] = samples[0]["text"][:5]
    samples[0]["audio"] = samples[0]["audio"][:40]
    alone = model(collate(samples[:1]))
    padded = model(collate(samples))
    for m in ("text", "audio"):
        assert padded.features[m].mask[0].sum() < padded.features[m].mask.shape[1]
        torch.testing.assert_close(alone.embeds[m][0], padded.embeds[m][0], atol=1e-5, rtol=1e-4)


def test_pointcloud_with_normals() -> None:
    """(N, 6) clouds (xyz + normals/colours) when configured; xyz-only input is refused."""
    c = OmniConfig.from_name(
        "tiny", encoders={"pointcloud": {"channels": 6}}, modalities=["pointcloud"]
    )
    torch.manual_seed(0)
    model = build_model(c)
    batch = collate(synthetic_samples(c, 2))
    assert batch["pointcloud"].shape == (2, 256, 6)
    out = model(batch)
    assert out.embeds["pointcloud"].shape == (2, c.embed_dim)
    with pytest.raises(ValueError, match="C>=6"):
        model({"pointcloud": torch.randn(2, 256, 3)})


def test_text_ids_out_of_range(cfg: OmniConfig) -> None:
    enc = build_encoder("text", cfg)
    with pytest.raises(ValueError, match="range"):
        enc({"text": torch.full((1, 4), cfg.vocab_size)})


# ---------------------------------------------------------------- the assembled model
def test_forward_shapes_and_fusion(cfg: OmniConfig) -> None:
    model = fresh_model(cfg)
    batch = make_batch(cfg, n=6, drop_one=True)
    out = model(batch)
    assert set(out.embeds) == set(cfg.modalities)
    for m, e in out.embeds.items():
        assert e.shape == (6, cfg.embed_dim)
        assert torch.isfinite(e).all()
        norms = e.norm(dim=-1)[out.present[m]]
        torch.testing.assert_close(norms, torch.ones_like(norms))
        assert out.pooled[m].shape == (6, cfg.d_model)
        assert out.expert_load[m].shape == (cfg.trunk_layers, cfg.num_experts)
        # Every valid token is routed to top_k experts in every layer (dropless).
        n_tok = int(out.features[m].mask.sum())
        assert (out.expert_load[m].sum(1) == n_tok * cfg.top_k).all()
    assert out.fused.shape == (6, cfg.embed_dim)
    assert out.gates.shape == (6, len(cfg.modalities))
    assert out.fusion_modalities == cfg.modalities
    # Row i lacks modality i % M: its gate is exactly 0, the others are > 0.
    n_mod = len(cfg.modalities)
    for i in range(6):
        assert out.gates[i, i % n_mod] == 0
        assert (out.gates[i, torch.arange(n_mod) != i % n_mod] > 0).all()
    assert out.logits.shape == (6, 10)
    assert all(math.isfinite(float(v.detach())) for v in out.aux.values())


def test_fusion_masks_missing_modality_not_zero_fill(cfg: OmniConfig) -> None:
    """A row lacking audio fuses exactly like the same row in a batch without audio, and
    whatever sits in its (zero-filled) audio slot has no influence."""
    model = fresh_model(cfg).eval()
    samples = synthetic_samples(cfg, 3, seed=2, modalities=["image", "audio", "text"])
    samples[1]["audio"] = None
    with_missing = model(collate(samples))
    only_two = model(collate([{k: v for k, v in samples[1].items() if k != "audio"}]))
    torch.testing.assert_close(with_missing.fused[1], only_two.fused[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(with_missing.gates[1], only_two.gates[0], atol=1e-5, rtol=1e-4)
    # Garbage in the absent row's audio slot changes nothing.
    batch = collate(samples)
    batch["audio"][1] = 1e3
    perturbed = model(batch)
    torch.testing.assert_close(perturbed.fused[1], with_missing.fused[1], atol=1e-5, rtol=1e-4)
    audio_slot = cfg.modalities.index("audio")
    assert with_missing.gates[1, audio_slot] == 0


def test_fusion_fingerprint() -> None:
    """Fixed-seed numeric fingerprint of the gated fusion (catches silent math changes)."""
    from models.fusion import GatedFusion

    c = OmniConfig.from_name(
        "tiny", d_model=16, n_heads=2, fusion_heads=2, embed_dim=8, modalities=SIX
    )
    torch.manual_seed(0)
    fusion = GatedFusion(c)
    g = torch.Generator().manual_seed(1)
    mods = ["text", "image", "audio"]
    pooled = {m: torch.randn(2, 16, generator=g) for m in mods}
    tokens = {m: torch.randn(2, 3, 16, generator=g) for m in mods}
    masks = {m: torch.ones(2, 3, dtype=torch.bool) for m in mods}
    present = {m: torch.tensor([True, m != "audio"]) for m in mods}
    fused, gates = fusion(pooled, tokens, masks, present)
    assert gates[1, 2] == 0
    got = [
        round(float(x.detach()), 4) for x in (fused.sum(), fused[0, 0], gates.sum(), gates[0, 1])
    ]
    assert got == pytest.approx(FUSION_FINGERPRINT, abs=2e-4), got


FUSION_FINGERPRINT = [-0.8271, 0.2299, 2.5354, 0.5252]


def test_fusion_matches_gate_formula() -> None:
    """With the cross-attention output zeroed, fusion is exactly
    g = sigmoid(W_g [h_1; ...; h_M] + b_g) (missing slots hold the learned stand-in),
    g_missing = 0, h = sum_i g_i * h_i, fused = normalize(proj(LN(h)))."""
    from models.fusion import GatedFusion

    c = OmniConfig.from_name(
        "tiny", d_model=16, n_heads=2, fusion_heads=2, embed_dim=8, modalities=SIX
    )
    torch.manual_seed(0)
    fusion = GatedFusion(c)
    with torch.no_grad():
        fusion.cross_attn.proj.weight.zero_()
        fusion.cross_attn.proj.bias.zero_()
    h = {"text": torch.randn(2, 16), "signal": torch.randn(2, 16)}
    toks = {m: torch.randn(2, 4, 16) for m in h}
    masks = {m: torch.ones(2, 4, dtype=torch.bool) for m in h}
    present = {"text": torch.tensor([True, True]), "signal": torch.tensor([True, False])}
    fused, gates = fusion(h, toks, masks, present)
    slots = []
    for i, m in enumerate(c.modalities):
        miss = fusion.missing[i].expand(2, 16)
        slots.append(torch.where(present[m][:, None], h[m], miss) if m in h else miss)
    cat = torch.cat(slots, -1)  # (B, M*d)
    g = torch.sigmoid(cat @ fusion.gate.weight.t() + fusion.gate.bias).view(2, -1, 16)
    pres = torch.stack(
        [present[m] if m in h else torch.zeros(2, dtype=torch.bool) for m in c.modalities], 1
    )
    g = g * pres[..., None]
    hh = (g * torch.stack(slots, 1)).sum(1)
    expect = torch.nn.functional.normalize(fusion.proj(fusion.norm(hh)), dim=-1)
    torch.testing.assert_close(fused, expect)
    torch.testing.assert_close(gates, g.mean(-1))
    assert gates[1, c.modalities.index("signal")] == 0


def test_every_parameter_gets_gradient_in_combined_loss(cfg: OmniConfig) -> None:
    from itertools import combinations

    from models.objectives import (
        caption_loss,
        info_nce,
        masked_cross_entropy,
        moe_aux_terms,
        recon_loss,
    )

    model = fresh_model(cfg).train()
    batch = make_batch(cfg, n=12, drop_one=True)
    torch.manual_seed(0)
    out = model(batch, mask_ratio=0.5, recon_cross=True, caption=True)
    labels, pres = batch["label"], out.present
    terms = [recon_loss(r) for r in out.recon.values()]
    terms += [
        info_nce(out.embeds[a], out.embeds[b], pres[a], pres[b], out.logit_scale)
        for a, b in combinations(out.embeds, 2)
    ]
    terms += [
        caption_loss(lg, batch["text"], pres[m] & batch["text_present"], batch["text_mask"])
        for m, lg in out.caption_logits.items()
    ]
    terms.append(masked_cross_entropy(out.logits, labels, labels >= 0))
    terms += [
        masked_cross_entropy(lg, labels, pres[m] & (labels >= 0))
        for m, lg in out.modality_logits.items()
    ]
    terms += list(moe_aux_terms(out.aux, 0.01, 0.001).values())
    loss = torch.stack(terms).sum()
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, bad


def test_text_only_forward_touches_no_other_branch(cfg: OmniConfig) -> None:
    model = fresh_model(cfg)
    fired: list[str] = []
    for m in cfg.modalities:
        if m == "text":
            continue
        for part in (model.encoders[m], model.adapters[m], model.projections[m]):
            part.register_forward_hook(lambda mod, i, o, m=m: fired.append(m))
    batch = collate(synthetic_samples(cfg, 3, modalities=["text"]))
    out = model(batch, caption=True)
    (out.embeds["text"].sum() + out.fused.sum()).backward()
    assert fired == []
    assert set(out.embeds) == {"text"}
    for m in cfg.modalities:
        if m == "text":
            continue
        for name, p in model.named_parameters():
            if name.startswith((f"encoders.{m}.", f"adapters.{m}.", f"projections.{m}.")):
                assert p.grad is None, name
    assert any(p.grad is not None for p in model.encoders["text"].parameters())


def test_modalities_argument_restricts_and_validates(cfg: OmniConfig) -> None:
    model = fresh_model(cfg, modalities=["text", "image"])
    batch = make_batch(cfg, n=2)
    out = model(batch)
    assert set(out.embeds) == {"text", "image"}
    assert set(model(batch, modalities=["image"]).embeds) == {"image"}
    with pytest.raises(KeyError, match="not loaded"):
        model(batch, modalities=["audio"])


def test_parts_argument_runs_only_named_parts(cfg: OmniConfig) -> None:
    """A training stage names the optional parts its losses read; the rest do not run."""
    model = fresh_model(cfg)
    batch = make_batch(cfg, n=3)
    full = model(batch, mask_ratio=0.4, caption=True)
    assert full.fused is not None and full.recon and full.caption_logits
    assert full.logits is not None and full.modality_logits
    only = model(batch, mask_ratio=0.4, caption=True, parts=["recon"])
    assert only.fused is None and only.gates is None and only.logits is None
    assert not only.modality_logits and not only.caption_logits
    assert set(only.recon) == set(full.recon)
    for m, e in only.embeds.items():  # the branches themselves are unchanged
        assert e.shape == full.embeds[m].shape
    with pytest.raises(ValueError, match="unknown parts"):
        model(batch, parts=["fusion", "juicer"])


def test_model_deterministic_under_seed(cfg: OmniConfig) -> None:
    batch = make_batch(cfg, n=3)
    a = fresh_model(cfg, seed=3)
    b = fresh_model(cfg, seed=3)
    torch.manual_seed(0)
    oa = a(batch, mask_ratio=0.4)
    torch.manual_seed(0)
    ob = b(batch, mask_ratio=0.4)
    assert torch.equal(oa.fused, ob.fused)
    for m in oa.recon:
        assert torch.equal(oa.recon[m].pred, ob.recon[m].pred)
    c = fresh_model(cfg, seed=4)
    assert not torch.equal(c(batch).fused, a(batch).fused)


def test_masked_modelling_outputs(cfg: OmniConfig) -> None:
    model = fresh_model(cfg)
    batch = make_batch(cfg, n=3)
    out = model(batch, mask_ratio={"image": 0.75, "text": 0.3}, recon_cross=False)
    assert set(out.recon) == {"image", "text"}
    r = out.recon["image"]
    assert r.kind == "patches" and not r.cross
    assert r.pred.shape == r.target.shape == (3, 16, cfg.encoder_section("image").patch ** 2 * 3)
    assert (r.mask.sum(1) == 12).all()  # 75% of 16 patches
    t = out.recon["text"]
    assert t.kind == "tokens" and t.pred.shape[-1] == cfg.vocab_size
    assert t.target.dtype == torch.long
    cross = model(batch, mask_ratio=0.5)
    assert all(r.cross for r in cross.recon.values())


# ---------------------------------------------------------------- split API, decoding
def test_split_api_matches_forward(cfg: OmniConfig) -> None:
    model = fresh_model(cfg).eval()
    batch = make_batch(cfg, n=3, modalities=["image", "audio"])
    out = model(batch)
    feats = {m: model.encode_features(m, batch) for m in ("image", "audio")}
    # The forward packs both modalities into one trunk pass: same per-token results and
    # the same per-modality expert usage as separate passes.
    for m, f in feats.items():
        torch.testing.assert_close(out.embeds[m], f.embed)
        assert torch.equal(out.expert_load[m], f.stats.counts)
    fused, gates = model.fuse_features(feats)
    torch.testing.assert_close(fused, out.fused)
    torch.testing.assert_close(gates, out.gates)
    torch.testing.assert_close(model.classify(fused), out.logits)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_from_features(cfg: OmniConfig, num_beams: int) -> None:
    model = fresh_model(cfg).eval()
    batch = make_batch(cfg, n=2, modalities=["image"])
    feats = {"image": model.encode_features("image", batch)}
    ids = model.generate_from_features(feats, max_len=6, num_beams=num_beams)
    assert len(ids) == 2
    for seq in ids:
        assert len(seq) <= 6
        assert all(0 <= t < cfg.vocab_size and t not in (cfg.eos_id, cfg.pad_id) for t in seq)
    again = model.generate_from_features(feats, max_len=6, num_beams=num_beams)
    assert ids == again


def test_greedy_decoding_follows_argmax(cfg: OmniConfig) -> None:
    """Greedy output equals step-by-step argmax of the teacher-forced logits."""
    model = fresh_model(cfg).eval()
    batch = make_batch(cfg, n=1, modalities=["signal"])
    feats = {"signal": model.encode_features("signal", batch)}
    memory, mask = model._memory(feats)
    ids = torch.tensor([[cfg.bos_id]])
    for _ in range(4):
        nxt = model.decoder(ids, memory, mask)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    expect = []
    for t in ids[0, 1:].tolist():
        if t in (cfg.eos_id, cfg.pad_id):
            break
        expect.append(t)
    assert model.generate_from_features(feats, max_len=4)[0] == expect


def test_beam_search_scores_at_least_greedy(cfg: OmniConfig) -> None:
    """Beam search finds a sequence whose length-normalized log-prob is >= greedy's."""
    model = fresh_model(cfg, seed=5).eval()
    batch = make_batch(cfg, n=1, modalities=["image"])
    feats = {"image": model.encode_features("image", batch)}
    memory, mask = model._memory(feats)

    def score(seq: list[int]) -> float:
        ids = torch.tensor([[cfg.bos_id, *seq, cfg.eos_id]])
        logp = model.decoder(ids[:, :-1], memory, mask).log_softmax(-1)
        tgt = ids[:, 1:]
        n = len(seq) + 1 if len(seq) < 5 else len(seq)
        return float(logp.gather(-1, tgt[..., None])[0, :n, 0].sum().detach()) / n

    greedy = model.generate_from_features(feats, max_len=5, num_beams=1)[0]
    beam = model.generate_from_features(feats, max_len=5, num_beams=4)[0]
    assert score(beam) >= score(greedy) - 1e-4


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip(cfg: OmniConfig, tmp_path: Path) -> None:
    model = fresh_model(cfg).eval()
    batch = make_batch(cfg, n=3, drop_one=True)
    ref = model(batch)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "model_config.yaml"]
    loaded = OmniModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    got = loaded(batch)
    assert torch.equal(got.fused, ref.fused)
    for m in ref.embeds:
        assert torch.equal(got.embeds[m], ref.embeds[m])


def test_load_single_branch(cfg: OmniConfig, tmp_path: Path) -> None:
    model = fresh_model(cfg).eval()
    model.save_pretrained(tmp_path)
    image_only = OmniModel.from_pretrained(tmp_path, modalities=["image"], parts=[])
    assert list(image_only.encoders) == ["image"]
    assert image_only.fusion is None and image_only.decoder is None
    assert image_only.num_parameters() < model.num_parameters() / 2
    batch = make_batch(cfg, n=2, modalities=["image"])
    torch.testing.assert_close(
        image_only.encode_features("image", batch).embed,
        model.encode_features("image", batch).embed,
    )
    with pytest.raises(RuntimeError, match="fusion"):
        image_only.fuse_features({})


def test_load_heads_only_for_fusion_replica(cfg: OmniConfig, tmp_path: Path) -> None:
    """``modalities=[]`` loads fusion/decoder/classifier without any branch or trunk and
    fuses/decodes features computed elsewhere exactly like the full model."""
    model = fresh_model(cfg).eval()
    model.save_pretrained(tmp_path)
    head = OmniModel.from_pretrained(
        tmp_path, modalities=[], parts=["fusion", "decoder", "classifier"]
    )
    assert head.trunk is None and len(head.encoders) == 0
    batch = make_batch(cfg, n=2, modalities=["image", "audio"])
    feats = {m: model.encode_features(m, batch) for m in ("image", "audio")}
    assert torch.equal(head.fuse_features(feats)[0], model.fuse_features(feats)[0])
    assert head.generate_from_features(feats, max_len=4) == model.generate_from_features(
        feats, max_len=4
    )
    q = head.quantize_dynamic()
    torch.testing.assert_close(
        q.fuse_features(feats)[0], model.fuse_features(feats)[0], atol=0.05, rtol=0
    )


def test_load_errors(tmp_path: Path, cfg: OmniConfig) -> None:
    with pytest.raises(FileNotFoundError):
        OmniModel.from_pretrained(tmp_path)
    model = fresh_model(cfg, modalities=["text"])
    model.save_pretrained(tmp_path)
    # The config lists all modalities but the weights only hold text: clear error.
    with pytest.raises(KeyError, match="lacks"):
        OmniModel.from_pretrained(tmp_path, modalities=["image"])
    # Loading never unpickles: torch.load must not be used anywhere in models/.
    for path in (REPO / "models").rglob("*.py"):
        assert "torch.load(" not in path.read_text(), path


# ---------------------------------------------------------------- freeze policies
def test_freeze_policies(cfg: OmniConfig) -> None:
    model = fresh_model(cfg)
    model.freeze(encoders=True, trunk_top_k=1)
    assert not any(p.requires_grad for p in model.encoders.parameters())
    layers = model.trunk.layers
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[-1].parameters())
    assert all(p.requires_grad for p in model.fusion.parameters())
    n_trainable = model.num_parameters(trainable_only=True)
    groups = model.parameter_groups(0.1)
    assert sum(p.numel() for g in groups for p in g["params"]) == n_trainable
    model.freeze(encoders=False, trunk_top_k=0)
    assert all(p.requires_grad for p in model.encoders.parameters())
    assert not any(p.requires_grad for p in model.trunk.parameters())
    model.unfreeze()
    assert model.num_parameters(trainable_only=True) == model.num_parameters()


# ---------------------------------------------------------------- INT8
def test_int8_agrees_with_fp32(cfg: OmniConfig) -> None:
    model = fresh_model(cfg).eval()
    batch = make_batch(cfg, n=4)
    q = quantize_int8(model)
    n_q, n_fp = count_quantized_linears(q)
    assert n_fp == 0 and n_q > 50
    # Every expert MLP is covered.
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    assert isinstance(q.trunk.layers[0].ffn.experts[-1].fc1, QLinear)
    with torch.no_grad():
        ref, got = model(batch), q(batch)
    for m in ref.embeds:
        cos = torch.nn.functional.cosine_similarity(ref.embeds[m], got.embeds[m], dim=-1)
        assert cos.min() > 0.98, (m, cos)
    assert torch.nn.functional.cosine_similarity(ref.fused, got.fused, dim=-1).min() > 0.98
    with pytest.raises(TypeError, match="quantized"):
        q.save_pretrained(Path("/nonexistent-never-written"))


# ---------------------------------------------------------------- collate
def test_collate_shapes_and_padding(cfg: OmniConfig) -> None:
    samples = synthetic_samples(cfg, 4, drop_one=True)
    samples[3]["label"] = "not-a-class"
    batch = collate(samples, label_names=LABELS)
    assert batch["text"].dtype == torch.int64 and batch["image"].dtype == torch.uint8
    assert batch["audio"].dtype == torch.float32 and batch["video"].dtype == torch.uint8
    lengths = [0 if s["text"] is None else len(s["text"]) for s in samples]
    assert batch["text"].shape == (4, max(lengths))
    assert batch["text_mask"].sum(1).tolist() == lengths
    assert batch["text_present"].tolist() == [False, True, True, True]
    assert batch["image_present"].tolist() == [True, False, True, True]
    assert batch["image"][1].sum() == 0
    assert batch["label"].tolist() == [0, 1, 2, -100]
    assert not batch["audio_mask"][2].any()  # row lacking audio has no valid frame
    only_text = collate([{"text": np.array([1, 5, 2])}], modalities=["text", "image"])
    assert only_text["image_present"].tolist() == [False] and "image" not in only_text


@pytest.mark.parametrize(
    "sample, match",
    [
        ({"image": np.zeros((32, 32), np.uint8)}, "dims"),
        ({"text": np.array([1.5, 2.0])}, "integer"),
        ({"signal": np.full((3, 128), np.nan, np.float16)}, "NaN"),
        ({"audio": np.zeros((0, 40), np.float16)}, "empty"),
        ({"color": np.zeros(3)}, None),
    ],
)
def test_collate_rejects_bad_input(sample, match) -> None:
    if match is None:
        with pytest.raises(ValueError, match="unknown modalities"):
            collate([sample], modalities=["color"])
        return
    with pytest.raises(ValueError, match=match):
        collate([sample])
    with pytest.raises(ValueError, match="at least one"):
        collate([])


def test_collate_mismatched_fixed_dims() -> None:
    a = {"image": np.zeros((32, 32, 3), np.uint8)}
    b = {"image": np.zeros((16, 16, 3), np.uint8)}
    with pytest.raises(ValueError, match="sample 1"):
        collate([a, b])


# ---------------------------------------------------------------- configs and sizes
@pytest.mark.parametrize("name", sorted(MODEL_SIZES))
def test_named_size_round_trips_and_applies_presets(name: str, tmp_path: Path) -> None:
    """MODEL_SIZES (+ each encoder's presets) is the one source of a size; what a run saves
    (``model_config.yaml``: every section resolved) loads back equal."""
    cfg = OmniConfig.from_name(name)
    assert list(cfg.encoders) == [m for m in cfg.modalities if m in ENCODERS]
    for m, enc in ENCODERS.items():
        section = cfg.encoder_section(m)
        for key, value in enc.presets.get(name, {}).items():
            assert getattr(section, key) == value, (m, key)
    cfg.save_yaml(tmp_path / "model_config.yaml")
    assert OmniConfig.from_yaml(tmp_path / "model_config.yaml") == cfg
    assert not (REPO / "configs" / "model").exists()  # no YAML mirror to drift


#: A ``model_config.yaml`` written before encoder sections existed (flat per-modality keys).
OLD_EXPORT = {
    "name": "tiny",
    "modalities": ["text", "image", "audio", "video", "pointcloud", "signal"],
    "d_model": 64,
    "n_heads": 4,
    "expert_hidden": 128,
    "num_classes": 10,
    "vocab_size": 300,
    "max_text_len": 32,
    "image_size": 32,
    "image_patch": 4,
    "image_stem": "linear",
    "audio_bins": 20,
    "audio_max_frames": 64,
    "audio_patch": 8,
    "video_frames": 4,
    "video_size": 32,
    "video_patch": 16,
    "video_tubelet": 2,
    "pointcloud_points": 128,
    "pointcloud_channels": 6,
    "pointcloud_groups": 8,
    "pointcloud_group_size": 16,
    "signal_channels": 2,
    "signal_length": 64,
    "signal_patch": 16,
}


def test_old_flat_model_config_still_loads(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "model_config.yaml"
    path.write_text(yaml.safe_dump(OLD_EXPORT))
    cfg = OmniConfig.from_yaml(path)
    assert cfg == OmniConfig.from_dict(OLD_EXPORT)
    assert cfg.encoders["image"] == {"size": 32, "patch": 4, "stem": "linear"}
    assert cfg.encoders["audio"] == {"bins": 20, "max_frames": 64, "patch": 8}
    assert cfg.encoder_section("pointcloud").channels == 6
    assert cfg.encoder_section("signal").length == 64
    # The resolved form round-trips, and a model built from it takes matching items.
    cfg.save_yaml(tmp_path / "new.yaml")
    assert OmniConfig.from_yaml(tmp_path / "new.yaml") == cfg
    model = build_model(cfg)
    out = model(make_batch(cfg, n=2))
    assert set(out.embeds) == set(cfg.modalities)
    # Legacy keys also work as overrides; explicit sections win over them.
    c = OmniConfig.from_name("tiny", image_patch=4, encoders={"image": {"patch": 16}})
    assert c.encoder_section("image").patch == 16


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="unknown model size"):
        OmniConfig.from_name("huge")
    with pytest.raises(ConfigError, match="unknown key"):
        OmniConfig.from_name("tiny", not_a_field=1)
    with pytest.raises(ConfigError, match="unknown key"):
        OmniConfig.from_name("tiny", encoders={"image": {"not_a_field": 1}})
    with pytest.raises(ConfigError, match="unknown modalities"):
        OmniConfig.from_name("tiny", encoders={"smell": {}})
    with pytest.raises(ConfigError, match="top_k"):
        OmniConfig.from_name("tiny", top_k=9)
    with pytest.raises(ConfigError, match=r"encoders.image.*divide"):
        OmniConfig.from_name("tiny", image_patch=5)
    with pytest.raises(ConfigError, match=r"stem must be conv\|linear, got .resnet."):
        OmniConfig.from_name("tiny", image_stem="resnet")
    with pytest.raises(ConfigError, match="power-of-two patch, got 3"):
        OmniConfig.from_name("tiny", encoders={"image": {"size": 24, "patch": 3}})
    with pytest.raises(ConfigError, match=r"encoders.signal.*length % patch"):
        OmniConfig.from_name("tiny", encoders={"signal": {"length": 100}})
    # A linear patch embedding takes any patch that divides the image.
    assert OmniConfig.from_name("tiny", image_size=24, image_patch=3, image_stem="linear")


@pytest.mark.parametrize("modality", sorted(ENCODERS))
def test_sizes_for_inverts_input_shape(modality: str, cfg: OmniConfig) -> None:
    """An encoder sized from an item shape takes items of exactly that shape."""
    enc = ENCODERS[modality]
    shape = enc.input_shape(cfg, cfg.encoder_section(modality))
    section = cfg.encoder_section(modality, {**cfg.encoders[modality], **enc.sizes_for(shape)})
    assert enc.input_shape(cfg, section) == shape


def test_linear_image_stem_encodes() -> None:
    """``image_stem: linear`` (plain ViT patch embedding) gives the same token layout."""
    cfg = OmniConfig.from_name("tiny", image_stem="linear")
    model = build_model(cfg, modalities=["image"], parts=[]).eval()
    sec = cfg.encoder_section("image")
    img = torch.randint(0, 256, (2, sec.size, sec.size, 3), dtype=torch.uint8)
    with torch.no_grad():
        tokens, mask = model.encoders["image"]({"image": img})
    n = (sec.size // sec.patch) ** 2
    assert tokens.shape == (2, n, cfg.d_model) and mask.all()
    assert torch.isfinite(tokens).all()


def test_sizes_parameter_budget() -> None:
    from models.sizes import size_report

    tiny = size_report("tiny")
    assert tiny["total_params"] < 2_000_000
    base = size_report("base")
    assert base["d_model"] == 768 and base["trunk_layers"] == 12 and base["num_experts"] >= 8
    # Sparse: the trunk holds far more parameters than a token uses.
    for r in (tiny, size_report("small"), base):
        assert r["trunk_params"] > 1.5 * r["trunk_active_params_per_token"]
