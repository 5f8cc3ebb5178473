"""The ``mmeff`` command. Its commands (eval, bench, score, train, tune, presets) belong to the lab
(``mmeff_lab.cli``, distribution ``mmeff-lab``); this entry point only forwards to it, so that an install of the
library alone answers with one line saying what to install instead of a traceback.

This is the one place the library names the lab, and only as the command's target (tests/test_architecture.py).
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from mmeff_lab.cli import main as lab_main  # the command line is the lab's
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith("mmeff_lab"):
            raise
        sys.exit("mmeff: the command line comes with the lab (evaluation, reference models, training): "
                 "pip install mmeff-lab, or pip install -e '.[dev]' in a clone of the repository")
    lab_main()
