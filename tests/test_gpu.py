"""The GPU paths (skipped without CUDA; run them where a GPU is lent).

CI machines have no GPU, so what only a GPU exercises is tested here: the grouped-GEMM MoE
in bf16, and a real Ray Train + DeepSpeed job with ``use_gpu`` (NCCL, DeepSpeed bf16) through
all three stages and the export.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jobs.training.config import load_train_config
from jobs.training.metrics import read_jsonl
from jobs.training.synthetic import write_synthetic_shards
from models.moe import NativeMoE

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_grouped_moe_bf16_matches_fp32_loop_on_cuda() -> None:
    """The fused path (``torch._grouped_mm``, bf16) against the per-expert loop in fp32:
    outputs and every gradient agree to bf16 accuracy."""
    torch.manual_seed(0)
    ref = NativeMoE(64, 256, num_experts=8, top_k=2, grouped_gemm="never").cuda()
    fused = NativeMoE(64, 256, num_experts=8, top_k=2, grouped_gemm="auto").cuda()
    fused = fused.to(torch.bfloat16)
    # The reference holds the bf16-rounded weights and inputs in fp32: both route alike
    # (the router runs in fp32 either way) and only the GEMM precision differs.
    ref.load_state_dict({k: v.float() for k, v in fused.state_dict().items()})
    x = torch.randn(1000, 64, device="cuda").to(torch.bfloat16)
    xa, xb = x.float().requires_grad_(), x.clone().requires_grad_()
    assert fused._use_grouped(xb)
    ya, sa = ref(xa)
    yb, sb = fused(xb)
    assert torch.equal(sa.counts, sb.counts)
    assert _rel(yb, ya) < 1e-2
    ya.square().sum().backward()
    yb.float().square().sum().backward()
    assert _rel(xb.grad, xa.grad) < 3e-2
    for (name, pa), pb in zip(ref.named_parameters(), fused.parameters(), strict=True):
        assert _rel(pb.grad, pa.grad) < 3e-2, name


def test_packed_trunk_varlen_attention_matches_padded_path_on_cuda(monkeypatch) -> None:
    """The trunk's variable-length flash attention (bf16, CUDA) against its portable padded
    path on the same weights and inputs, with padded rows and a missing row: the valid
    outputs and every gradient agree to bf16 accuracy, and the varlen kernel really ran."""
    import models.moe as moe
    from models.config import OmniConfig

    if moe._varlen_attn is None:
        pytest.skip("torch.nn.attention.varlen not available")
    calls = []
    real = moe._varlen_attn
    monkeypatch.setattr(moe, "_varlen_attn", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    cfg = OmniConfig.from_name("small")
    trunk = moe.MoETrunk(cfg).cuda().to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    items = []
    for b, n in ((16, 33), (16, 64), (8, 9)):
        mask = torch.rand(b, n, generator=g) > 0.2
        mask[:, 0] = True
        mask[1] = False  # a row lacking the modality
        x = torch.randn(b, n, cfg.d_model, generator=g).to("cuda", torch.bfloat16)
        items.append((x, mask.cuda()))

    def run(varlen: bool):
        trunk.zero_grad(set_to_none=True)
        trunk.varlen_attention = varlen
        ins = [(x.clone().requires_grad_(), m) for x, m in items]
        outs = trunk.forward_many(ins)
        loss = sum(y[m].float().square().mean() for (y, _), (_, m) in zip(outs, ins, strict=True))
        loss.backward()
        grads = {
            k: p.grad.float().clone() for k, p in trunk.named_parameters() if p.grad is not None
        }
        return (
            [y[m].float() for (y, _), (_, m) in zip(outs, ins, strict=True)],
            [x.grad.float() for x, _ in ins],
            grads,
        )

    ya, xa, ga = run(False)
    assert not calls
    yb, xb, gb = run(True)
    assert len(calls) == cfg.trunk_layers
    for a, b in zip(ya + xa, yb + xb, strict=True):
        assert _rel(b, a) < 2e-2
    assert ga.keys() == gb.keys()
    for k in ga:
        if ga[k].norm() > 0:
            assert _rel(gb[k], ga[k]) < 5e-2, k


@pytest.mark.slow
def test_ray_train_on_gpu_bf16_three_stages_and_export(ray_local, tmp_path, probe_outputs) -> None:
    """``use_gpu``: one Ray Train worker on the GPU, NCCL, DeepSpeed bf16 (ZeRO-2), all three
    stages; the loop logs model TFLOP/s and MFU, and the fp32 export embeds the probe rows
    as the bf16 engine did (to bf16 accuracy)."""
    from jobs.training.runner import run_training

    shards = write_synthetic_shards(str(tmp_path / "shards"), n=96, seed=0)
    cfg = load_train_config(
        str(ROOT / "configs/train/tiny.yaml"),
        [
            f"data.shards_dir={shards}",
            f"runs_dir={tmp_path / 'runs'}",
            "scaling.num_workers=1",
            "scaling.use_gpu=true",
            "scaling.gpus_per_worker=1",
            "scaling.cpus_per_worker=1",
            "deepspeed.zero_stage=2",
            "pretrain.steps=10",
            "align.steps=6",
            "finetune.steps=6",
            "log_every=2",
        ],
    )
    res = run_training(cfg, ["pretrain", "align", "finetune"])
    run_dir = Path(res["run_dir"])
    rows = [r for r in read_jsonl(str(run_dir / "metrics.jsonl")) if "loss" in r]
    assert {r["stage"] for r in rows} == {"pretrain", "align", "finetune"}
    assert all(r["model_tflops_per_s"] > 0 for r in rows)
    if "H100" in torch.cuda.get_device_name():
        assert all(0 < r["mfu"] < 1 for r in rows)
    # The export is fp32 on the CPU; the engine computed the probe in bf16 on the GPU.
    out, expect = probe_outputs(run_dir, "finetune", res["export_dir"], shards)
    for m, e in out.embeds.items():
        cos = F.cosine_similarity(e, expect[f"embed/{m}"].float(), dim=-1)
        assert float(cos.min()) > 0.98, m
