"""Per-token word normalisation of the three CHAIR protocols (``chair.PROTOCOLS``).

* ``original``: the standalone CHAIR script (Rohrbach et al. 2018, LisaAnne/Hallucination ``utils/chair.py``
  and its Python-3 standalone form, whose cached evaluator built the shipped ground truth) runs
  ``pattern.en.singularize`` on every token. :func:`singularize` re-implements that function's rules
  (pattern 3.6, ``pattern/text/en/inflect.py``, BSD licence) so no ``pattern`` install is needed; its quirks
  are kept on purpose because they decide which words count: "bus" -> "bu" and "glass" -> "glas" (hence the
  script's "wine glas" rule), "ties" -> "ty", "cookies"/"doggies" unchanged (the -ie list returns the plural),
  any word that is the tail of an uninflected/uncountable word unchanged ("ears" of "shears").
* ``opera``: OPERA's ``chair.py`` (shikiw/OPERA) tags the tokens with ``nltk.pos_tag`` and lemmatises each
  with WordNet under its tag (J -> adjective, V -> verb, R -> adverb, anything else -> noun). The tagger model
  (nltk data ``averaged_perceptron_tagger_eng``) and the non-noun WordNet tables come from nltk's downloader
  only -- no pip package ships them -- so the default tagger / lemmatiser are nltk's own and refuse with one
  error naming the download when the data is absent. Both are injectable (tests, or any equivalent tagger).
* ``wordnet``: every token lemmatised as a noun by WordNet (``nlp.lemmatize_noun``, offline): what
  ``mmeff`` computed before the protocols existed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import cache

from mmeff.errors import MmeffError

# -- original: pattern.en.singularize ------------------------------------------------------------------------
# Words whose second hyphen part is one of these singularise their first part ("mothers-in-law").
_PLURAL_PREPOSITIONS = frozenset((
    "about", "above", "across", "after", "among", "around", "at", "athwart", "before", "behind", "below",
    "beneath", "beside", "besides", "between", "betwixt", "beyond", "but", "by", "during", "except", "for",
    "from", "in", "into", "near", "of", "off", "on", "onto", "out", "over", "since", "till", "to", "under",
    "until", "unto", "upon", "with",
))
# A word that is the *tail* of any of these stays as it is (pattern tests ``x.endswith(word)``, not equality).
_UNCHANGED = (
    # uninflected
    "bison", "bream", "breeches", "britches", "carp", "chassis", "christmas", "clippers", "cod", "contretemps",
    "corps", "debris", "diabetes", "djinn", "eland", "elk", "flounder", "gallows", "georgia", "graffiti",
    "headquarters", "herpes", "high-jinks", "homework", "innings", "jackanapes", "mackerel", "measles", "mews",
    "mumps", "news", "pincers", "pliers", "proceedings", "rabies", "salmon", "scissors", "series", "shears",
    "species", "swine", "swiss", "trout", "tuna", "whiting", "wildebeest",
    # uncountable
    "advice", "bread", "butter", "cheese", "electricity", "equipment", "fruit", "furniture", "garbage", "gravel",
    "happiness", "information", "ketchup", "knowledge", "love", "luggage", "mathematics", "mayonnaise", "meat",
    "mustard", "progress", "research", "rice", "sand", "software", "understanding", "water",
)
# -ie nouns: a word ending in one of these + "s" is returned as it is, plural included (pattern returns the
# lower-cased input there). "^pie" and "^tie" hold a literal caret in pattern, so they never match.
_IE_NOUNS = (
    "alergie", "auntie", "beanie", "birdie", "bogie", "bombie", "collie", "cookie", "cutie", "doggie", "eyrie",
    "freebie", "goonie", "groupie", "hankie", "hippie", "hoagie", "hottie", "indie", "junkie", "laddie",
    "laramie", "lingerie", "meanie", "newbie", "nightie", "oldie", "^pie", "pixie", "quickie", "reverie",
    "rookie", "softie", "sortie", "stoolie", "sweetie", "techie", "^tie", "toughie", "valkyrie", "veggie",
    "weenie", "yuppie", "zombie",
)
# Irregular plurals, matched as word endings in this order (the first match wins: "women" -> "woman",
# "policemen" -> "policeman", but also "your" -> "ymy", "taxes" -> "taxe").
_IRREGULAR: tuple[tuple[str, str], ...] = (
    ("atlantes", "atlas"), ("atlases", "atlas"), ("axes", "axe"), ("beeves", "beef"), ("brethren", "brother"),
    ("children", "child"), ("corpora", "corpus"), ("corpuses", "corpus"), ("ephemerides", "ephemeris"),
    ("feet", "foot"), ("ganglia", "ganglion"), ("geese", "goose"), ("genera", "genus"), ("genii", "genie"),
    ("graffiti", "graffito"), ("helves", "helve"), ("kine", "cow"), ("leaves", "leaf"), ("loaves", "loaf"),
    ("men", "man"), ("mongooses", "mongoose"), ("monies", "money"), ("moves", "move"), ("mythoi", "mythos"),
    ("numena", "numen"), ("occipita", "occiput"), ("octopodes", "octopus"), ("opera", "opus"),
    ("opuses", "opus"), ("our", "my"), ("oxen", "ox"), ("penes", "penis"), ("penises", "penis"),
    ("people", "person"), ("sexes", "sex"), ("soliloquies", "soliloquy"), ("teeth", "tooth"),
    ("testes", "testis"), ("trilbys", "trilby"), ("turves", "turf"), ("zoa", "zoon"),
)
# Suffix rules, first match wins; a group that did not take part is replaced by "" (as pattern does).
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"(?i)(.)ae$", r"\1a"), (r"(?i)(.)itis$", r"\1itis"), (r"(?i)(.)eaux$", r"\1eau"),
    (r"(?i)(quiz)zes$", r"\1"), (r"(?i)(matr)ices$", r"\1ix"), (r"(?i)(ap|vert|ind)ices$", r"\1ex"),
    (r"(?i)^(ox)en", r"\1"), (r"(?i)(alias|status)es$", r"\1"),
    (r"(?i)([octop|vir])i$", r"\1us"),  # a character class in pattern: "spaghetti" -> "spaghettus"
    (r"(?i)(cris|ax|test)es$", r"\1is"), (r"(?i)(shoe)s$", r"\1"), (r"(?i)(o)es$", r"\1"),
    (r"(?i)(bus)es$", r"\1"), (r"(?i)([m|l])ice$", r"\1ouse"), (r"(?i)(x|ch|ss|sh)es$", r"\1"),
    (r"(?i)(m)ovies$", r"\1ovie"), (r"(?i)(.)ombies$", r"\1ombie"), (r"(?i)(s)eries$", r"\1eries"),
    (r"(?i)([^aeiouy]|qu)ies$", r"\1y"),
    # -f / -fe plurals in -ves
    (r"([aeo]l)ves$", r"\1f"), (r"([^d]ea)ves$", r"\1f"), (r"arves$", "arf"), (r"erves$", "erve"),
    (r"([nlw]i)ves$", r"\1fe"), (r"(?i)([lr])ves$", r"\1f"), (r"([aeo])ves$", r"\1ve"),
    (r"(?i)(sive)s$", r"\1"), (r"(?i)(tive)s$", r"\1"), (r"(?i)(hive)s$", r"\1"), (r"(?i)([^f])ves$", r"\1fe"),
    # -ses
    (r"(?i)(^analy)ses$", r"\1sis"),
    (r"(?i)((a)naly|(b)a|(d)iagno|(p)arenthe|(p)rogno|(s)ynop|(t)he)ses$", r"\1\2sis"),
    (r"(?i)(.)opses$", r"\1opsis"), (r"(?i)(.)yses$", r"\1ysis"), (r"(?i)(h|d|r|o|n|b|cl|p)oses$", r"\1ose"),
    (r"(?i)(fruct|gluc|galact|lact|ket|malt|rib|sacchar|cellul)ose$", r"\1ose"), (r"(?i)(.)oses$", r"\1osis"),
    # -a
    (r"(?i)([ti])a$", r"\1um"), (r"(?i)(n)ews$", r"\1ews"),
    (r"(?i)s$", ""),
))


@cache  # a caption vocabulary is small; building ground truth singularises millions of tokens
def singularize(word: str) -> str:
    """``pattern.en.singularize(word)`` (noun, no custom table), rule for rule."""
    if "-" in word:
        parts = word.split("-")
        if parts[1] in _PLURAL_PREPOSITIONS:
            return singularize(parts[0]) + "-" + "-".join(parts[1:])
    if word.endswith("'"):  # "dogs'" -> "dog's" (and a bare "'" -> "'s")
        return singularize(word[:-1]) + "'s"
    w = word.lower()
    if any(x.endswith(w) for x in _UNCHANGED):
        return word
    if any(w.endswith(x + "s") for x in _IE_NOUNS):
        return w
    for plural, singular in _IRREGULAR:
        if w.endswith(plural):
            return re.sub(f"(?i){plural}$", singular, word)
    for rule, replacement in _RULES:
        if rule.search(word):
            return rule.sub(replacement, word)
    return word


# -- opera: POS tag, then WordNet lemma under that tag --------------------------------------------------------
Tagger = Callable[[list[str]], Sequence[tuple[str, str]]]
Lemmatizer = Callable[[str, str], str]  # (word, WordNet pos "n"/"v"/"a"/"r") -> lemma

# nltk data the default tagger / lemmatiser read; nltk's downloader is the only source (no pip package).
OPERA_NLTK_DATA = {"averaged_perceptron_tagger_eng": "taggers/averaged_perceptron_tagger_eng/",
                   "wordnet": "corpora/wordnet"}


class ProtocolUnavailable(MmeffError):
    """A CHAIR protocol whose external data is not installed here."""


def wordnet_pos(tag: str) -> str:
    """OPERA's ``get_wordnet_pos`` with its noun fallback: the WordNet part of speech a Penn tag lemmatises as."""
    return {"J": "a", "V": "v", "R": "r"}.get(tag[:1], "n")


def opera_normalise(tokens: list[str], tagger: Tagger, lemmatizer: Lemmatizer) -> list[str]:
    """OPERA's lemmas: tag the whole token list once (context matters), then lemmatise token by token."""
    tagged = list(tagger(tokens))
    if [w for w, _ in tagged] != tokens:
        raise ValueError("the POS tagger must return one (token, tag) pair per token, in order")
    return [lemmatizer(w, wordnet_pos(t)) for w, t in tagged]


def nltk_opera_tools() -> tuple[Tagger, Lemmatizer]:
    """nltk's ``pos_tag`` and ``WordNetLemmatizer().lemmatize``, as OPERA calls them; a clear error without data."""
    import nltk

    missing = []
    for name, resource in OPERA_NLTK_DATA.items():
        try:
            nltk.data.find(resource)
        except LookupError:
            missing.append(name)
    if missing:
        raise ProtocolUnavailable(
            f"CHAIR protocol 'opera' needs nltk data {' and '.join(missing)} (the POS tagger model and WordNet), "
            "which no pip package provides: run `python -m nltk.downloader "
            f"{' '.join(missing)}` on a machine with network, or use --protocol original")
    from nltk.stem import WordNetLemmatizer

    wnl = WordNetLemmatizer()
    return nltk.pos_tag, lambda word, pos: wnl.lemmatize(word, pos=pos)


__all__ = ["OPERA_NLTK_DATA", "Lemmatizer", "ProtocolUnavailable", "Tagger", "nltk_opera_tools",
           "opera_normalise", "singularize", "wordnet_pos"]
