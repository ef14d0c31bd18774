"""`flowmagic env list|prune`: the cache of per-step environments (`--pypi`, `--conda`).

The store is the notebook's (``$FLOWMAGIC_HOME``, else ``.flowmagic/`` next to
the notebook), or the current directory's when no notebook is given.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flowmagic.cli.base import EXIT_OK, print_json


def run(args: argparse.Namespace) -> int:
    from flowmagic.runtime.environments.builder import list_environments, prune_environments

    root = _store_root(args.notebook)
    if args.action == "list":
        envs = list_environments(root)
        if args.json:
            print_json({"store": str(root), "environments": [e.to_json() for e in envs]})
        else:
            sys.stdout.write(render_cached_environments(envs, root))
        return EXIT_OK
    removed = prune_environments(root, unused_for_days=args.unused_days)
    if args.json:
        print_json({"store": str(root), "removed": [str(p) for p in removed]})
    else:
        sys.stdout.write("".join(f"removed {p}\n" for p in removed) or f"nothing to prune in {root / 'envs'}\n")
    return EXIT_OK


def render_cached_environments(envs, root: Path) -> str:
    """One line per cached environment: key, request, size, packages, last use."""
    if not envs:
        return f"no environments in {root / 'envs'}\n"
    lines = []
    for env in envs:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(env.last_used))
        lines.append(f"{env.key}  --{env.kind} \"{' '.join(env.requested)}\"  "
                     f"{env.size / 1e6:.0f} MB  {len(env.packages)} packages  last used {used}")
    return "\n".join(lines) + "\n"


def _store_root(notebook: str | None) -> Path:
    from flowmagic.store.paths import store_root_for

    return store_root_for(notebook)
