"""The loss library that training calls (``models.objectives``): InfoNCE with label
positives and an injected cross-worker gather, masked reconstruction with and without
patch-target normalization, captioning, classification, MoE aux; and the stage wiring
(``jobs.training.stage``) that calls them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.model import ReconOutput
from models.objectives import (
    IGNORE_INDEX,
    caption_loss,
    chamfer_distance,
    info_nce,
    masked_cross_entropy,
    moe_aux_terms,
    recon_loss,
)


@pytest.fixture(autouse=True)
def _single_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def unit(*shape: int, seed: int = 0, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    return x.requires_grad_(requires_grad)


def ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def log_scale(s: float, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(math.log(s), dtype=torch.float64, requires_grad=requires_grad)


def reference_infonce(
    a: torch.Tensor,
    b: torch.Tensor,
    pa: torch.Tensor,
    pb: torch.Tensor,
    scale: float,
    labels: torch.Tensor | None = None,
    *,
    queries: range | None = None,
) -> torch.Tensor:
    """Row-by-row InfoNCE written independently of the library: queries are the rows of
    ``queries`` having both modalities; keys are all rows having the key modality;
    positives are the row itself and (with labels) every key of the same known class."""
    n = a.shape[0]
    queries = queries if queries is not None else range(n)
    total = 0.0
    for q, k, pk in ((a, b, pb), (b, a, pa)):
        keys = [j for j in range(n) if pk[j]]
        per_row = []
        for i in queries:
            if not (pa[i] and pb[i]):
                continue
            logp = torch.log_softmax(scale * q[i] @ k[keys].t(), 0)
            pos = [
                c
                for c, j in enumerate(keys)
                if j == i or (labels is not None and labels[i] >= 0 and labels[i] == labels[j])
            ]
            per_row.append(-logp[pos].mean())
        total = total + torch.stack(per_row).mean()
    return total / 2


# ---------------------------------------------------------------- InfoNCE
def test_info_nce_matches_the_clip_reference() -> None:
    a, b = unit(6, 8, seed=0), unit(6, 8, seed=1)
    loss = info_nce(a, b, ones(6), ones(6), log_scale(10.0))
    idx = torch.arange(6)
    logits = 10.0 * a @ b.t()
    clip = 0.5 * (F.cross_entropy(logits, idx) + F.cross_entropy(logits.t(), idx))
    torch.testing.assert_close(loss, clip)
    torch.testing.assert_close(loss, reference_infonce(a, b, ones(6), ones(6), 10.0))


def test_info_nce_sign_and_scale() -> None:
    """Identical embeddings give log(n) (uniform softmax), aligned ones ~0, and a gradient
    step lowers the loss by pulling each pair together (a flipped sign would push apart)."""
    n = 5
    same = F.normalize(torch.ones(n, 4, dtype=torch.float64), dim=-1)
    uniform = info_nce(same, same, ones(n), ones(n), log_scale(20.0))
    assert float(uniform) == pytest.approx(math.log(n), abs=1e-6)
    eye = torch.eye(n, dtype=torch.float64)
    assert float(info_nce(eye, eye, ones(n), ones(n), log_scale(50.0))) < 1e-6
    # The temperature is clamped: a huge logit_scale acts as max_scale.
    a, b = unit(n, 8, seed=2), unit(n, 8, seed=3)
    clamped = info_nce(a, b, ones(n), ones(n), log_scale(1e6), max_scale=7.0)
    torch.testing.assert_close(clamped, info_nce(a, b, ones(n), ones(n), log_scale(7.0)))

    a = a.clone().requires_grad_(True)
    loss = info_nce(a, b, ones(n), ones(n), log_scale(10.0))
    assert float(loss) > 0
    loss.backward()
    with torch.no_grad():
        stepped = F.normalize(a - 0.1 * a.grad, dim=-1)
        after = info_nce(stepped, b, ones(n), ones(n), log_scale(10.0))
        assert float(after) < float(loss)
        assert float((stepped * b).sum(1).mean()) > float((a * b).sum(1).mean())


def test_info_nce_presence_selects_queries_and_keys() -> None:
    a, b = unit(6, 8, seed=4), unit(6, 8, seed=5)
    pa = torch.tensor([1, 1, 0, 1, 1, 1]).bool()
    pb = torch.tensor([1, 1, 1, 1, 0, 1]).bool()
    loss = info_nce(a, b, pa, pb, log_scale(10.0))
    torch.testing.assert_close(loss, reference_infonce(a, b, pa, pb, 10.0))
    # No row has both: a zero that is still part of the graph.
    scale = log_scale(10.0, requires_grad=True)
    none = info_nce(a, b, pa & ~pb, pb & ~pa, scale)
    assert float(none) == 0.0 and none.requires_grad


def test_info_nce_label_positives() -> None:
    """Rows 0 and 1 share a label. Without labels they are each other's negatives; with
    labels they are positives, and the optimum is the entropy of the soft targets."""
    same = F.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]]), dim=-1)
    apart = F.normalize(torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]]), dim=-1)
    labels = torch.tensor([3, 3, 5])

    def loss(e: torch.Tensor, lab: torch.Tensor | None) -> float:
        return float(info_nce(e, e.clone(), ones(3), ones(3), log_scale(50.0), labels=lab))

    assert loss(apart, None) < loss(same, None)
    assert loss(same, labels) < loss(apart, labels)
    assert loss(same, labels) == pytest.approx(2 / 3 * math.log(2), abs=1e-4)
    # Unknown labels are never positives of each other.
    unknown = torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 5])
    assert loss(same, unknown) == pytest.approx(loss(same, None), abs=1e-6)
    a, b = unit(8, 6, seed=6), unit(8, 6, seed=7)
    lab = torch.tensor([0, 1, 0, 2, 1, IGNORE_INDEX, 2, IGNORE_INDEX])
    pa = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1]).bool()
    got = info_nce(a, b, pa, ones(8), log_scale(5.0), labels=lab)
    torch.testing.assert_close(got, reference_infonce(a, b, pa, ones(8), 5.0, lab))


@pytest.mark.parametrize("rank", [0, 1])
def test_info_nce_injected_gather_adds_remote_keys(rank: int) -> None:
    """A gather that places another worker's rows before/after ours (``rank``) gives local
    queries against every key, with this worker's own pairs at ``rank*B + i``; gradients
    reach the local embeddings through the gather."""
    bsz = 3
    a = unit(bsz, 8, seed=8, requires_grad=True)
    b = unit(bsz, 8, seed=9)
    remote = {"a": unit(bsz, 8, seed=10), "b": unit(bsz, 8, seed=11)}
    remote_meta = torch.tensor([[1.0, 1.0, 2.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    calls: list[tuple[int, ...]] = []

    def gather(x: torch.Tensor) -> torch.Tensor:
        other = [remote["a"], remote["b"], remote_meta.to(x.dtype)][len(calls)]
        calls.append(tuple(x.shape))
        return torch.cat([x, other] if rank == 0 else [other, x], 0)

    labels = torch.tensor([1, 0, 2])
    loss = info_nce(
        a, b, ones(bsz), ones(bsz), log_scale(10.0), labels=labels, gather=gather, rank=rank
    )
    assert calls == [(bsz, 8), (bsz, 8), (bsz, 3)]
    parts = [(a, b, ones(bsz), ones(bsz), labels)]
    rp = (remote["a"], remote["b"], remote_meta[:, 0] > 0, remote_meta[:, 1] > 0)
    parts.insert(1 - rank, (*rp, remote_meta[:, 2].long()))
    full = [torch.cat(x) for x in zip(*parts, strict=True)]
    local = range(rank * bsz, rank * bsz + bsz)
    torch.testing.assert_close(loss, reference_infonce(*full[:4], 10.0, full[4], queries=local))
    loss.backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0


# ---------------------------------------------------------------- reconstruction
def test_recon_patches_with_and_without_target_normalization() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    pred = torch.randn(2, 3, 4, generator=g)
    tgt = torch.randn(2, 3, 4, generator=g) * 5 + 3
    r = ReconOutput(pred, tgt, mask, "patches")
    raw = recon_loss(r)  # the default: raw targets, what the demo trains
    torch.testing.assert_close(raw, F.mse_loss(pred[mask], tgt[mask]))
    t = tgt[mask]
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=False) + 1e-6).sqrt()
    normed = recon_loss(r, norm_pix_targets=True)
    torch.testing.assert_close(normed, F.mse_loss(pred[mask], t))
    # Normalized targets ignore a per-patch affine change of the target; raw ones do not.
    shifted = ReconOutput(pred, tgt * 2 + 1, mask, "patches")
    torch.testing.assert_close(recon_loss(shifted, norm_pix_targets=True), normed)
    assert float(recon_loss(shifted)) > float(raw)
    # Sign: a perfect prediction scores 0 and a gradient step lowers the loss.
    assert float(recon_loss(ReconOutput(tgt, tgt, mask, "patches"))) == 0.0
    p = pred.clone().requires_grad_(True)
    loss = recon_loss(ReconOutput(p, tgt, mask, "patches"))
    loss.backward()
    stepped = recon_loss(ReconOutput(p.detach() - 0.1 * p.grad, tgt, mask, "patches"))
    assert float(stepped) < float(loss)


def test_recon_tokens_points_and_nothing_masked() -> None:
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    logits = torch.randn(2, 3, 11, generator=g)
    ids = torch.randint(0, 11, (2, 3), generator=g)
    got = recon_loss(ReconOutput(logits, ids, mask, "tokens"))
    torch.testing.assert_close(got, F.cross_entropy(logits[mask], ids[mask]))
    pts = torch.randn(2, 3, 6 * 3, generator=g)
    perm = pts.view(2, 3, 6, 3)[:, :, torch.randperm(6, generator=g)].reshape(2, 3, 18)
    # Points ignore norm_pix_targets, and a permuted point group is a perfect prediction.
    points = recon_loss(ReconOutput(perm, pts, mask, "points"), norm_pix_targets=True)
    assert float(points) == pytest.approx(0.0, abs=1e-6)
    assert float(recon_loss(ReconOutput(pts + 0.5, pts, mask, "points"))) > 0.1
    pred = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    empty = recon_loss(ReconOutput(pred, pred.detach(), torch.zeros(2, 3).bool(), "patches"))
    assert float(empty) == 0.0 and empty.requires_grad


def test_chamfer_is_permutation_invariant() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 16, 3, generator=g)
    perm = a[:, torch.randperm(16, generator=g)]
    assert float(chamfer_distance(a, perm)) == pytest.approx(0.0, abs=1e-6)
    assert float(chamfer_distance(a, a + 0.5)) > 0.1


# ---------------------------------------------------------------- captioning / classification
def test_caption_loss_ignores_padding_and_rows_without_a_pair() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 7, 8, 2], [1, 9, 2, 0], [1, 5, 6, 2]])
    logits = torch.randn(3, 3, 12, generator=g)
    rows = torch.tensor([True, True, False])
    sel = (ids[:, 1:] != 0) & rows[:, None]
    expect = F.cross_entropy(logits[sel], ids[:, 1:][sel])
    torch.testing.assert_close(caption_loss(logits, ids, rows, ids != 0), expect)
    torch.testing.assert_close(caption_loss(logits, ids, rows), expect)  # pad_id 0
    # Sign: logits peaked on the right next token score ~0, on a wrong one score high.
    right = F.one_hot(ids[:, 1:], 12).double() * 30
    wrong = F.one_hot((ids[:, 1:] + 1) % 12, 12).double() * 30
    assert float(caption_loss(right, ids, rows)) < 1e-6 < 10 < float(caption_loss(wrong, ids, rows))
    empty = caption_loss(logits.requires_grad_(True), ids, torch.zeros(3).bool())
    assert float(empty) == 0.0 and empty.requires_grad


def test_masked_cross_entropy_over_selected_rows() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, generator=g)
    labels = torch.tensor([1, IGNORE_INDEX, 3, 0])
    rows = (labels != IGNORE_INDEX) & torch.tensor([True, True, True, False])
    got = masked_cross_entropy(logits, labels, rows)
    torch.testing.assert_close(got, F.cross_entropy(logits[rows], labels[rows]))
    empty = masked_cross_entropy(logits.requires_grad_(True), labels, torch.zeros(4).bool())
    assert float(empty) == 0.0 and empty.requires_grad


def test_moe_aux_terms_are_weighted() -> None:
    terms = moe_aux_terms({"moe_aux": torch.tensor(1.5), "moe_z": torch.tensor(4.0)}, 0.1, 0.01)
    assert float(terms["moe_aux"]) == pytest.approx(0.15)
    assert float(terms["moe_z"]) == pytest.approx(0.04)
    assert moe_aux_terms({}, 0.1, 0.01) == {}


# ---------------------------------------------------------------- what the training loop calls
def test_stage_recon_uses_the_configured_target_normalization() -> None:
    from jobs.training.config import StageSection
    from jobs.training.stage import StageObjective

    g = torch.Generator().manual_seed(2)
    r = ReconOutput(
        torch.randn(2, 3, 4, generator=g),
        torch.rand(2, 3, 4, generator=g) * 9,
        ones(6).view(2, 3),
        "patches",
    )
    for norm in (False, True):
        obj = StageObjective(
            "align", StageSection(norm_pix_targets=norm), modalities=[], label_names=[]
        )
        torch.testing.assert_close(obj._recon(r), recon_loss(r, norm_pix_targets=norm))
    assert StageSection().norm_pix_targets is False  # today's training behaviour


def test_stage_align_terms_are_the_library_losses() -> None:
    """The align stage's terms on a tiny model equal the library functions applied to its
    forward output (weights 1): what trains is what these tests check."""
    from jobs.training.config import StageSection
    from jobs.training.stage import StageObjective
    from models import OmniConfig, build_model
    from models.data import collate, synthetic_samples

    cfg = OmniConfig.from_name("tiny", num_classes=10)
    torch.manual_seed(0)
    model = build_model(cfg)
    names = [str(i) for i in range(10)]
    batch = collate(synthetic_samples(cfg, 6, drop_one=True), label_names=names)
    mods = [m for m in batch if f"{m}_present" in batch]
    st = StageSection(pairs=[[mods[0], mods[1]], [mods[1], mods[2]]], label_positives=True)
    obj = StageObjective("align", st, modalities=mods, label_names=names, pairs=st.pairs)
    torch.manual_seed(1)
    terms, out = obj(model, batch, step=len(mods) - 1)  # masks the last modality
    assert torch.isfinite(terms["loss"]) and terms["loss"].requires_grad
    a, b = mods[0], mods[1]
    expect = info_nce(
        out.embeds[a],
        out.embeds[b],
        out.present[a],
        out.present[b],
        out.logit_scale,
        max_scale=cfg.max_logit_scale,
        labels=batch["label"],
    )
    torch.testing.assert_close(terms[f"nce_{a}_{b}"], expect)
    for m, r in out.recon.items():
        torch.testing.assert_close(terms[f"xrecon_{m}"], recon_loss(r))
    assert any(k.startswith("caption_") for k in terms)
    others = sum(v for k, v in terms.items() if k != "loss")
    torch.testing.assert_close(terms["loss"], others)


def test_tiny_model_overfits_paired_samples() -> None:
    """InfoNCE training on 8 image-text pairs drives the loss down by a clear margin and
    makes image->text retrieval on them exact."""
    from models import OmniConfig, build_model
    from models.data import collate, synthetic_samples

    cfg = OmniConfig.from_name("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = collate(synthetic_samples(cfg, 8, seed=4, modalities=["image", "text"]))
    opt = torch.optim.AdamW(model.parameter_groups(0.0), lr=2e-3)
    losses = []
    for _ in range(40):
        out = model(batch)
        nce = info_nce(
            out.embeds["image"],
            out.embeds["text"],
            out.present["image"],
            out.present["text"],
            out.logit_scale,
        )
        loss = nce + sum(moe_aux_terms(out.aux, 0.01, 0.001).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(nce))
    assert losses[-1] < 0.25 * losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model(batch)
    sims = out.embeds["image"] @ out.embeds["text"].t()
    assert torch.equal(sims.argmax(1), torch.arange(8))
