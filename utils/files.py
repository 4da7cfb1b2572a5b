"""Files written whole or not at all.

Every file a run rewrites while it goes on (checkpoints, config.json, metrics.csv, the reports,
sweep.csv) is written through `written_atomically`: a reader never sees half a file, and a crash,
a kill or a full disk in the middle leaves the previous version in place.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def written_atomically(path: str | Path, mode: str = "w", **open_options) -> Iterator[IO]:
    """Open a temporary file beside `path` (".<name>.<random>.tmp") for writing. When the block
    ends without an error, the file is flushed to disk and renamed over `path` (one atomic step);
    when it raises, the temporary file is removed and `path` is untouched. Each call has its own
    temporary name, so several processes may write the same file at once: the last rename wins."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, mode, **open_options) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())   # mkstemp makes it private (0600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | Path) -> dict:
    """A JSON file's object, or {} when it is missing or unreadable (e.g. a run's first config.json)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: str | Path, content: dict) -> None:
    """Written whole to a temporary file, then renamed over `path`: never half a file."""
    with written_atomically(path) as file:
        file.write(json.dumps(content, indent=2))
