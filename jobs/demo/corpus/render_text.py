"""Text of the OmniDigits corpus: inline captions in five languages, vague captions
(ambiguous text) and near-duplicate restylings. Text is inline in the manifest (no file)."""

from __future__ import annotations

import numpy as np

DIGIT_NAMES: dict[str, tuple[str, ...]] = {
    "en": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "de": ("null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"),
    "fr": ("zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"),
    "es": ("cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve"),
    "it": ("zero", "uno", "due", "tre", "quattro", "cinque", "sei", "sette", "otto", "nove"),
}
_EN_TEMPLATES: tuple[str, ...] = (
    "{name}",
    "{d}",
    "the digit {d}",
    "the digit {name}",
    "a handwritten {name}",
    "number {name}",
    "the number {d}",
    "a {name}",
    "digit {d}",
    "someone wrote a {name}",
    "{Name}.",
    "it is a {name}",
    "a hand-drawn {d}",
    "the numeral {name}",
)
_FOREIGN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "de": ("{name}", "die Ziffer {name}", "eine handgeschriebene {name}", "Zahl {d}"),
    "fr": ("{name}", "le chiffre {name}", "un {name} écrit à la main", "le nombre {d}"),
    "es": ("{name}", "el dígito {name}", "un {name} escrito a mano", "número {d}"),
    "it": ("{name}", "la cifra {name}", "un {name} scritto a mano", "numero {d}"),
}

#: Captions that never name the digit (ambiguous text).
_VAGUE_TEXT: tuple[str, ...] = (
    "a handwritten number",
    "a digit",
    "some number written in pen",
    "a number on a card",
    "the number I wrote down",
    "a single digit",
)


def _make_text(r: np.random.Generator, label: int) -> str:
    if r.random() < 0.15:
        lang = str(r.choice(list(_FOREIGN_TEMPLATES)))
        tpl = str(r.choice(_FOREIGN_TEMPLATES[lang]))
    else:
        lang = "en"
        tpl = str(r.choice(_EN_TEMPLATES))
    name = DIGIT_NAMES[lang][label]
    return tpl.format(name=name, Name=name.capitalize(), d=label)


def _near_text(r: np.random.Generator, text: str) -> str:
    """A near duplicate of a caption: same words, different surface form."""
    options = [text.upper(), text.capitalize() + ".", f" {text}  ", text + "!", text.title()]
    options = [o for o in options if o != text] or [text + "."]
    return options[int(r.integers(len(options)))]
