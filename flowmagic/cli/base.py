"""What every console sub-command shares: exit statuses, the parser class, the one JSON document."""
from __future__ import annotations

import argparse
import json
import sys

from flowmagic.errors import UsageError

EXIT_OK = 0
EXIT_FAILED = 1   # a run that failed or was interrupted
EXIT_USAGE = 2    # bad usage, or a flow that cannot be built


class ConsoleParser(argparse.ArgumentParser):
    """Usage errors become UsageError (one line, exit 2) instead of SystemExit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def print_json(document: dict) -> None:
    """The one JSON document a ``--json`` command prints."""
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
