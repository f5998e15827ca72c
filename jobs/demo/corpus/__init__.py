"""OmniDigits, the demo corpus: digits 0-9 in every modality (see :mod:`.build`).

python -m jobs.demo.corpus --out data/omnidigits --n 2000 --seed 0 --workers 2

from jobs.demo.corpus import build_corpus
manifest = build_corpus("data/omnidigits", n=2000, seed=0, workers=2)
"""

from jobs.demo.corpus.build import build_corpus, file_digest
from jobs.demo.corpus.cli import main
from jobs.demo.corpus.plan import CORPUS_VERSION, FILE_MODALITIES, MODALITIES, CorpusError
from jobs.demo.corpus.render_text import DIGIT_NAMES

__all__ = [
    "CORPUS_VERSION",
    "DIGIT_NAMES",
    "FILE_MODALITIES",
    "MODALITIES",
    "CorpusError",
    "build_corpus",
    "file_digest",
    "main",
]
