"""Where a benchmark's report goes: printed, and written to ``--output`` when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(text: str, output: str | None, rows: Any = None) -> None:
    """Prints ``text`` and writes it to ``output`` (its folder made), with ``rows`` beside it
    as JSON (``output`` with a ``.json`` suffix) when given, for scripts that read the figures."""
    print(text)
    if not output:
        return
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if rows is not None:
        path.with_suffix(".json").write_text(json.dumps(rows, indent=1))
