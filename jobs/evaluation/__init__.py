"""Evaluation library behind ``python -m jobs.evaluate``.

* :mod:`jobs.evaluation.run`: :func:`~jobs.evaluation.run.run_evaluation`, one evaluation.
* :mod:`jobs.evaluation.metrics`: retrieval R@K, zero-shot and head accuracy on numpy arrays.
* :mod:`jobs.evaluation.fusion`: the fusion-gain metric (rows, modalities, pairs).
* :mod:`jobs.evaluation.data`: reading a split and the export's training info.
* :mod:`jobs.evaluation.encode`: batched no-grad embedding (the export is loaded by
  :func:`jobs.exports.load_export`; zero-shot uses :mod:`models.zeroshot`).
* :mod:`jobs.evaluation.report`: metrics.json, the figures and the text summary.
* :mod:`jobs.evaluation.plots`: PNG figures.
"""
