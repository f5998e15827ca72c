"""Training library behind ``jobs.train`` / ``jobs.export`` (Ray Train + DeepSpeed ZeRO).

Modules: ``config`` (typed YAML config), ``data`` (shards -> per-rank batches), ``engine``
(DeepSpeed config, freezing, distributed helpers), ``stage`` (which losses a stage combines),
``schedule`` (warm-up + cosine LR), ``checkpoint`` (reported DeepSpeed checkpoints, resume),
``loop`` (the per-worker loop), ``metrics`` (JSONL + PNG), ``export`` (consolidation and
the export dir), ``runner`` (driver: one TorchTrainer per stage).
"""
