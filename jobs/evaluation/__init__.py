"""Evaluation library behind ``python -m jobs.evaluate``.

* :mod:`jobs.evaluation.metrics`: retrieval R@K, zero-shot and head accuracy on numpy arrays.
* :mod:`jobs.evaluation.data`: reading a split and the export's training info.
* :mod:`jobs.evaluation.encode`: loading an export and batched no-grad embedding.
* :mod:`jobs.evaluation.text`: the export's text featurizer for label prompts.
* :mod:`jobs.evaluation.plots`: PNG figures.
"""
