"""Sphinx extension: author-year citations in round brackets, and a bibliography labelled the same way.

sphinxcontrib-bibtex's `author_year` style writes "[Vaswani et al., 2017]" and "Zhang and Sennrich [2019]",
and its bibliography labels entries "[VSP+17]", a key the reader never sees in the text. This registers
`author_year_round` (set as `bibtex_reference_style`): "(Vaswani et al., 2017)", "Zhang and Sennrich (2019)",
several works separated by semicolons; and the pybtex style `llmbook` (set as `bibtex_default_style`):
entries sorted by author and year, each labelled "Vaswani et al., 2017", as the text cites it.
"""

from __future__ import annotations

import codecs
from collections import Counter
from dataclasses import dataclass, field

import latexcodec  # noqa: F401  (registers the "ulatex" codec)
import pybtex.plugin
import sphinxcontrib.bibtex.plugin
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from sphinx.application import Sphinx
from sphinxcontrib.bibtex.style.referencing import BracketStyle
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle


def _round() -> BracketStyle:
    return BracketStyle(left="(", right=")", sep="; ")


@dataclass
class RoundAuthorYearStyle(AuthorYearReferenceStyle):
    """sphinxcontrib-bibtex's author-year references, in round brackets."""

    bracket_parenthetical: BracketStyle = field(default_factory=_round)
    bracket_textual: BracketStyle = field(default_factory=_round)
    bracket_author: BracketStyle = field(default_factory=_round)
    bracket_label: BracketStyle = field(default_factory=_round)
    bracket_year: BracketStyle = field(default_factory=_round)


def _surname(person) -> str:
    """A person's last name as plain text: braces dropped, LaTeX accents decoded ({\\'e} -> é)."""
    return codecs.decode(" ".join(person.last_names), "ulatex").replace("{", "").replace("}", "")


class AuthorYearLabels(BaseLabelStyle):
    """Labels "Surname, 2017", "A and B, 2017", "A et al., 2017"; a letter tells equal labels apart."""

    def format_labels(self, sorted_entries):
        labels = [self._label(entry) for entry in sorted_entries]
        count, seen = Counter(labels), Counter()
        for label in labels:
            yield label if count[label] == 1 else label + "abcdefghijklmnopqrstuvwxyz"[seen[label]]
            seen[label] += 1

    @staticmethod
    def _label(entry) -> str:
        people = entry.persons.get("author", [])
        names = [_surname(person) for person in people]
        if len(names) == 1:
            who = names[0]
        elif len(names) == 2 and not any(str(p) == "others" for p in people):
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        return f"{who}, {entry.fields.get('year', 'n.d.')}"


class BookStyle(PlainStyle):
    """pybtex's plain style (sorted by author, year, title) with author-year labels."""

    default_label_style = "llmbook-author-year"


def setup(app: Sphinx) -> dict:
    pybtex.plugin.register_plugin("pybtex.style.labels", "llmbook-author-year", AuthorYearLabels)
    pybtex.plugin.register_plugin("pybtex.style.formatting", "llmbook", BookStyle)
    sphinxcontrib.bibtex.plugin.register_plugin(
        "sphinxcontrib.bibtex.style.referencing", "author_year_round", RoundAuthorYearStyle
    )
    return {"parallel_read_safe": True, "parallel_write_safe": True}
