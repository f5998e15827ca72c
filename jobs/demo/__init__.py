"""The OmniDigits demo: one package for everything that only the demo needs.

* :mod:`jobs.demo.run`: the orchestrator behind ``python -m jobs.demo`` (``make demo``):
  corpus, prepare, train, evaluate, export, serve, report; cached by fingerprints.
* :mod:`jobs.demo.corpus`: the synthetic corpus generator (``python -m jobs.demo.corpus``),
  one ``render_<m>.py`` per modality.
* :mod:`jobs.demo.serve_exercise`: starts the service and sends real requests to it.
"""
