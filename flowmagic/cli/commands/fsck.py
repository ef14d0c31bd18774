"""``flowmagic fsck [PATH] [--repair] [--json]``: check a whole store.

PATH is a notebook (its store is checked) or a store directory; without it,
``$FLOWMAGIC_HOME`` or ``./.flowmagic``. Exit 0 when the store is consistent,
1 when it has problems, 2 when there is no store there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowmagic.errors import UsageError


def run(args: argparse.Namespace) -> int:
    from flowmagic.cli.base import EXIT_FAILED, EXIT_OK, print_json
    from flowmagic.store import METADATA_FILE, open_store
    from flowmagic.store.fsck import fsck

    root = _store_root(args.path)
    if not (root / METADATA_FILE).is_file():
        raise UsageError(f"fsck: there is no flowmagic store at {root}")
    store = open_store(root)
    try:
        report = fsck(store, repair=args.repair)
    finally:
        store.close()
    if args.json:
        print_json(report.to_json())
    else:
        sys.stdout.write(report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


def _store_root(path: str | None) -> Path:
    from flowmagic.store.paths import store_root, store_root_for

    if path is None:
        return store_root()
    if path.endswith(".ipynb"):
        return store_root_for(path)
    return Path(path).expanduser().absolute()
