#!/usr/bin/env python3
"""GPU validation run: ``python3 scripts/gpu_check.py [--gpu | --dry-run] [--out DIR] ...``.

The same as ``maskattn-deploy selftest``, runnable from a bare source checkout (a lent GPU
machine where the package is not pip-installed): the checkout's root goes on ``sys.path`` and
``maskattn_deploy.bench.gpu_check`` maps ``plugins/`` the way the installed package does.
See benchmarks/README.md for the command a lent machine runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    if importlib.util.find_spec("maskattn_deploy") is None:
        sys.path.insert(0, str(ROOT))
    from maskattn_deploy.cli.main import main as cli_main

    sys.argv = ["maskattn-deploy", "selftest", *sys.argv[1:]]
    cli_main()


if __name__ == "__main__":
    main()
