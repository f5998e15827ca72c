"""Sparse MoE trunk: routing, capacity, balance/z losses, fingerprints, implementations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import OmniConfig, build_model
from models.moe import (
    DenseFFN,
    MoETrunk,
    NativeMoE,
    TopKRouter,
    load_balancing_loss,
    router_z_loss,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _single_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def make_moe(**kw) -> NativeMoE:
    torch.manual_seed(0)
    args = dict(num_experts=4, top_k=2, capacity_factor=1.0, dropless=True)
    args.update(kw)
    return NativeMoE(8, 16, **args)


def naive_moe(moe: NativeMoE, x: torch.Tensor, keep: set[tuple[int, int]] | None = None):
    """Reference: per-token loop (what the grouped implementation must equal)."""
    weights, experts, _, _ = moe.router(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            e = int(experts[t, j])
            if keep is not None and (t, j) not in keep:
                continue
            out[t] += weights[t, j] * moe.experts[e](x[t : t + 1])[0]
    return out


def test_router_top_k_respected() -> None:
    torch.manual_seed(0)
    router = TopKRouter(8, num_experts=6, top_k=3)
    x = torch.randn(50, 8)
    w, e, probs, logits = router(x)
    assert e.shape == w.shape == (50, 3)
    # k distinct experts per token, the k most probable ones, weights renormalized.
    assert all(len(set(row)) == 3 for row in e.tolist())
    top = probs.topk(3, -1).indices.sort(-1).values
    assert torch.equal(e.sort(-1).values, top)
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    assert probs.dtype == torch.float32 and logits.shape == (50, 6)


def test_grouped_moe_equals_per_token_reference() -> None:
    moe = make_moe()
    x = torch.randn(37, 8)
    y, stats = moe(x)
    torch.testing.assert_close(y, naive_moe(moe, x), atol=1e-5, rtol=1e-5)
    assert int(stats.counts.sum()) == 37 * 2
    assert int(stats.dropped) == 0


def test_capacity_drops_counted_and_applied() -> None:
    moe = make_moe(dropless=False, capacity_factor=0.5)
    x = torch.randn(40, 8)
    y, stats = moe(x)
    cap = moe.capacity(40)
    assert cap == 10  # ceil(0.5 * 40 * 2 / 4)
    expected_drops = int((stats.counts - cap).clamp_min(0).sum())
    assert int(stats.dropped) == expected_drops > 0
    # Priority: first choices (k-major order) before second choices, then token order.
    _, experts, _, _ = moe.router(x)
    fill = [0] * 4
    keep = set()
    for j in range(2):
        for t in range(40):
            e = int(experts[t, j])
            if fill[e] < cap:
                fill[e] += 1
                keep.add((t, j))
    assert 80 - len(keep) == expected_drops
    torch.testing.assert_close(y, naive_moe(moe, x, keep), atol=1e-5, rtol=1e-5)


def test_aux_loss_decreases_toward_balance() -> None:
    """Toy problem: a router that sends everything to expert 0 learns to balance from the
    load-balancing loss alone (1.0 = perfectly balanced)."""
    torch.manual_seed(0)
    router = TopKRouter(8, num_experts=4, top_k=1)
    x = torch.randn(256, 8) + 0.5  # shared offset lets one expert dominate at init
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0] = 2.0
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    history = []
    for _ in range(150):
        _, e, probs, _ = router(x)
        loss = load_balancing_loss(probs, e, 4)
        history.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[0] > 3.0  # close to E=4 when (nearly) collapsed onto one expert
    assert history[-1] < 1.1
    counts = torch.bincount(router(x)[1].reshape(-1), minlength=4)
    assert int(counts.min()) >= 32  # every expert gets at least half its fair share (64)


def test_z_loss_shrinks_logits() -> None:
    torch.manual_seed(0)
    router = TopKRouter(8, num_experts=4, top_k=2)
    with torch.no_grad():
        router.weight.mul_(200.0)
    x = torch.randn(64, 8)
    opt = torch.optim.Adam(router.parameters(), lr=0.1)
    first = None
    for _ in range(30):
        z = router_z_loss(router(x)[3])
        first = float(z.detach()) if first is None else first
        opt.zero_grad()
        z.backward()
        opt.step()
    assert float(router_z_loss(router(x)[3]).detach()) < 0.5 * first


def test_router_fingerprint() -> None:
    """Fixed-seed numeric fingerprint of routing (catches silent math changes)."""
    moe = make_moe()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    y, stats = moe(x)
    got = [
        stats.counts.tolist(),
        round(float(stats.aux.detach()), 4),
        round(float(stats.z.detach()), 5),
        round(float(y.sum().detach()), 4),
    ]
    assert got[0] == ROUTER_FINGERPRINT[0], got
    assert got[1:] == pytest.approx(ROUTER_FINGERPRINT[1:], abs=2e-4), got


ROUTER_FINGERPRINT = [[6, 7, 10, 9], 1.0, 1.95963, 0.1477]


def test_trunk_routes_only_valid_tokens_and_reports_usage() -> None:
    cfg = OmniConfig.from_name("tiny")
    torch.manual_seed(0)
    trunk = MoETrunk(cfg)
    x = torch.randn(3, 10, cfg.d_model)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, :4] = True  # row 2 fully padded
    y, stats = trunk(x, mask)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert stats.counts.shape == (cfg.trunk_layers, cfg.num_experts)
    assert (stats.counts.sum(1) == 14 * cfg.top_k).all()
    # Padded tokens do not influence valid ones.
    x2 = x.clone()
    x2[1, 4:] = 100.0
    x2[2] = -50.0
    y2, _ = trunk(x2, mask)
    torch.testing.assert_close(y2[mask], y[mask], atol=1e-5, rtol=1e-5)


def test_expert_usage_per_modality_in_model_output() -> None:
    from models.data import collate, synthetic_samples

    cfg = OmniConfig.from_name("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(collate(synthetic_samples(cfg, 4, modalities=["image", "signal"])))
    assert set(out.expert_load) == {"image", "signal"}
    assert int(out.expert_load["image"][0].sum()) == 4 * 16 * cfg.top_k
    assert int(out.expert_load["signal"][0].sum()) == 4 * 24 * cfg.top_k
    assert out.dropped["image"].shape == (cfg.trunk_layers,)


def test_dense_ffn_has_moe_active_parameters() -> None:
    cfg = OmniConfig.from_name("tiny")
    moe = NativeMoE(cfg.d_model, cfg.ffn_hidden, num_experts=cfg.num_experts, top_k=cfg.top_k)
    dense = DenseFFN(cfg.d_model, cfg.ffn_hidden, num_experts=cfg.num_experts, top_k=cfg.top_k)
    per_expert = sum(p.numel() for p in moe.experts[0].parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    assert abs(n_dense - cfg.top_k * per_expert) <= cfg.d_model * cfg.top_k
    y, stats = dense(torch.randn(5, cfg.d_model))
    assert y.shape == (5, cfg.d_model) and float(stats.aux) == 0.0


def test_model_with_dense_trunk_runs() -> None:
    from models.data import collate, synthetic_samples

    cfg = OmniConfig.from_name("tiny", moe_impl="dense")
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(collate(synthetic_samples(cfg, 2, modalities=["text", "audio"])))
    assert out.fused.shape == (2, cfg.embed_dim)


DS_SCRIPT = r"""
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from models import OmniConfig, build_model
from models.data import collate, synthetic_samples
from jobs.training.engine import setup_expert_parallel
cfg = OmniConfig.from_name("tiny", moe_impl="deepspeed", ep_size=1)
torch.manual_seed(0)
model = build_model(cfg)
setup_expert_parallel(model)
batch = collate(synthetic_samples(cfg, 3, modalities=["text", "image"]))
out = model(batch)
(out.fused.sum() + out.aux["moe_aux"]).backward()
assert torch.isfinite(out.fused).all()
assert out.expert_load["image"].shape == (cfg.trunk_layers, cfg.num_experts)
assert int(out.expert_load["image"][0].sum()) == 3 * 16 * cfg.top_k, out.expert_load
missing = [n for n, p in model.named_parameters()
           if p.grad is None and n.startswith(("trunk", "encoders.image.blocks", "adapters.image"))]
assert not missing, missing
print("DS-MOE-OK", float(out.aux["moe_aux"]))
"""


@pytest.mark.slow
def test_deepspeed_moe_variant_same_interface(tmp_path: Path) -> None:
    """``moe_impl=deepspeed`` builds deepspeed.moe.layer.MoE trunk layers (run in a
    subprocess: it initializes a 1-rank gloo process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ds_moe.py"
    script.write_text(DS_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(port)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DS-MOE-OK" in proc.stdout


@pytest.mark.parametrize("align", [1, 16])
def test_grouped_gemm_path_matches_loop(align: int) -> None:
    """The fused grouped-GEMM path (used for bf16 on CUDA) equals the per-expert loop,
    forward and backward, including the row padding used for alignment."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    loop = make_moe(grouped_gemm="never")
    fused = make_moe(grouped_gemm="always")
    fused.align = align
    fused.load_state_dict(loop.state_dict())
    x = torch.randn(29, 8, generator=torch.Generator().manual_seed(5))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, sa = loop(xa)
    yb, sb = fused(xb)
    torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-5)
    assert torch.equal(sa.counts, sb.counts)
    (ya.square().sum() + sa.aux).backward()
    (yb.square().sum() + sb.aux).backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-5)
    for (name, pa), pb in zip(loop.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_grouped_gemm_path_runs_in_autocast_dtype() -> None:
    """Under bf16 autocast an fp32 model's grouped path runs its expert GEMMs in bf16
    (autocast does not cover ``torch._grouped_mm``; the fp32 residual stream would otherwise
    reach it), returns the input's dtype as the loop path does, and matches the fp32 loop to
    bf16 accuracy, gradients included."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    loop = make_moe(grouped_gemm="never")
    fused = make_moe(grouped_gemm="always")
    fused.load_state_dict(loop.state_dict())
    x = torch.randn(41, 8, generator=torch.Generator().manual_seed(7))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, _ = loop(xa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb, _ = fused(xb)
        yc, _ = make_moe(grouped_gemm="never")(xa.detach())
    assert yb.dtype == yc.dtype == torch.float32  # what the residual stream adds it to
    err = float((yb.detach() - ya.detach()).norm() / ya.detach().norm())
    assert 1e-4 < err < 2e-2  # bf16 GEMMs: close to fp32, but not fp32-exact
    ya.square().sum().backward()
    yb.float().square().sum().backward()
    assert xb.grad.dtype == torch.float32
    assert float((xb.grad - xa.grad).norm() / xa.grad.norm()) < 5e-2
    for pa, pb in zip(loop.parameters(), fused.parameters(), strict=True):
        if pa.grad is not None and pa.grad.norm() > 0:
            assert pb.grad.dtype == torch.float32
            assert float((pb.grad - pa.grad).norm() / pa.grad.norm()) < 5e-2


@pytest.mark.parametrize("residual", [torch.float32, torch.bfloat16])
def test_trunk_with_padding_under_autocast_on_the_grouped_path(residual) -> None:
    """The packed multi-modality trunk pass with padded items (gather/scatter of valid rows)
    under bf16 autocast on the grouped path, with an fp32 or a bf16 residual stream (what
    the encoders hand over differs): forward and backward run, the stream keeps its dtype,
    and each item's valid tokens match the separate fp32 passes to bf16 accuracy."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    from models.config import OmniConfig
    from models.trunk import MoETrunk

    torch.manual_seed(0)
    trunk = MoETrunk(OmniConfig.from_name("tiny"))
    for layer in trunk.layers:
        layer.ffn.grouped_gemm = "always"
    d = trunk.norm.normalized_shape[0]
    g = torch.Generator().manual_seed(3)
    items = []
    for b, n in ((3, 7), (2, 5)):
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[0, n - 2 :] = False  # padding: the gather/scatter path
        x = torch.randn(b, n, d, generator=g).to(residual).requires_grad_()
        items.append((x, mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = trunk.forward_many(items)
    sum(y[m].float().square().sum() for (y, _), (_, m) in zip(outs, items, strict=True)).backward()
    for (x, _), (y, _) in zip(items, outs, strict=True):
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert y.dtype == residual
    with torch.no_grad():
        for (x, m), (y, _) in zip(items, outs, strict=True):
            ref, _ = trunk(x.float(), m)
            err = float((y[m].detach().float() - ref[m]).norm() / ref[m].norm())
            assert err < 3e-2


def test_trunk_activation_checkpointing_same_result_less_memory() -> None:
    """``activation_checkpointing``: the same outputs, routing statistics and gradients as
    the plain trunk (packed and single passes), with a fraction of the saved activations."""
    from models.config import OmniConfig
    from models.trunk import MoETrunk

    torch.manual_seed(0)
    cfg = OmniConfig.from_name("tiny")
    plain, ckpt = MoETrunk(cfg), MoETrunk(cfg)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.activation_checkpointing = True
    g = torch.Generator().manual_seed(4)
    shapes = ((3, 9), (2, 6))
    xs = [torch.randn(b, n, cfg.d_model, generator=g) for b, n in shapes]
    masks = [torch.ones(b, n, dtype=torch.bool) for b, n in shapes]
    masks[0][1, 6:] = False

    def run(trunk):
        saved = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes())
            return t

        ins = [x.clone().requires_grad_() for x in xs]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = trunk.forward_many(list(zip(ins, masks, strict=True)))
            single, single_stats = trunk(ins[1], masks[1])
        loss = sum(y.square().sum() + s.aux + s.z for y, s in outs)
        (loss + single.sum() + single_stats.aux).backward()
        return outs, ins, sum(saved)

    outs_a, ins_a, bytes_a = run(plain)
    outs_b, ins_b, bytes_b = run(ckpt)
    for (ya, sa), (yb, sb) in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(yb, ya)
        assert torch.equal(sa.counts, sb.counts)
    for xa, xb in zip(ins_a, ins_b, strict=True):
        torch.testing.assert_close(xb.grad, xa.grad)
    for (name, pa), pb in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)
    assert bytes_b < 0.5 * bytes_a, (bytes_b, bytes_a)


def test_packed_attention_equals_padded_attention_at_valid_positions() -> None:
    """The trunk's packed attention (one stream of every item's valid tokens) gives, at every
    valid position, what ``Attention`` gives on each item's padded layout with its key mask;
    rows without any valid token (a missing modality) are empty sequences."""
    from models.layers import Attention
    from models.packing import TokenPacking, packed_attention

    torch.manual_seed(0)
    attn = Attention(32, 4)
    g = torch.Generator().manual_seed(5)
    shapes = ((3, 7), (4, 5), (2, 3))
    xs = [torch.randn(b, n, 32, generator=g) for b, n in shapes]
    masks = [torch.ones(b, n, dtype=torch.bool) for b, n in shapes]
    masks[0][1, 4:] = False
    masks[0][2] = False  # a row lacking the modality
    masks[1][0, 1:] = False
    pack = TokenPacking.build(masks, device=torch.device("cpu"))
    assert pack.sizes == [int(m.sum()) for m in masks] and pack.idx is not None
    assert pack.cu_seqlens.tolist()[-1] == sum(pack.sizes)
    assert pack.segments.tolist() == sum(([i] * n for i, n in enumerate(pack.sizes)), [])
    got = packed_attention(attn, pack.pack(xs), pack)
    want = torch.cat([attn(x, key_mask=m)[m] for x, m in zip(xs, masks, strict=True)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Unpacking puts every token back in place, zeros where padded.
    for y, x, m in zip(pack.unpack(pack.pack(xs)), xs, masks, strict=True):
        torch.testing.assert_close(y[m], x[m])
        assert not y[~m].any()


def test_trunk_output_is_zero_at_padding_and_full_items_skip_the_gather() -> None:
    cfg = OmniConfig.from_name("tiny")
    torch.manual_seed(0)
    trunk = MoETrunk(cfg).eval()
    x = torch.randn(2, 6, cfg.d_model)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    y, _ = trunk(x, mask)
    assert not y[~mask].any() and y[mask].abs().sum() > 0
    from models.packing import TokenPacking

    full = TokenPacking.build([torch.ones(2, 6, dtype=torch.bool)], device=x.device)
    assert full.idx is None and full.cu_seqlens.tolist() == [0, 6, 12]


def test_varlen_packing_layout_matches_padded_attention(monkeypatch) -> None:
    """What the GPU's variable-length kernel is handed: with a plain per-sequence reference
    in its place (the kernel itself needs CUDA), ``cu_seqlens`` over the packed stream cuts
    exactly each item's rows, and the trunk gives the padded path's results and gradients."""
    import torch.nn.functional as F

    import models.packing as moe

    calls = []

    def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
        assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
        bounds = cu_q.tolist()
        assert max(b - a for a, b in zip(bounds, bounds[1:], strict=False)) <= max_q
        calls.append(len(bounds) - 1)
        out = torch.zeros_like(q)
        for a, b in zip(bounds, bounds[1:], strict=False):
            if b > a:
                qs, ks, vs = (z[a:b].transpose(0, 1)[None] for z in (q, k, v))
                out[a:b] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
        return out

    monkeypatch.setattr(moe, "_varlen_attn", reference_varlen)
    monkeypatch.setattr(moe, "varlen_device", lambda device: True)
    monkeypatch.setattr(moe, "_varlen_supported", lambda q: True)
    cfg = OmniConfig.from_name("tiny")
    torch.manual_seed(0)
    trunk = MoETrunk(cfg)
    g = torch.Generator().manual_seed(6)
    items = []
    for b, n in ((3, 8), (2, 4), (4, 6)):
        mask = torch.rand(b, n, generator=g) > 0.3
        mask[:, 0] = True
        items.append((torch.randn(b, n, cfg.d_model, generator=g), mask))
    items[2][1][1] = False  # a row lacking the modality: an empty sequence

    def run(varlen: bool):
        trunk.zero_grad(set_to_none=True)
        trunk.varlen_attention = varlen
        ins = [(x.clone().requires_grad_(), m) for x, m in items]
        outs = trunk.forward_many(ins)
        sum(y.square().sum() for y, _ in outs).backward()
        return outs, ins, {k: p.grad.clone() for k, p in trunk.named_parameters()}

    outs_a, ins_a, grads_a = run(False)
    assert not calls
    outs_b, ins_b, grads_b = run(True)
    assert calls == [3 + 2 + 4] * cfg.trunk_layers
    for (ya, sa), (yb, sb) in zip(outs_a, outs_b, strict=True):
        torch.testing.assert_close(yb, ya, atol=1e-5, rtol=1e-4)
        assert torch.equal(sa.counts, sb.counts)
    for (xa, _), (xb, _) in zip(ins_a, ins_b, strict=True):
        torch.testing.assert_close(xb.grad, xa.grad, atol=1e-5, rtol=1e-4)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_trunk_rejects_a_mask_that_does_not_match_its_tokens() -> None:
    cfg = OmniConfig.from_name("tiny")
    trunk = MoETrunk(cfg)
    x = torch.randn(2, 5, cfg.d_model)
    with pytest.raises(ValueError, match=r"trunk item 1: tokens \(2, 5, .*mask \(2, 4\)"):
        trunk.forward_many(
            [(x, torch.ones(2, 5, dtype=torch.bool)), (x, torch.ones(2, 4, dtype=torch.bool))]
        )
