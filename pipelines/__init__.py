"""OmniRay data pipelines: raw omni-modal corpora -> featurized Parquet shards.

Public API (see docs/INTERFACES.md §1-3):

* :mod:`pipelines.config` - ``DataConfig`` / ``FeatureConfig`` (YAML: ``configs/data/``);
  ``FeatureConfig`` holds each featurizer's own ``Config`` section.
* :mod:`pipelines.featurize` - one featurizer per modality (``Config``, ``sniff``,
  ``example``, ``decode``/``fit``/``finalize``/``featurize``), ``get_featurizer(name, cfg)``,
  ``SampleError(reason, detail)``; shared with training and serving.
* :mod:`pipelines.tokenizer` - ``train_tokenizer(texts, out_dir, vocab_size)``,
  ``load_tokenizer(dir)`` (byte-level BPE, fixed special ids).
* :mod:`pipelines.schema` - shard columns (dtypes from :mod:`common.modalities`), the one
  shard writer / reader ``write_shard`` / ``read_shard``, ``pack_tensors`` / ``unpack_table``.
* :mod:`pipelines.prepare` - ``run_prepare(manifest, out, cfg)`` (Ray Data); the CLI is
  ``python -m jobs.prepare``. Its parts: :mod:`pipelines.manifest` (reading),
  :mod:`pipelines.stages` (the Ray stages), :mod:`pipelines.plan` (the driver's
  decisions, Ray-free), :mod:`pipelines.stats` (accounting).

Submodules are imported on demand: importing :mod:`pipelines` stays cheap.
"""
