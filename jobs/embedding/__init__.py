"""Bulk embedding of a corpus with an export (``jobs.embed``) and its gallery index
(``jobs.index``): config, parts, Ray Data stages, the embedding directory, indexes."""
