"""The payload log's ring: the records the request path writes and the writer process reads, in one shared
memory file both processes map (a Linux memfd; elsewhere an unlinked temporary file).

Why a ring. The request path copies a request's metadata and tensor bytes into it and keeps no reference to
the request; the writer process reads the records straight from the shared pages. Before, the server held
each cycle's requests (bodies, arrays) and a thread of its own packed, pickled and sent them over a socket:
that thread held the GIL for milliseconds at a time (benchmarks/README.md, "Payload log cost").

Layout: a 4 KiB header, then ``size`` bytes of records. Positions are logical byte counts that only grow
(position mod ``size`` is the place in the data area), so a position also names a record for ever: the
writer makes each row's ``uid`` from it. The header's counters (native u64 words, each pair on a cache line
of its own; a word is read and written whole, never through ``struct``, which zeroes before it writes):

- ``head`` / ``head_count`` (written by the server): bytes and records (requests and feedback) written;
- ``stored`` / ``stored_count`` (written by the writer): bytes and records in the database or fsync'ed in the
  spill file. The server reuses space behind ``stored`` only, so a writer process that dies loses nothing:
  its successor starts reading at ``stored`` (a row stored twice is skipped by its ``uid``);
- ``seen`` / ``seen_count`` (written by the writer): records encoded (their predictions joinable).

Records are 8-byte aligned. Kinds:

- ``ANSWERED``: an answered request of a known *layout* (config, model, version, protocol, tensor names,
  dtypes and shapes; defined once by a ``LAYOUT`` record): ``_ANSWERED`` (length, kind, layout, time,
  latency, request id and client NUL-padded to 64 bytes), then the tensors' bytes. Every record of a layout
  has one size, so the server writes a block of them with one numpy copy per column (``flush_pending``) and
  the writer reads a run of them as one numpy array (``record_dtype``, ``_run``);
- ``REQUEST``: anything else (failures, odd dtypes, long ids): ``_RECORD`` (length, kind, tensor counts,
  status, config key, time, latency, string lengths), the strings, then per tensor ``_TENSOR`` (ndim, dtype
  code, name length, byte count), its dims, its name and its bytes (pickled for object dtypes);
- ``FEEDBACK``, ``CONFIG``, ``LAYOUT``: a pickle;
- ``PAD``: the rest of the data area, when the next record does not fit there, or when the writer has stored
  past an eighth of the area in this lap: the next record starts at the beginning again, so the pages in use
  stay the first ones while the writer keeps up.

Order: the server publishes ``head`` after the records' bytes, under a lock; the writer reads ``head`` under
a lock of its own before it reads the records, and publishes ``stored`` after it is done with them.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import tempfile
import threading
from operator import attrgetter

from itertools import chain

import numpy as np

from modelserve.monitor.encode import Omitted

HEADER = 4096
#: the header's u64 words (each pair on a cache line of its own): (bytes, records)
_HEAD, _STORED, _SEEN = 0, 8, 16
_KIND = struct.Struct("<IB")
_LAYOUT_ID = struct.Struct("<I")
#: total, kind, inputs, outputs (255: None), status, config key (0: none), at, latency ns, six string lengths
_RECORD = struct.Struct("<IBBBxiidqHHHHHI")
#: ndim, dtype code (0: pickled, OMITTED: too large), name length, bytes
_TENSOR = struct.Struct("<BBHI")
_DIMS = [struct.Struct(f"<{n}q") for n in range(33)]
PAD, REQUEST, FEEDBACK, CONFIG, LAYOUT, ANSWERED = 0, 1, 2, 3, 4, 5
#: an answered request of a known layout: total, kind, layout id, at, latency ns, request id, client (NUL-padded)
_ANSWERED = struct.Struct("<IBxxxIxxxxdq64s64s")
_NAMES = ("total", "kind", "layout", "at", "latency", "request_id", "client")
_FORMATS = ("<u4", "u1", "<u4", "<f8", "<i8", "S64", "S64")
_OFFSETS = (0, 4, 8, 16, 24, 32, 96)
NONE = 255
OMITTED = 255  # dtype code of a tensor written without its bytes
_DTYPES = [None, *map(np.dtype, ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                                  "float16", "float32", "float64"))]
_CODES = {d: i for i, d in enumerate(_DTYPES) if d is not None}
#: a record of payload kinds larger than this fraction of the ring is written without its tensors' bytes
MAX_RECORD_FRACTION = 8
#: bytes kept free for feedback rows (never dropped) when requests fill the ring (at most 1/16 of it)
FEEDBACK_RESERVE = 1 << 20
#: answered records of one layout wait for this many (or this many bytes) before they are written as one block
FLUSH_RECORDS = 64
FLUSH_BYTES = 1 << 20
#: the writer wraps back to the start of the area once the reader has stored past 1/EARLY_WRAP of it
EARLY_WRAP = 8
_MAX_STRING = 16_000  # bytes of a request id, client, model, version or protocol (the columns keep 200 or fewer)


def _align(n: int) -> int:
    return (n + 7) & ~7


class _Mapped:
    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self.map = mmap.mmap(fd, HEADER + size)
        self.buf = memoryview(self.map)
        #: the header as native u64 words: each read or write of one is a single 8-byte access (struct's
        #: pack_into zeroes its bytes first: the other process could read a half-written counter)
        self.words = self.buf[:HEADER].cast("Q")

    def pair(self, at: int) -> tuple[int, int]:
        words = self.words
        return words[at], words[at + 1]

    def set_pair(self, at: int, first: int, second: int) -> None:
        """The second word, then the first: a reader that sees the new first sees the new second."""
        self.words[at + 1] = second
        self.words[at] = first


class RingProducer(_Mapped):
    """The server's side: writes records (request path: ``request``), reads what the writer stored."""

    def __init__(self, size: int, max_records: int, directory: str | None = None):
        size = max(_align(size), 1 << 16)
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("modelserve-payload-log", os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux
            fd = os.dup(tempfile.TemporaryFile(dir=directory).fileno())
        os.ftruncate(fd, HEADER + size)
        super().__init__(fd, size)
        # the pages the ring uses while the writer keeps up, faulted in now rather than on the request path
        warm = min(size, size // EARLY_WRAP * 2)
        self.buf[HEADER:HEADER + warm] = bytes(warm)
        self.max_records = max_records
        self.reserve = min(FEEDBACK_RESERVE, size // 16)
        self._head = self._count = 0
        #: (config key, model, version, protocol, names, dtypes and shapes of the tensors) -> (id, tensor bytes)
        self._layouts: dict[tuple, tuple[int, list[int]]] = {}
        self.layouts: dict[int, tuple] = {}  # id -> what the writer needs to read its records
        self._layout_lock = threading.Lock()
        self._pending: list[tuple] = []
        self._pending_layout: tuple | None = None
        self._pending_lock = threading.Lock()
        self._lock = threading.Lock()

    def stored(self) -> tuple[int, int]:
        return self.pair(_STORED)

    def seen(self) -> tuple[int, int]:
        return self.pair(_SEEN)

    def written(self) -> tuple[int, int]:
        return self._head, self._count

    def answered(self, at: float, request_id: str, client: str | None, latency_ns: int, key: int | None,
                 model: str, version: str, protocol: str, inputs: dict, outputs: dict) -> int:
        """An answered request. When it suits a layout (its tensors' names, dtypes and shapes seen before, short
        ids) it waits in a small batch of its layout, written into the ring as one block of equal-size records
        (numpy copies each column at once: ``flush_pending``), which the writer reads as one array; else it
        goes in alone (``request``). Returns how many records were dropped (the ring full)."""
        arrays = [*inputs.values(), *outputs.values()]
        sig = (key, model, version, protocol, *inputs, None, *outputs, *[(a.dtype, a.shape) for a in arrays])
        layout = self._layouts.get(sig)
        if layout is None:
            layout = self._layout(sig, inputs, outputs)
        rid, host = request_id.encode(), client.encode() if client else b""
        if layout is None or len(rid) > 64 or len(host) > 64 or not all(a.flags.c_contiguous for a in arrays):
            return self.request(at, request_id, model, version, protocol, client, 200, None, latency_ns, key,
                                inputs, outputs)
        dropped = 0
        with self._pending_lock:
            if layout is not self._pending_layout:
                dropped = self._flush_locked()
                self._pending_layout = layout
            self._pending.append((at, latency_ns, rid, host, arrays))
            if len(self._pending) >= layout[4]:
                dropped += self._flush_locked()
        return dropped

    def flush_pending(self) -> int:
        """Write the batch waiting (the watchdog calls this every cycle, sync and close before they wait)."""
        with self._pending_lock:
            return self._flush_locked()

    def _flush_locked(self) -> int:
        pending, self._pending = self._pending, []
        if not pending:
            return 0
        ident, sizes, total, dtype, _, shapes = self._pending_layout
        k = len(pending)
        with self._lock:
            at_off = self._reserve(k * total, self.reserve)
            if at_off is None:
                return k
            block = np.frombuffer(self.buf, dtype, k, at_off)
            at, latency, rid, host, arrays = zip(*pending)
            block["total"], block["kind"], block["layout"] = total, ANSWERED, ident
            block["at"], block["latency"], block["request_id"], block["client"] = at, latency, rid, host
            for i, column in enumerate(zip(*arrays)):
                field = block[f"t{i}"]
                if shapes[i][0] == 1:  # one row each (the common case): the rows are one (strided) array
                    np.concatenate(column, axis=0, out=field.reshape(k, *shapes[i][1:]))
                else:
                    for j, array in enumerate(column):
                        field[j] = array
            self._publish(k * total, k)
        return 0

    def layouts_now(self) -> dict:
        with self._layout_lock:
            return dict(self.layouts)

    def _layout(self, sig: tuple, inputs: dict, outputs: dict) -> tuple | None:
        """A new layout (written into the ring for the writer), or None when the tensors do not suit one."""
        with self._layout_lock:
            layout = self._layouts.get(sig)
            return layout if layout is not None else self._new_layout(sig, inputs, outputs)

    def _new_layout(self, sig: tuple, inputs: dict, outputs: dict) -> tuple | None:
        arrays = [*inputs.values(), *outputs.values()]
        if not inputs or not outputs or len(self._layouts) >= 1000 or any(
                type(a) is not np.ndarray or a.dtype not in _CODES or not a.ndim for a in arrays):
            return None
        sizes = [_align(a.nbytes) for a in arrays]
        total = _ANSWERED.size + sum(sizes)
        if total > self.size // MAX_RECORD_FRACTION:
            return None
        ident = len(self.layouts) + 1
        tensors = [(str(n), a.dtype.str, a.shape) for n, a in chain(inputs.items(), outputs.items())]
        spec = (sig[0], sig[1], sig[2], sig[3], len(inputs), tensors, total)
        if not self.blob(LAYOUT, (ident, spec)):
            return None
        self.layouts[ident] = spec
        batch = max(1, min(FLUSH_RECORDS, FLUSH_BYTES // total))
        self._layouts[sig] = layout = (ident, sizes, total, record_dtype(spec), batch, [a.shape for a in arrays])
        return layout

    def request(self, at: float, request_id: str, model: str, version: str | None, protocol: str,
                client: str | None, status: int, error: str | None, latency_ns: int, key: int | None,
                inputs: dict | None, outputs: dict | None) -> int:
        """One request's record, after the block of answered ones waiting (the ring keeps the requests' order).
        Returns how many records were dropped: the ring full (the writer that far behind)."""
        strings = [s.encode("utf-8", "replace")[:_MAX_STRING] if s else b"" for s in
                   (request_id, client, model, version, protocol)]
        strings.append(error.encode("utf-8", "replace") if error else b"")
        text = b"".join(strings)
        size = _align(_RECORD.size + len(text))
        parts = []
        for tensors in (inputs, outputs):
            for name, array in (tensors or {}).items():
                if type(array) is not np.ndarray:
                    array = np.asarray(array)
                code = _CODES.get(array.dtype, 0)
                try:
                    data = array.data.cast("B") if code else pickle.dumps(array)
                except (TypeError, ValueError):  # not contiguous, 0-d
                    data = array.tobytes()
                encoded = str(name).encode()
                parts.append((encoded, array, data, code))
                size += _TENSOR.size + 8 * array.ndim + _align(len(encoded)) + _align(len(data))
        if size > self.size // MAX_RECORD_FRACTION:  # kept bounded: the tensors' shapes, dtypes and sizes only
            parts = [(name, array, pickle.dumps((array.dtype.str, len(data))), OMITTED)
                     for name, array, data, _ in parts]
            size = _align(_RECORD.size + len(text)) + sum(_TENSOR.size + 8 * a.ndim + _align(len(n)) + _align(len(d))
                                                          for n, a, d, _ in parts)
        n_in = len(inputs) if inputs is not None else NONE
        n_out = len(outputs) if outputs is not None else NONE
        dropped = self.flush_pending()
        with self._lock:
            at_off = self._reserve(size, self.reserve)
            if at_off is None:
                return dropped + 1
            buf = self.buf
            _RECORD.pack_into(buf, at_off, size, REQUEST, n_in, n_out, status, key or 0, at, latency_ns,
                              *map(len, strings))
            q = at_off + _RECORD.size
            buf[q:q + len(text)] = text
            q = _align(q + len(text))
            for name, array, data, code in parts:
                ndim = array.ndim
                _TENSOR.pack_into(buf, q, ndim, code, len(name), len(data))
                _DIMS[ndim].pack_into(buf, q + 8, *array.shape)
                q += 8 + 8 * ndim
                buf[q:q + len(name)] = name
                q += _align(len(name))
                buf[q:q + len(data)] = data
                q += _align(len(data))
            self._publish(size, 1)
        return dropped

    def blob(self, kind: int, value, reserve: int = 0) -> bool:
        """A pickled ``value`` (feedback row, config); False when the ring is full."""
        data = pickle.dumps(value)
        size = _align(_RECORD.size + len(data))
        with self._lock:
            at_off = self._reserve(size, reserve)
            if at_off is None:
                return False
            _RECORD.pack_into(self.buf, at_off, size, kind, 0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0)
            self.buf[at_off + _RECORD.size:at_off + _RECORD.size + len(data)] = data
            self._publish(size, 1 if kind == FEEDBACK else 0)
        return True

    def _reserve(self, size: int, reserve: int) -> int | None:
        """Where (an offset in the map) a record of ``size`` bytes goes, padding to the area's start when it
        does not fit before the end (or when the writer has stored everything); None when full."""
        stored, stored_count = self.stored()
        head = self._head
        place = head % self.size
        # back to the area's start once the writer has stored past an eighth of it in this lap (its records
        # there are done with): the pages in use stay the first ones, not the whole area, while it keeps up
        if (head - stored < place and stored % self.size >= self.size // EARLY_WRAP) or place + size > self.size:
            pad = self.size - place
        else:
            pad = 0
        if (self.size - (head - stored) < pad + size + reserve
                or (reserve and self._count - stored_count >= self.max_records)):
            return None
        if pad:
            _RECORD.pack_into(self.buf, HEADER + place, pad, PAD, 0, 0, 0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0)
            self._head += pad
            place = 0
        return HEADER + place

    def _publish(self, size: int, records: int) -> None:
        self._head += size
        self._count += records
        self.set_pair(_HEAD, self._head, self._count)


def record_dtype(spec: tuple) -> np.dtype:
    """A layout's records as a numpy record type: a block of them is one array (columns: ``_NAMES``, then
    ``t0``, ``t1`` ... the tensors)."""
    names, formats, offsets = list(_NAMES), list(_FORMATS), list(_OFFSETS)
    q = _ANSWERED.size
    for i, (_, dtype, shape) in enumerate(spec[5]):
        dtype = np.dtype(dtype)
        names.append(f"t{i}")
        formats.append((dtype, shape))
        offsets.append(q)
        q += _align(dtype.itemsize * int(np.prod(shape)))
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": spec[6]})


class RingConsumer(_Mapped):
    """The writer's side: reads records from ``stored`` on, and publishes what it encoded and stored."""

    def __init__(self, fd: int, size: int, layouts: dict | None = None):
        super().__init__(fd, size)
        self._lock = threading.Lock()
        self.read, self.read_count = self.pair(_STORED)
        self._layouts: dict[int, tuple] = {}
        for ident, spec in (layouts or {}).items():
            self._define(ident, spec)

    def _define(self, ident: int, spec: tuple) -> None:
        self._layouts[ident] = (record_dtype(spec), spec)

    def head(self) -> tuple[int, int]:
        with self._lock:  # acquire: the records behind head are read after it
            return self.pair(_HEAD)

    def waiting(self) -> int:
        return self.head()[1] - self.read_count

    def mark_seen(self, end: int, count: int) -> None:
        self.set_pair(_SEEN, end, count)

    def mark_stored(self, end: int, count: int) -> None:
        with self._lock:  # release: the server may now write over these records
            self.set_pair(_STORED, end, count)

    def take(self, limit: int) -> tuple[list, dict, int, int] | None:
        """Up to ``limit`` records (requests and feedback) from where reading stopped: (items, configs found,
        end position, end count), or None when there are none. An item is a run of answered records
        (``("r", group, uid numbers)``, see ``_run``), or a request as the flat tuple ``pack`` takes, or a
        feedback row ``("f", row, position)``; a record's uid number is its position."""
        head, _ = self.head()
        records, configs = [], {}
        pos, count = self.read, self.read_count
        buf = self.buf
        while pos < head and count - self.read_count < limit:
            at_off = HEADER + pos % self.size
            size, kind = _KIND.unpack_from(buf, at_off)
            if kind == ANSWERED:
                dtype, spec = self._layouts[_LAYOUT_ID.unpack_from(buf, at_off + 8)[0]]
                n = min(head - pos, self.size - pos % self.size) // size
                view = np.frombuffer(buf, dtype, min(n, limit - (count - self.read_count)), at_off)
                same = (view["kind"] == ANSWERED) & (view["layout"] == view["layout"][0]) & (view["total"] == size)
                view = view if same.all() else view[:int(same.argmin())]
                records.append(_run(view, spec, pos))
                count += len(view)
                pos += size * len(view)
                continue
            if kind == REQUEST:
                records.append(_request(buf, at_off, _RECORD.unpack_from(buf, at_off), pos))
                count += 1
            elif kind == FEEDBACK:
                records.append(("f", pickle.loads(buf[at_off + _RECORD.size:at_off + size]), pos))
                count += 1
            elif kind == CONFIG:
                key, config = pickle.loads(buf[at_off + _RECORD.size:at_off + size])
                configs[key] = config
            elif kind == LAYOUT:
                self._define(*pickle.loads(buf[at_off + _RECORD.size:at_off + size]))
            pos += size
        if pos == self.read:
            return None
        self.read, self.read_count = pos, count
        return records, configs, pos, count


def _run(view: np.ndarray, spec: tuple, pos: int) -> tuple:
    """A run of answered records of one layout -> ("r", a group as ``pack`` makes them, uid numbers): columns
    read off the numpy view, each tensor copied out once, already joined."""
    key, model, version, protocol, n_in, tensors, total = spec
    n = len(view)
    joined = {}
    for i, (name, _, shape) in enumerate(tensors):
        joined[i] = (name, view[f"t{i}"].copy().reshape(n * shape[0], *shape[1:]), [shape[0]] * n)
    p_in = ("c", {name: (array, rows) for i, (name, array, rows) in joined.items() if i < n_in})
    p_out = ("c", {name: (array, rows) for i, (name, array, rows) in joined.items() if i >= n_in})
    rid = [b.decode("utf-8", "replace") for b in view["request_id"].tolist()]
    client = [b.decode("utf-8", "replace") or None for b in view["client"].tolist()]
    group = (key, model, version, None, view["at"].tolist(), rid, [protocol] * n, client, [200] * n, [None] * n,
             view["latency"].tolist(), p_in, p_out)
    return "r", group, list(range(pos, pos + n * total, total))


def _request(buf, at_off: int, fields: tuple, pos: int) -> tuple:
    """A request record -> ("p", at, request id, model, version, protocol, client, status, error, latency ns,
    config key, inputs, outputs, position): inputs and outputs as {name: array} or None, arrays views of the ring."""
    _, _, n_in, n_out, status, key, at, latency, *lengths = fields
    q = at_off + _RECORD.size
    strings = []
    for n in lengths:
        strings.append(str(buf[q:q + n], "utf-8", "replace") if n else None)
        q += n
    request_id, client, model, version, protocol, error = strings
    q = _align(q)
    inputs, outputs = ({} if n_in != NONE else None), ({} if n_out != NONE else None)
    for tensors, count in ((inputs, n_in), (outputs, n_out)):
        for _ in range(count if tensors is not None else 0):
            ndim, code, name_len, nbytes = _TENSOR.unpack_from(buf, q)
            shape = _DIMS[ndim].unpack_from(buf, q + 8)
            q += 8 + 8 * ndim
            name = str(buf[q:q + name_len], "utf-8")
            q += _align(name_len)
            data = buf[q:q + nbytes]
            q += _align(nbytes)
            if code == OMITTED:  # too large for the ring: its shape, dtype and size only
                tensors[name] = Omitted(shape, *pickle.loads(data))
            elif code:
                tensors[name] = np.frombuffer(data, _DTYPES[code]).reshape(shape)
            else:
                tensors[name] = pickle.loads(data)
    return ("p", at, request_id or "", model or "", version, protocol or "", client, status, error, latency,
            key or None, inputs, outputs, pos)


# -- the writer's packing: records of a take -> per model version, columns with their arrays joined ------------

_dtype_of = attrgetter("dtype")


def _own(tensors: dict | None) -> dict | None:
    """Arrays that outlive the ring's records (the writer may reuse them after ``mark_stored``)."""
    if tensors is None:
        return None
    return {n: (a.copy() if isinstance(a, np.ndarray) and a.base is not None else a) for n, a in tensors.items()}


def pack_dicts(tensors: list) -> tuple:
    """One tensor dict (or None) per record -> ``("c", {name: (joined, rows per record)})`` when every record
    has the same names in the same order and, per name, one dtype and row shape; else ``("l", tensors)``."""
    first = tensors[0]
    if first:
        try:
            names = tuple(first)
            if all(t is not None and tuple(t) == names for t in tensors):
                out = {}
                for name in names:
                    arrays = [t[name] for t in tensors]
                    if len(set(map(_dtype_of, arrays))) != 1 or not all(isinstance(a, np.ndarray) for a in arrays):
                        return "l", [_own(t) for t in tensors]
                    out[name] = (np.concatenate(arrays), list(map(len, arrays)))
                return "c", out
        except (ValueError, TypeError, AttributeError):  # 0-d arrays, other row shapes, not arrays
            pass
    return "l", [_own(t) for t in tensors]


def _columns(records: list[tuple]) -> tuple:
    """Requests of one model version -> (at, request_id, protocol, client, status, error, latency_ns, inputs,
    outputs) columns, the tensors packed (``pack_dicts``)."""
    cols = list(zip(*records))
    return (cols[1], cols[2], cols[5], cols[6], cols[7], cols[8], cols[9], pack_dicts(list(cols[11])),
            pack_dicts(list(cols[12])))


def pack(records: list[tuple]) -> tuple[list, list, list]:
    """Records taken one by one (failures, odd tensors; answered runs come as groups already) -> (uid numbers
    in order, feedback rows with their place, groups): per model version (config key, model, version, the
    records' places, at, request id, protocol, client, status, error, latency ns, inputs, outputs)."""
    feedback, groups = [], {}
    for i, record in enumerate(records):
        if record[0] == "p":
            groups.setdefault((record[10], record[3], record[4]), []).append(i)
        else:
            feedback.append((i, record[1]))
    packed = [(key, model, version, idx, *_columns([records[i] for i in idx]))
              for (key, model, version), idx in groups.items()]
    return [r[-1] for r in records], feedback, packed
