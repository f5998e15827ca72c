"""OmniRay data pipelines: raw omni-modal corpora -> featurized Parquet shards.

Public API (see docs/INTERFACES.md §1-3):

* :mod:`pipelines.config` - ``DataConfig`` / ``FeatureConfig`` (YAML: ``configs/data/``).
* :mod:`pipelines.featurize` - one featurizer per modality, ``get_featurizer(name, cfg)``,
  ``SampleError(reason, detail)``; shared with training and serving.
* :mod:`pipelines.tokenizer` - ``train_tokenizer(texts, out_dir, vocab_size)``,
  ``load_tokenizer(dir)`` (byte-level BPE, fixed special ids).
* :mod:`pipelines.schema` - shard columns, ``pack_tensors`` / ``unpack_table``.
* :mod:`pipelines.prepare` - ``run_prepare(manifest, out, cfg)`` (Ray Data); the CLI is
  ``python -m jobs.prepare``.

Submodules are imported on demand: importing :mod:`pipelines` stays cheap.
"""
