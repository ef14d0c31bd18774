"""`flowmagic env list|prune`: the cache of per-step environments (`--pypi`, `--conda`).

The store is the notebook's (``$FLOWMAGIC_HOME``, else ``.flowmagic/`` next to
the notebook), or the current directory's when no notebook is given.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_OK = 0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "prune"],
                        help="list: the cached environments; prune: delete them (see --unused-days)")
    parser.add_argument("notebook", nargs="?", default=None,
                        help="a .ipynb file whose store to use (default: $FLOWMAGIC_HOME or ./.flowmagic)")
    parser.add_argument("--unused-days", type=float, default=0.0, metavar="DAYS",
                        help="prune: only environments not used for DAYS days (default 0: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def run(args: argparse.Namespace) -> int:
    from flowmagic.cli.main import print_json
    from flowmagic.runtime.environments.builder import list_environments, prune_environments

    root = _store_root(args.notebook)
    if args.action == "list":
        envs = list_environments(root)
        if args.json:
            print_json({"store": str(root), "environments": [e.to_json() for e in envs]})
        else:
            sys.stdout.write(render_environments(envs, root))
        return EXIT_OK
    removed = prune_environments(root, unused_for_days=args.unused_days)
    if args.json:
        print_json({"store": str(root), "removed": [str(p) for p in removed]})
    else:
        sys.stdout.write("".join(f"removed {p}\n" for p in removed) or f"nothing to prune in {root / 'envs'}\n")
    return EXIT_OK


def render_environments(envs, root: Path) -> str:
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
