"""Model cost benchmark: sparse vs dense trunk, modality-separated cost, INT8, GPU MFU.

Usage (CPU, the default; writes ``benchmarks/results/model_cost.json``)::

    .venv/bin/python benchmarks/model_cost.py [--size small] [--threads 1] [--reps 10]

With ``--device cuda`` it measures the bf16 MFU of the ``base`` trunk (forward+backward)
and writes ``benchmarks/results/model_cost_cuda.json``.

Targets: sparse trunk fwd+bwd <= 1.3x a dense trunk with the same *active* parameters
while holding >= 4x its parameters; text-only forward <= 35% of an all-modality forward;
INT8 inference >= 1.5x faster than fp32 with embedding cosine >= 0.99; base trunk MFU
>= 35% on an H100.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jobs.training.metrics import peak_bf16_tflops  # noqa: E402
from models import OmniConfig, build_model  # noqa: E402
from models.data import collate, synthetic_samples  # noqa: E402
from models.moe import MoETrunk  # noqa: E402


def timeit(
    fn: Callable[[], object],
    reps: int,
    warmup: int = 2,
    sync: Callable | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Fastest time (s) of ``fn`` over ``reps`` runs after ``warmup`` runs.

    The minimum (not the mean) is the robust statistic on a machine shared with other
    jobs: interference only ever adds time.
    """
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(reps):
        t0 = clock()
        fn()
        if sync:
            sync()
        times.append(clock() - t0)
    return min(times)


def cpu_compare(
    fn_a: Callable[[], object], fn_b: Callable[[], object], reps: int, warmup: int = 2
) -> tuple[float, float]:
    """Min CPU seconds of ``fn_a`` and ``fn_b``, measured alternately so that both see the
    same background load (the box is shared with other jobs)."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t0 = time.process_time()
            fn()
            acc.append(time.process_time() - t0)
    return min(ta), min(tb)


def cpu_timeit(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Like :func:`timeit` but in CPU seconds of this process (``time.process_time``):
    with one intra-op thread it measures the work done, not the time spent waiting for a
    core that other processes hold."""
    return timeit(fn, reps, warmup, clock=time.process_time)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def trunk_sparse_vs_dense(cfg: OmniConfig, batch: int, seq: int, reps: int) -> dict:
    """Forward+backward of the MoE trunk vs a dense trunk with the same active params."""
    torch.manual_seed(0)
    sparse = MoETrunk(cfg)
    dense = MoETrunk(cfg.replace(moe_impl="dense"))
    x = torch.randn(batch, seq, cfg.d_model)
    mask = torch.ones(batch, seq, dtype=torch.bool)

    def step(trunk: MoETrunk) -> Callable[[], None]:
        def run() -> None:
            trunk.zero_grad(set_to_none=True)
            y, stats = trunk(x, mask)
            (y.square().mean() + 0.01 * stats.aux).backward()

        return run

    t_sparse, t_dense = cpu_compare(step(sparse), step(dense), reps)
    ffn_sparse = sum(n_params(layer.ffn) for layer in sparse.layers)
    ffn_dense = sum(n_params(layer.ffn) for layer in dense.layers)
    return {
        "config": {
            "d_model": cfg.d_model,
            "trunk_layers": cfg.trunk_layers,
            "num_experts": cfg.num_experts,
            "top_k": cfg.top_k,
            "expert_hidden": cfg.ffn_hidden,
            "tokens": batch * seq,
        },
        "sparse_fwd_bwd_cpu_s": t_sparse,
        "dense_fwd_bwd_cpu_s": t_dense,
        "time_ratio_sparse_over_dense": t_sparse / t_dense,
        "trunk_params_sparse": n_params(sparse),
        "trunk_params_dense": n_params(dense),
        "trunk_param_ratio": n_params(sparse) / n_params(dense),
        "ffn_param_ratio": ffn_sparse / ffn_dense,
        "target_time_ratio_max": 1.3,
        "target_param_ratio_min": 4.0,
    }


def tiny_step(reps: int) -> dict:
    """Forward+backward of the ``tiny`` model on a batch of 8 with all six modalities."""
    cfg = OmniConfig.from_name("tiny", num_classes=10)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = collate(synthetic_samples(cfg, 8, seed=0), label_names=[str(i) for i in range(10)])

    def run() -> None:
        model.zero_grad(set_to_none=True)
        out = model(batch, mask_ratio=0.5, caption=True)
        loss = sum(e.square().mean() for e in out.embeds.values()) + out.fused.square().mean()
        loss.backward()

    return {
        "params": model.num_parameters(),
        "batch": 8,
        "fwd_bwd_cpu_s": cpu_timeit(run, reps),
        "fwd_bwd_wall_s": timeit(run, reps),
    }


def modality_separation(model, cfg: OmniConfig, batch_size: int, reps: int) -> dict:
    """Inference cost of a text-only forward vs an all-modality forward."""
    samples = synthetic_samples(cfg, batch_size, seed=0)
    full = collate(samples)
    text = collate(samples, modalities=["text"])
    with torch.no_grad():
        t_full, t_text = cpu_compare(lambda: model(full), lambda: model(text), reps)
        per_mod = {
            m: cpu_timeit(lambda m=m: model.encode_features(m, full), reps) for m in cfg.modalities
        }
    return {
        "batch": batch_size,
        "all_modalities_forward_cpu_s": t_full,
        "text_only_forward_cpu_s": t_text,
        "text_only_fraction": t_text / t_full,
        "encode_features_cpu_s": per_mod,
        "target_fraction_max": 0.35,
    }


def int8_vs_fp32(model, cfg: OmniConfig, batch_size: int, reps: int, modalities=None) -> dict:
    """Dynamic INT8 vs fp32 inference speed and embedding agreement."""
    from models.quant import quantize_int8

    q = quantize_int8(model)
    batch = collate(synthetic_samples(cfg, batch_size, seed=1, modalities=modalities))
    with torch.no_grad():
        t_fp, t_q = cpu_compare(lambda: model(batch), lambda: q(batch), reps)
        ref, got = model(batch), q(batch)
    cos = {
        m: float(F.cosine_similarity(ref.embeds[m], got.embeds[m], dim=-1).min())
        for m in ref.embeds
    }
    if ref.fused is not None:
        cos["fused"] = float(F.cosine_similarity(ref.fused, got.fused, dim=-1).min())
    return {
        "size": cfg.name,
        "modalities": list(ref.embeds),
        "batch": batch_size,
        "fp32_forward_cpu_s": t_fp,
        "int8_forward_cpu_s": t_q,
        "speedup": t_fp / t_q,
        "min_cosine": cos,
        "min_cosine_overall": min(cos.values()),
        "target_speedup_min": 1.5,
        "target_cosine_min": 0.99,
    }


def int8_base(batch_size: int, reps: int, modalities: list[str] | None = None) -> dict:
    """INT8 vs fp32 on the ``base`` model (d=768): the whole model (six modalities, fusion,
    heads), or only the given branches + trunk (e.g. ``["text"]``, the serving case).

    On an AVX2 CPU without VNNI, int8 GEMMs beat fp32 ones by ~2x only when the matrices
    are large: at ``small``'s d=128 a quantized Linear is ~1.3x faster than fp32 (profiled),
    and the non-Linear ops (attention, GELU, norms, routing) stay as they are.
    """
    cfg = OmniConfig.from_name("base")
    torch.manual_seed(0)
    parts = None if modalities is None else []
    model = build_model(cfg, modalities=modalities, parts=parts).eval()
    return int8_vs_fp32(model, cfg, batch_size, reps, modalities=modalities)


def cuda_mfu(
    size: str,
    batch: int,
    seq: int,
    reps: int,
    device: str = "cuda",
    profile: bool = False,
    compile_layers: bool = False,
) -> dict:
    """bf16 forward+backward MFU of the ``size`` trunk on the current CUDA device."""
    dev = torch.device(device)
    is_cuda = dev.type == "cuda"
    cfg = OmniConfig.from_name(size)
    torch.manual_seed(0)
    trunk = MoETrunk(cfg).to(dev, torch.bfloat16)
    if compile_layers:
        # Fuses the elementwise work around the GEMMs and cuts kernel launches; the
        # dropless grouped-GEMM MoE path has static shapes, so each block traces whole.
        for i, layer in enumerate(trunk.layers):
            trunk.layers[i] = torch.compile(layer)
    x = torch.randn(batch, seq, cfg.d_model, device=dev, dtype=torch.bfloat16)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=dev)

    def run() -> None:
        trunk.zero_grad(set_to_none=True)
        y, stats = trunk(x, mask)
        (y.float().square().mean() + 0.01 * stats.aux).backward()

    t = timeit(run, reps, warmup=3, sync=torch.cuda.synchronize if is_cuda else None)
    if profile and is_cuda:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    # Matmul FLOPs per token and layer (forward): 2 x active weights (attention projections,
    # router, top_k experts) + attention scores/values 2 x 2 x seq x d. Backward = 2x forward.
    with torch.device("meta"):
        meta = build_model(cfg)
    active = meta.active_parameters_per_token()  # trunk only
    attn = 4 * seq * cfg.d_model * cfg.trunk_layers
    flops = 3 * (2 * active + attn) * batch * seq
    name = torch.cuda.get_device_name() if is_cuda else "cpu"
    peak = peak_bf16_tflops(name) or 989.4
    achieved = flops / t / 1e12
    return {
        "device": name,
        "size": size,
        "batch": batch,
        "seq": seq,
        "tokens": batch * seq,
        "trunk_active_params_per_token": active,
        "fwd_bwd_s": t,
        "achieved_tflops": achieved,
        "peak_bf16_tflops": peak,
        "mfu": achieved / peak,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if is_cuda else None,
        "torch_compile": compile_layers,
        "target_mfu_min": 0.35,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="small", help="model size for the CPU measurements")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32, help="inference batch (CPU)")
    ap.add_argument("--trunk-batch", type=int, default=64)
    ap.add_argument("--trunk-seq", type=int, default=64)
    ap.add_argument("--trunk-experts", type=int, default=16, help="experts of the sparse trunk")
    ap.add_argument("--base-batch", type=int, default=8, help="batch of the base INT8 run")
    ap.add_argument("--skip-base-int8", action="store_true", help="skip the base INT8 run")
    ap.add_argument("--gpu-size", default="base")
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--gpu-seq", type=int, default=512)
    ap.add_argument("--profile", action="store_true", help="print top CUDA kernels")
    ap.add_argument("--compile", action="store_true", help="torch.compile each trunk block")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    result: dict = {
        "benchmark": "model_cost",
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
        result["cuda_mfu"] = cuda_mfu(
            args.gpu_size,
            args.gpu_batch,
            args.gpu_seq,
            args.reps,
            profile=args.profile,
            compile_layers=args.compile,
        )
        out = args.out or REPO / "benchmarks" / "results" / "model_cost_cuda.json"
    else:
        torch.set_num_threads(args.threads)
        result["threads"] = args.threads
        result["timing"] = (
            "CPU seconds of this process (time.process_time), min over reps, "
            "compared pairs measured alternately"
        )
        result["tiny_step"] = tiny_step(args.reps)
        cfg = OmniConfig.from_name(args.size)
        trunk_cfg = cfg.replace(num_experts=args.trunk_experts)
        result["trunk"] = trunk_sparse_vs_dense(
            trunk_cfg, args.trunk_batch, args.trunk_seq, args.reps
        )
        # The same comparison with the size's own expert count (fewer experts: < 4x params).
        result["trunk_size_experts"] = trunk_sparse_vs_dense(
            cfg, args.trunk_batch, args.trunk_seq, args.reps
        )
        torch.manual_seed(0)
        model = build_model(cfg).eval()
        result["size"] = args.size
        result["modality_separation"] = modality_separation(model, cfg, args.batch, args.reps)
        result["int8"] = int8_vs_fp32(model, cfg, args.batch, args.reps)
        if not args.skip_base_int8:
            base_reps = max(2, args.reps // 3)
            result["int8_base_text"] = int8_base(args.base_batch, base_reps, ["text"])
            result["int8_base_all_modalities"] = int8_base(args.base_batch, base_reps)
        out = args.out or REPO / "benchmarks" / "results" / "model_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
