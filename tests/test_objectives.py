"""Objectives: contrastive (with gather_fn), reconstruction, captioning, classification,
MoE aux, composition, stages, and a tiny model that overfits a few pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import OmniConfig, build_model
from models.data import collate, synthetic_samples
from models.model import OmniOutput, ReconOutput
from models.objectives import (
    CaptioningLoss,
    ClassificationLoss,
    CompositeObjective,
    ContrastiveLoss,
    MaskedReconstructionLoss,
    MoEAuxLoss,
    chamfer_distance,
    stage_objective,
)


@pytest.fixture(autouse=True)
def _single_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def output(embeds: dict[str, torch.Tensor], present=None, scale: float = 10.0) -> OmniOutput:
    b = next(iter(embeds.values())).shape[0]
    present = present or {m: torch.ones(b, dtype=torch.bool) for m in embeds}
    return OmniOutput(
        embeds={m: F.normalize(e, dim=-1) for m, e in embeds.items()},
        present=present,
        logit_scale=torch.tensor(math.log(scale), requires_grad=True),
    )


def reference_infonce(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = scale * a @ b.t()
    idx = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, idx) + F.cross_entropy(logits.t(), idx))


# ---------------------------------------------------------------- contrastive
def test_contrastive_matches_reference_and_aligned_is_low() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    res = ContrastiveLoss()(output({"image": a, "text": b}), {})
    torch.testing.assert_close(res["loss"], reference_infonce(a, b, 10.0))
    assert "contrastive_image_text" in res
    aligned = ContrastiveLoss()(output({"image": torch.eye(6), "text": torch.eye(6)}, scale=50), {})
    assert float(aligned["loss"].detach()) < 1e-3 < float(res["loss"].detach())


def test_contrastive_skips_rows_missing_a_modality() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    present = {"image": torch.tensor([1, 1, 0, 1, 1]).bool(), "audio": torch.ones(5).bool()}
    res = ContrastiveLoss()(output({"image": a, "audio": b}, present), {})
    keep = present["image"]
    torch.testing.assert_close(res["loss"], reference_infonce(a[keep], b[keep], 10.0))


def test_contrastive_gather_fn_adds_remote_negatives_with_grad() -> None:
    """A gather_fn that concatenates another worker's rows gives the loss of the global
    batch, and gradients still reach the local embeddings."""
    g = torch.Generator().manual_seed(2)
    local_a = torch.randn(3, 8, generator=g, requires_grad=True)
    local_b = torch.randn(3, 8, generator=g)
    remote = {
        "a": F.normalize(torch.randn(3, 8, generator=g), dim=-1),
        "b": F.normalize(torch.randn(3, 8, generator=g), dim=-1),
    }
    calls = []

    def gather(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        if x.dim() == 2:
            other = remote["a"] if len(calls) == 1 else remote["b"]
            return torch.cat([x, other.to(x.dtype)], 0)
        return torch.cat([x, torch.ones_like(x)], 0)  # rows mask

    out = output({"image": local_a, "text": local_b})
    res = ContrastiveLoss(gather_fn=gather)(out, {})
    full_a = torch.cat([F.normalize(local_a, dim=-1), remote["a"]])
    full_b = torch.cat([F.normalize(local_b, dim=-1), remote["b"]])
    torch.testing.assert_close(res["loss"], reference_infonce(full_a, full_b, 10.0))
    res["loss"].backward()
    assert local_a.grad is not None and local_a.grad.abs().sum() > 0


def test_contrastive_multi_positive_labels() -> None:
    """Rows 0 and 1 share a label. Without labels InfoNCE prefers them apart (they are
    negatives of each other); with ``use_labels`` it prefers them together."""
    same = F.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]), dim=-1)
    apart = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]), dim=-1)
    batch = {"label": torch.tensor([3, 3, 5])}

    def loss(e: torch.Tensor, use_labels: bool) -> float:
        out = output({"image": e, "text": e.clone()}, scale=50)
        return float(ContrastiveLoss(use_labels=use_labels)(out, batch)["loss"].detach())

    assert loss(apart, False) < loss(same, False)
    assert loss(same, True) < loss(apart, True)
    # With labels the optimum is the entropy of the soft targets: (2/3) * log 2.
    assert loss(same, True) == pytest.approx(2 / 3 * math.log(2), abs=1e-4)


def test_contrastive_pairs_and_fused() -> None:
    g = torch.Generator().manual_seed(3)
    out = output({m: torch.randn(4, 8, generator=g) for m in ("text", "image", "audio")})
    out.fused = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    res = ContrastiveLoss(pairs=[("fused", "text"), ("image", "audio")])(out, {})
    assert {"contrastive_fused_text", "contrastive_image_audio"} <= set(res)
    assert "contrastive_text_image" not in res
    all_pairs = ContrastiveLoss()(out, {})
    assert sum(k.startswith("contrastive_") for k in all_pairs) == 3


def test_contrastive_needs_two_rows() -> None:
    out = output({"image": torch.randn(1, 8), "text": torch.randn(1, 8)})
    res = ContrastiveLoss()(out, {})
    assert float(res["loss"].detach()) == 0.0 and res["loss"].requires_grad


# ---------------------------------------------------------------- reconstruction
def recon_out(**recon: ReconOutput) -> OmniOutput:
    return OmniOutput(recon=recon, logit_scale=torch.tensor(0.0, requires_grad=True))


def test_recon_tokens_patches_points() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, False, True], [False, False, False]])  # row 1: nothing
    logits = torch.randn(2, 3, 11, generator=g)
    ids = torch.randint(0, 11, (2, 3), generator=g)
    patches_pred = torch.randn(2, 3, 4, generator=g)
    patches_tgt = torch.randn(2, 3, 4, generator=g) * 5 + 3
    pts = torch.randn(2, 3, 6 * 3, generator=g)
    loss = MaskedReconstructionLoss(norm_targets=True)
    res = loss(
        recon_out(
            text=ReconOutput(logits, ids, mask, "tokens"),
            image=ReconOutput(patches_pred, patches_tgt, mask, "patches"),
            pointcloud=ReconOutput(pts, pts.clone(), mask, "points"),
        ),
        {},
    )
    torch.testing.assert_close(res["recon_text"], F.cross_entropy(logits[mask], ids[mask]))
    t = patches_tgt[mask]
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    torch.testing.assert_close(res["recon_image"], F.mse_loss(patches_pred[mask], t))
    assert float(res["recon_pointcloud"]) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(
        res["loss"], (res["recon_text"] + res["recon_image"] + res["recon_pointcloud"]) / 3
    )


def test_chamfer_is_permutation_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, 3, generator=g)
    perm = a[:, torch.randperm(16, generator=g)]
    assert float(chamfer_distance(a, perm)) == pytest.approx(0.0, abs=1e-6)
    assert float(chamfer_distance(a, a + 0.5)) > 0.1


# ---------------------------------------------------------------- captioning / classification
def test_captioning_ignores_padding_and_missing_rows() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 7, 8, 2], [1, 9, 2, 0], [1, 5, 6, 2]])
    mask = ids != 0
    logits = torch.randn(3, 3, 12, generator=g)
    out = OmniOutput(
        caption_logits={"image": logits},
        present={"image": torch.tensor([True, True, False])},
        logit_scale=torch.tensor(0.0),
    )
    batch = {"text": ids, "text_mask": mask, "text_present": torch.ones(3, dtype=torch.bool)}
    res = CaptioningLoss()(out, batch)
    sel = mask[:, 1:].clone()
    sel[2] = False
    expect = F.cross_entropy(logits[sel], ids[:, 1:][sel])
    torch.testing.assert_close(res["caption_image"], expect)


def test_classification_ignores_unknown_labels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g)
    labels = torch.tensor([1, -100, 3, 0])
    out = OmniOutput(
        logits=logits,
        modality_logits={"audio": logits * 2},
        present={"audio": torch.tensor([True, True, True, False])},
        logit_scale=torch.tensor(0.0),
    )
    res = ClassificationLoss()(out, {"label": labels})
    keep = labels >= 0
    fused_keep = keep & out.present["audio"]  # row 3 has no modality at all
    torch.testing.assert_close(
        res["cls_fused"], F.cross_entropy(logits[fused_keep], labels[fused_keep])
    )
    audio_keep = keep & out.present["audio"]
    torch.testing.assert_close(
        res["cls_audio"], F.cross_entropy(2 * logits[audio_keep], labels[audio_keep])
    )


def test_moe_aux_weights() -> None:
    out = OmniOutput(aux={"moe_aux": torch.tensor(1.5), "moe_z": torch.tensor(4.0)})
    res = MoEAuxLoss(aux_weight=0.1, z_weight=0.01)(out, {})
    assert float(res["loss"]) == pytest.approx(0.19)
    assert float(res["moe_aux"]) == 1.5


# ---------------------------------------------------------------- composition and stages
def test_composite_sums_and_declares_keys() -> None:
    obj = CompositeObjective([ContrastiveLoss(weight=2.0), MoEAuxLoss(0.5, 0.0)])
    out = output({"image": torch.randn(4, 8), "text": torch.randn(4, 8)})
    out.aux = {"moe_aux": torch.tensor(1.0), "moe_z": torch.tensor(0.0)}
    res = obj(out, {})
    torch.testing.assert_close(res["loss"], 2.0 * res["contrastive"] + 0.5)
    assert "label" in obj.batch_keys
    with pytest.raises(ValueError, match="disagree"):
        CompositeObjective([MaskedReconstructionLoss(0.5), MaskedReconstructionLoss(0.7)])


@pytest.mark.parametrize("stage", ["pretrain", "align", "finetune"])
def test_stage_objectives_run_on_model(stage: str) -> None:
    cfg = OmniConfig.from_name("tiny", num_classes=10)
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = collate(
        synthetic_samples(cfg, 6, drop_one=True), label_names=[str(i) for i in range(10)]
    )
    obj = stage_objective(stage)
    res = obj(model(batch, **obj.model_kwargs), batch)
    assert torch.isfinite(res["loss"]) and res["loss"].requires_grad
    expected = {"pretrain": "recon", "align": "caption", "finetune": "classification"}[stage]
    assert expected in res
    with pytest.raises(ValueError, match="unknown stage"):
        stage_objective("bogus")


def test_tiny_model_overfits_paired_samples() -> None:
    """Contrastive training on 8 image-text pairs drives the loss down by a clear margin
    and makes image->text retrieval on them exact."""
    cfg = OmniConfig.from_name("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = collate(synthetic_samples(cfg, 8, seed=4, modalities=["image", "text"]))
    obj = CompositeObjective([ContrastiveLoss(), MoEAuxLoss()])
    opt = torch.optim.AdamW(model.parameter_groups(0.0), lr=2e-3)
    losses = []
    for _ in range(40):
        res = obj(model(batch), batch)
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        losses.append(float(res["contrastive"]))
    assert losses[-1] < 0.25 * losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model(batch)
    sims = out.embeds["image"] @ out.embeds["text"].t()
    assert torch.equal(sims.argmax(1), torch.arange(8))
