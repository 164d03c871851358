"""The spill file: where payload-log rows wait, on local disk, while the database is down or slow.

An append-only file of JSON lines, used as a queue: the writer thread appends (one write and one
fsync per batch, so an appended batch survives a crash of the process or the machine); the database
thread reads from an in-memory offset and, once it has read everything, truncates the file to zero.
A crash in between replays the file from its start on the next run: rows carry their own unique key
(``uid``), and the insert skips rows already there, so a replay never duplicates.

One process owns a spill file at a time (an ``flock`` on ``<file>.lock``); a second server started
in the same folder gets ``<stem>.<pid><suffix>`` and says so, rather than mixing its rows in.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from pathlib import Path

import orjson

log = logging.getLogger(__name__)


class SpillFile:
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(f"{path}.lock", "a+")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            mine = path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}")
            log.warning("spill file %s is in use by another process; using %s", path, mine)
            path = mine
            self._lock_file = open(f"{path}.lock", "a+")  # noqa: SIM115
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.path = path
        self._private = path.name.endswith(f".{os.getpid()}{path.suffix}")
        _trim_torn_tail(path)
        self._file = open(path, "ab")  # noqa: SIM115
        self._lock = threading.Lock()
        self._size = self._file.seek(0, os.SEEK_END)
        self._offset = 0
        #: rows appended and rows replayed, since start
        self.appended = 0
        self.replayed = 0

    def pending(self) -> int:
        """Bytes not yet replayed (0: the file is empty and new rows may go straight to the database)."""
        return self._size - self._offset

    def append(self, rows: list[dict]) -> None:
        """Append rows durably (write + fsync) before returning."""
        if not rows:
            return
        data = b"".join(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for r in rows)
        with self._lock:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._size += len(data)
            self.appended += len(rows)

    def read(self, max_rows: int) -> tuple[list[dict], int]:
        """Up to ``max_rows`` rows from the replay offset, and the offset after them."""
        with self._lock:
            start, end = self._offset, self._size
        if start >= end:
            return [], start
        rows: list[dict] = []
        with open(self.path, "rb") as reader:
            reader.seek(start)
            position = start
            while position < end and len(rows) < max_rows:
                line = reader.readline()
                if not line.endswith(b"\n"):  # a torn last line from a crash mid-write: never acknowledged
                    position = end
                    break
                position += len(line)
                try:
                    rows.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    log.error("spill file %s: skipping an unreadable line at byte %d", self.path, position - len(line))
        return rows, position

    def consumed(self, offset: int, count: int) -> None:
        """Rows up to ``offset`` are in the database; when nothing was appended since, empty the file."""
        with self._lock:
            self._offset = offset
            self.replayed += count
            if self._offset >= self._size:
                self._file.truncate(0)
                self._file.flush()
                os.fsync(self._file.fileno())
                self._size = self._offset = 0

    def close(self) -> None:
        with self._lock:
            empty = self._size == 0
            self._file.close()
        if empty and self._private:  # a per-process file left empty: remove it
            self.path.unlink(missing_ok=True)
            Path(f"{self.path}.lock").unlink(missing_ok=True)
        self._lock_file.close()


def _trim_torn_tail(path: Path) -> None:
    """Cut a partial last line (a crash in the middle of an append that was never acknowledged), so the
    next append starts on a line of its own."""
    if not path.exists():
        return
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            chunk = f.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end != size:
            log.warning("spill file %s: dropping %d bytes of a torn last line", path, size - end)
            f.truncate(end)
