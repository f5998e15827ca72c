"""Overhead of the Ray Train + DeepSpeed loop vs a plain PyTorch loop, and 2-vs-1 worker scaling.

    .venv/bin/python benchmarks/train_overhead.py [--steps 60] [--batch 8] [--model tiny]

Same model, batch size, data (synthetic shards, rows cached in memory), objective
(``pretrain``: masked modelling + MoE aux) and trainable parameters (the job freezes what the
stage's losses cannot reach; so does the plain loop) in every run:

1. plain: one process, ``torch.optim.AdamW``, no Ray, no DeepSpeed (run first and last; the
   ratios use the mean of the two, so slow drift of a shared machine cancels);
2. deepspeed: the same process with a DeepSpeed engine (world size 1, gloo, the job's
   DeepSpeed config) and no Ray, at each ``--zero-stages``: DeepSpeed's own cost;
3. ray1: ``jobs.training`` with 1 worker at each ``--zero-stages`` (gloo, torch AdamW).
   ZeRO-0 is the setting for one worker (nothing to partition); ZeRO-2 is the multi-worker
   default, shown for reference;
4. ray2: 2 workers, ZeRO-2 (same per-worker batch: 2x the samples per step).

steps/s are measured after ``--warmup`` steps (from the loop's metrics timestamps). Target:
ray1 (ZeRO-0) / plain >= 0.9. Prints a table, writes ``benchmarks/results/train_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def plain_loop(
    shards: str,
    args: argparse.Namespace,
    stats: dict | None = None,
    *,
    deepspeed: bool = False,
    zero_stage: int = 2,
) -> float:
    """steps/s of a single-process loop over the same rows, model and objective.

    With ``deepspeed=True`` the optimizer step goes through a DeepSpeed engine built from the
    job's DeepSpeed config (world size 1, gloo), still without Ray.

    ``stats`` (optional) receives tokens/s, samples/s and approximate model FLOPs per step
    (``6 * active params per token * tokens``, per modality; attention scores and heads
    excluded), used for the GPU MFU figure.
    """
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from jobs.training.data import RankBatches, inspect_shards
    from jobs.training.engine import build_stage_model, compile_model
    from jobs.training.runner import model_config_from_data
    from jobs.training.stage import StageObjective

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    tc = _config(shards, "unused", 1, args, zero_stage)
    info = inspect_shards(shards)
    model_cfg = model_config_from_data(tc, shards, info, info.modalities).to_dict()
    model = build_stage_model(model_cfg).to(device)
    active = {m: model.active_parameters_per_token(m) for m in info.modalities}
    flops, tokens, n_samples = 0.0, 0, 0
    obj = StageObjective(
        "pretrain", tc.pretrain, modalities=info.modalities, label_names=info.label_names
    )
    obj.freeze_unused(model)  # as the training loop does
    model.trunk.activation_checkpointing = getattr(args, "checkpoint", False)
    model.trunk.varlen_attention = not getattr(args, "padded_attention", False)
    if getattr(args, "compile", False):
        compile_model(model)
        if stats is not None:
            stats["compiled"] = "encoder blocks + trunk layers"
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=tc.pretrain.lr, betas=(0.9, 0.98))
    engine = None
    if deepspeed:
        import deepspeed as ds

        from jobs.training.engine import (
            deepspeed_config,
            lift_scalar_params,
            skip_single_rank_allreduce,
        )

        if not dist.is_initialized():
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0")
            os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            # As Ray Train sets it up: NCCL on GPUs, gloo on CPUs.
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        lift_scalar_params(model)
        engine, *_ = ds.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(tc, tc.pretrain, use_gpu=device.type == "cuda"),
            dist_init_required=False,
        )
        skip_single_rank_allreduce(engine, zero_stage)  # as the training loop does

    class _Iter:
        def iter_batches(self, **kw):
            yield pq.read_table(os.path.join(shards, "train"))

    batches = RankBatches(
        _Iter(),
        modalities=info.modalities,
        batch_size=args.batch,
        cache=True,
        shuffle=True,
        seed=0,
        rank=0,
    )

    host_ms = {"collate": 0.0, "steps": 0}

    def train_step(samples: list, step: int):
        t = time.perf_counter()
        batch = obj.collate(samples, info.label_names)
        if device.type != "cpu":
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        host_ms["collate"] += (time.perf_counter() - t) * 1e3
        host_ms["steps"] += 1
        if engine is not None:
            terms, out = obj(engine, batch, step=step)
            engine.backward(terms["loss"])
            engine.step()
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                terms, out = obj(model, batch, step=step)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(trainable, tc.pretrain.grad_clip)
            opt.step()
        return out

    # Token and FLOP counts stay on the device until the end (an int() per step would be a
    # host sync: the host could not queue step k+1 while the GPU runs step k).
    tok_acc = torch.zeros((), dtype=torch.float64, device=device)
    flop_acc = torch.zeros((), dtype=torch.float64, device=device)
    step, epoch, t0 = 0, 0, None
    while step < args.steps:
        for samples in batches.epoch(epoch):
            if getattr(args, "sync_debug", False) and step == 1 and device.type == "cuda":
                if stats is not None:
                    stats["host_syncs"] = _sync_sites(train_step, samples, step)
            out = train_step(samples, step)
            step += 1
            if t0 is not None:
                for m, n in obj.token_counts(out).items():
                    tok_acc += n
                    flop_acc += 6.0 * active[m] * n
                n_samples += len(samples)
            if step == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            if step >= args.steps:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens, flops = int(tok_acc.item()), float(flop_acc.item())
    # The world-size-1 process group stays up for the next engine: DeepSpeed caches its
    # groups module-wide, and a re-created default group would not match them.
    if stats is not None and getattr(args, "profile", False) and device.type == "cuda":
        stats["profile"] = _profile_steps(train_step, next(iter(batches.epoch(epoch))), step)
    if stats is not None:
        stats["collate_host_ms_per_step"] = host_ms["collate"] / max(1, host_ms["steps"])
        if device.type == "cuda":
            stats["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        stats.update(
            samples_per_s=n_samples / dt,
            tokens_per_s=tokens / dt,
            model_flops_per_s=flops / dt,
            active_params_per_token={m: int(v) for m, v in active.items()},
            params=sum(p.numel() for p in model.parameters()),
        )
    return (args.steps - args.warmup) / dt


def _sync_sites(train_step, samples: list, step: int) -> dict:
    """Runs one step with CUDA sync debugging on; returns ``{"file:line": count}`` of the
    host-device synchronizations it makes (each one stalls the host behind the GPU)."""
    import warnings

    import torch

    sites: dict[str, int] = {}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_step(samples, step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        key = f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}"
        sites[key] = sites.get(key, 0) + 1
    print(f"[sync-debug] {sum(sites.values())} syncs in one step:", flush=True)
    for k, v in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"  {v:4d}  {k}", flush=True)
    return sites


def _profile_steps(train_step, samples: list, step: int, n: int = 3) -> dict:
    """Profiles ``n`` more steps: prints the top kernels and host ops, returns wall time vs
    the time the GPU spent in kernels (a step far above its kernel time is host-bound)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for i in range(n):
            train_step(samples, step + i)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    ka = prof.key_averages()
    # Kernel rows only, as the table's own "Self CUDA time total": operator rows repeat their
    # kernels' time, and user annotations (Optimizer.step, ...) span other kernels.
    gpu_us = sum(
        e.self_device_time_total
        for e in ka
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation
    )
    print(ka.table(sort_by="self_device_time_total", row_limit=12), flush=True)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    res = {"steps": n, "wall_ms": wall * 1e3, "gpu_kernel_ms": gpu_us / 1e3}
    res["gpu_busy"] = res["gpu_kernel_ms"] / res["wall_ms"]
    print(f"[profile] {json.dumps(res)}", flush=True)
    return res


def _config(shards: str, runs: str, workers: int, args: argparse.Namespace, zero_stage: int = 2):
    from jobs.training.config import load_train_config

    return load_train_config(
        str(ROOT / "configs/train/tiny.yaml"),
        [
            f"data.shards_dir={shards}",
            f"runs_dir={runs}",
            f"name=bench{workers}_z{zero_stage}",
            f"deepspeed.zero_stage={zero_stage}",
            f"model={args.model}",
            f"data.batch_size={args.batch}",
            f"scaling.num_workers={workers}",
            f"scaling.cpus_per_worker={1.0 if workers == 1 else 0.5}",
            f"pretrain.steps={args.steps}",
            f"pretrain.checkpoint_every={10 * args.steps}",
            f"log_every={args.warmup}",
            "pretrain.warmup_steps=2",
            "export_at_end=false",
        ],
    )


def ray_loop(
    shards: str, runs: str, workers: int, args: argparse.Namespace, zero_stage: int
) -> float:
    """steps/s of the Ray Train + DeepSpeed loop, from the metrics timestamps."""
    from jobs.training.metrics import read_jsonl
    from jobs.training.runner import run_training

    tc = _config(shards, runs, workers, args, zero_stage)
    res = run_training(tc, ["pretrain"])
    rows = [
        r
        for r in read_jsonl(os.path.join(res["run_dir"], "metrics.jsonl"))
        if r.get("stage") == "pretrain" and "loss" in r
    ]
    first = next(r for r in rows if r["step"] == args.warmup)
    last = rows[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default="tiny")
    p.add_argument(
        "--zero-stages",
        default="0,2",
        help="ZeRO stages of the 1-worker runs; the first is the one held to the target",
    )
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument(
        "--plain-only",
        action="store_true",
        help="only the single-process loop (e.g. a GPU box without Ray/DeepSpeed): "
        "samples/s, tokens/s and MFU",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks (plain-only)")
    p.add_argument(
        "--profile", action="store_true", help="plain-only, CUDA: profile 3 steps after timing"
    )
    p.add_argument(
        "--checkpoint",
        action="store_true",
        help="plain-only: activation checkpointing of the trunk layers (larger batches fit)",
    )
    p.add_argument(
        "--padded-attention",
        action="store_true",
        help="plain-only: the trunk's portable padded attention instead of the variable-length "
        "flash kernel (for comparisons)",
    )
    p.add_argument(
        "--sync-debug",
        action="store_true",
        help="plain-only, CUDA: list the host-device syncs of one step (file:line, count)",
    )
    p.add_argument(
        "--deepspeed",
        action="store_true",
        help="plain-only: also DeepSpeed engine runs at each --zero-stages (the job's config: "
        "bf16 on GPU, NCCL)",
    )
    args = p.parse_args()
    if args.steps % args.warmup:
        raise SystemExit("--steps must be a multiple of --warmup (metrics are logged every warmup)")
    from jobs.training.synthetic import write_synthetic_shards

    work = tempfile.mkdtemp(prefix="bench_train_")
    shards = write_synthetic_shards(os.path.join(work, "shards"), n=max(256, 4 * args.batch))
    if args.plain_only:
        stats: dict = {}
        sps = plain_loop(shards, args, stats)
        for z in [int(z) for z in args.zero_stages.split(",")] if args.deepspeed else []:
            ds_stats: dict = {}
            ds_sps = plain_loop(shards, args, ds_stats, deepspeed=True, zero_stage=z)
            ds_stats["steps_per_s"] = ds_sps
            ds_stats["mfu_approx"] = ds_stats["model_flops_per_s"] / (args.peak_tflops * 1e12)
            stats[f"deepspeed_zero{z}"] = ds_stats
        shutil.rmtree(work, ignore_errors=True)
        import torch

        result = {
            "model": args.model,
            "batch": args.batch,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "bf16": args.bf16,
            "compile": args.compile,
            "activation_checkpointing": args.checkpoint,
            "trunk_attention": "padded" if args.padded_attention else "varlen",
            "steps": args.steps,
            "warmup": args.warmup,
            "steps_per_s": sps,
            **stats,
            "mfu_approx": stats["model_flops_per_s"] / (args.peak_tflops * 1e12),
            "peak_tflops": args.peak_tflops,
        }
        print(json.dumps(result, indent=2))
        _write(
            args.out or str(ROOT / f"benchmarks/results/train_{args.model}_{args.device}.json"),
            result,
        )
        return 0
    stages = [int(z) for z in args.zero_stages.split(",")]
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="ray_b_", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=ray_tmp,
        object_store_memory=500_000_000,
        log_to_driver=False,
    )
    # Every measured run is bracketed by plain runs and compared with their mean: a shared
    # machine drifts by 10-20% over minutes, more than the effect being measured.
    runs: dict[str, float] = {}
    plains = [plain_loop(shards, args)]
    ratios: dict[str, float] = {}

    def measure(name: str, fn) -> None:
        runs[name] = fn()
        plains.append(plain_loop(shards, args))
        ratios[name] = runs[name] / ((plains[-2] + plains[-1]) / 2)
        print(f"{name:24s}: {runs[name]:6.2f} steps/s, {ratios[name]:.3f} of plain", flush=True)

    try:
        for z in stages:
            measure(
                f"deepspeed_zero{z}_no_ray",
                lambda z=z: plain_loop(shards, args, deepspeed=True, zero_stage=z),
            )
        for z in stages:
            measure(
                f"ray1_zero{z}",
                lambda z=z: ray_loop(shards, os.path.join(work, "runs"), 1, args, z),
            )
        measure("ray2_zero2", lambda: ray_loop(shards, os.path.join(work, "runs"), 2, args, 2))
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    z0 = stages[0]
    ray1 = runs[f"ray1_zero{z0}"]
    result = {
        "model": args.model,
        "batch_per_worker": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": "cpu",
        "method": "each run bracketed by plain runs; ratio = run / mean(adjacent plains)",
        "plain_steps_per_s_runs": plains,
        "steps_per_s": runs,
        "over_plain": ratios,
        "ray1_over_plain": ratios[f"ray1_zero{z0}"],
        "ray1_over_plain_zero_stage": z0,
        "ray2_samples_per_s_over_ray1": 2 * runs["ray2_zero2"] / ray1,
        "ray2_samples_per_s_over_ray1_zero2": (
            2 * runs["ray2_zero2"] / runs["ray1_zero2"] if "ray1_zero2" in runs else None
        ),
        "target_ray1_over_plain": 0.9,
        "cpus": os.cpu_count(),
    }
    print("plain runs (steps/s): " + ", ".join(f"{p:.2f}" for p in plains))
    print(
        f"Ray+DeepSpeed x1 (ZeRO-{z0}) / plain = {result['ray1_over_plain']:.3f} (target >= 0.9); "
        f"2 workers vs 1: samples/s x{result['ray2_samples_per_s_over_ray1']:.2f}"
    )
    _write(args.out or str(ROOT / "benchmarks/results/train_overhead.json"), result)
    print(json.dumps(result))
    return 0


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
