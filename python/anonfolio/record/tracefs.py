"""The kernel's tracepoints through a private tracefs instance.

``Instance`` makes ``/sys/kernel/tracing/instances/NAME`` (its own ring
buffers and event switches, so nobody else's tracing is touched), follows a
set of pids and their descendants (``set_event_pid`` + ``options/event-fork``),
stamps every event with the ``counter`` clock (one global atomic counter: a
total order across CPUs, the order things happened in) and copies each CPU's
buffer out as raw ring-buffer pages (``per_cpu/cpuN/trace_pipe_raw``): the
kernel never formats text, so the program being traced pays only for the
tracepoint itself.

``read_events`` decodes those pages (the layout is ``events/header_page`` and
``events/header_event``, decoded as ``kernel/trace/ring_buffer.c`` writes
them) and merges the CPUs into one stream in counter order.

Nothing is lost silently: ``overwrite`` is off (a full buffer drops new
events and counts them), and :meth:`Instance.losses` reports the per-CPU
``dropped events``, ``overrun`` and ``commit overrun`` counters and any page
the kernel flagged with missed events.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import os
import re
import select
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

TRACEFS = Path("/sys/kernel/tracing")

#: Commit-field flags of a ring-buffer page (ring_buffer.c RB_MISSED_EVENTS,
#: RB_MISSED_STORED): the reader lost events before this page.
RB_MISSED_EVENTS = 1 << 31
RB_MISSED_STORED = 1 << 30
RB_COMMIT_MASK = (1 << 30) - 1
#: Event header type_len values (ring_buffer.c RINGBUF_TYPE_*).
RINGBUF_TYPE_PADDING = 29
RINGBUF_TYPE_TIME_EXTEND = 30
RINGBUF_TYPE_TIME_STAMP = 31
TS_SHIFT = 27
TS_MSB = ((1 << 64) - 1) & ~((1 << 59) - 1)


class TracefsError(Exception):
    """tracefs cannot be used (not root, not mounted, an event missing)."""


@dataclass(frozen=True)
class Field:
    offset: int
    size: int
    signed: bool


@dataclass(frozen=True)
class EventFormat:
    """One event's binary layout as ``events/SYSTEM/NAME/format`` gives it."""

    system: str
    name: str
    id: int
    fields: dict[str, Field]

    def getter(self, *names: str) -> struct.Struct:
        """A struct reading ``names`` (contiguous or not) from the record: the
        fields are read at their offsets with one ``unpack_from``."""
        fmt = ["<"]
        pos = 0
        for n in names:
            f = self.fields[n]
            if f.offset < pos:
                raise TracefsError(f"{self.system}/{self.name}: fields out of order: {names}")
            fmt.append(f"{f.offset - pos}x" if f.offset > pos else "")
            code = {1: "b", 2: "h", 4: "i", 8: "q"}[f.size]
            fmt.append(code if f.signed else code.upper())
            pos = f.offset + f.size
        return struct.Struct("".join(fmt))


_FIELD_RE = re.compile(
    r"field:(?P<decl>[^;]*);\s*offset:(?P<off>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>-?\d+);"
)


def parse_format(system: str, name: str, text: str) -> EventFormat:
    m = re.search(r"^ID:\s*(\d+)", text, re.M)
    if not m:
        raise TracefsError(f"{system}/{name}: no ID in its format file")
    fields: dict[str, Field] = {}
    for fm in _FIELD_RE.finditer(text):
        decl = fm.group("decl").strip()
        fname = re.sub(r"\[.*\]$", "", decl.split()[-1])
        fields[fname] = Field(int(fm.group("off")), int(fm.group("size")), fm.group("signed") == "1")
    return EventFormat(system, name, int(m.group(1)), fields)


class Instance:
    """A tracefs instance of our own; remove it with :meth:`close`."""

    def __init__(self, name: str, buffer_kb: int, clock: str = "counter"):
        if not (TRACEFS / "instances").is_dir():
            # tracefs may be unmounted on a fresh boot; mounting it is harmless.
            os.system("mount -t tracefs nodev /sys/kernel/tracing >/dev/null 2>&1")
        if not (TRACEFS / "instances").is_dir():
            raise TracefsError(f"tracefs is not available at {TRACEFS} (mount -t tracefs nodev {TRACEFS})")
        _remove_orphans()
        self.dir = TRACEFS / "instances" / name
        try:
            self.dir.mkdir()
        except FileExistsError:
            raise TracefsError(f"tracefs instance {self.dir} already exists (another recording?)") from None
        except PermissionError:
            raise TracefsError(f"cannot create {self.dir}: recording needs root") from None
        self.enabled: list[EventFormat] = []
        self._readers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._errors: list[str] = []
        self.missed_pages = 0
        self.ncpu = len(list((self.dir / "per_cpu").glob("cpu*")))
        # trace_pipe_raw hands out whole sub-buffers (one page unless set otherwise)
        try:
            self.page_size = int((self.dir / "buffer_subbuf_size_kb").read_text()) * 1024
        except (OSError, ValueError):
            self.page_size = os.sysconf("SC_PAGE_SIZE")
        self._write("tracing_on", "0")
        self._write("trace_clock", clock)
        self._write("options/overwrite", "0")
        self._write("options/event-fork", "1")
        self._write("buffer_size_kb", str(buffer_kb))

    def _write(self, rel: str, value: str) -> None:
        try:
            with open(self.dir / rel, "w") as f:
                f.write(value)
        except OSError as e:
            raise TracefsError(f"cannot write {value!r} to {self.dir / rel}: {e.strerror}") from None

    def formats(self, events: Sequence[str]) -> dict[int, EventFormat]:
        out = {}
        for ev in events:
            system, name = ev.split("/")
            path = self.dir / "events" / system / name / "format"
            try:
                text = path.read_text()
            except OSError:
                raise TracefsError(f"this kernel has no tracepoint {system}:{name}") from None
            fmt = parse_format(system, name, text)
            out[fmt.id] = fmt
        return out

    def follow(self, pid: int) -> None:
        self._write("set_event_pid", str(pid))

    def enable(self, events: Sequence[str]) -> None:
        for ev in events:
            self._write(f"events/{ev}/enable", "1")

    def marker(self, text: str) -> None:
        """Writes ``text`` as an ``ftrace:print`` event, stamped in the same
        counter order as the traced program's events. A full buffer refuses
        it (EBADF); the readers are draining it meanwhile, so try again."""
        deadline = time.monotonic() + 10.0
        while True:
            try:
                with open(self.dir / "trace_marker", "w") as f:
                    f.write(text)
                return
            except OSError as e:
                if e.errno != errno.EBADF or time.monotonic() > deadline:
                    raise TracefsError(f"cannot write a marker into {self.dir}: {e.strerror}") from None
                time.sleep(0.001)

    def start_readers(self, outdir: Path) -> list[Path]:
        paths = []
        for cpu in range(self.ncpu):
            p = outdir / f"cpu{cpu}.raw"
            paths.append(p)
            t = threading.Thread(target=self._copy, args=(cpu, p), daemon=True, name=f"tracefs-cpu{cpu}")
            t.start()
            self._readers.append(t)
        return paths

    def on(self) -> None:
        self._write("tracing_on", "1")

    def _copy(self, cpu: int, path: Path) -> None:
        # Raw pages straight to a file: decoding waits until the program is done.
        try:
            fd = os.open(self.dir / "per_cpu" / f"cpu{cpu}" / "trace_pipe_raw", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            self._errors.append(f"cpu{cpu}: {e.strerror}")
            return
        try:
            with open(path, "wb") as out:
                while True:
                    try:
                        chunk = os.read(fd, 1 << 16)
                    except BlockingIOError:
                        chunk = b""
                    if chunk:
                        out.write(chunk)
                        continue
                    if self._stop.is_set():
                        break
                    select.select([fd], [], [], 0.05)
        except OSError as e:
            self._errors.append(f"cpu{cpu}: {e.strerror}")
        finally:
            os.close(fd)

    def stop(self) -> None:
        """Stops tracing and drains every CPU's buffer (partial pages too)."""
        self._write("tracing_on", "0")
        self._stop.set()
        for t in self._readers:
            t.join()

    def losses(self) -> list[str]:
        """What the tracing dropped, one string a CPU; empty when nothing was."""
        out = list(self._errors)
        for cpu in range(self.ncpu):
            text = (self.dir / "per_cpu" / f"cpu{cpu}" / "stats").read_text()
            stats = dict(re.findall(r"^([a-z ]+):\s*(\S+)", text, re.M))
            for key in ("overrun", "commit overrun", "dropped events"):
                n = int(stats.get(key, "0"))
                if n:
                    out.append(f"cpu{cpu}: {n} {key}")
        return out

    def close(self) -> None:
        try:
            self._write("tracing_on", "0")
            for ev in reversed(self.enabled):
                self._write(f"events/{ev.system}/{ev.name}/enable", "0")
            self._write("events/enable", "0")
            self._write("set_event_pid", "")
        except TracefsError:
            pass
        with contextlib.suppress(OSError):
            self.dir.rmdir()


INSTANCE_PREFIX = "anonfolio-record-"


def _remove_orphans() -> None:
    """Removes instances left by recorders that were killed (their pid is
    gone): each holds ring buffers the kernel would keep forever."""
    for d in (TRACEFS / "instances").glob(INSTANCE_PREFIX + "*"):
        pid = d.name[len(INSTANCE_PREFIX) :]
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            (d / "events" / "enable").write_text("0")
            d.rmdir()
        except OSError:
            pass


# ----------------------------------------------------------------------------
# Decoding trace_pipe_raw pages

_PAGE_HDR = struct.Struct("<QQ")
_U32 = struct.Struct("<I")
_TYPE = struct.Struct("<xxxxH")  # common_type after the 4-byte event header


class MissedEvents(Exception):
    """A page says the ring buffer lost events before it."""


def _page_events(buf: bytes, page_size: int, cpu: int) -> Iterator[tuple[int, int, int, bytes]]:
    """Yields (timestamp, cpu, event type id, record) from one CPU's raw pages,
    in that CPU's order; raises :class:`MissedEvents` on a page flagged lost."""
    for base in range(0, len(buf) - _PAGE_HDR.size + 1, page_size):
        ts, commit = _PAGE_HDR.unpack_from(buf, base)
        if commit & (RB_MISSED_EVENTS | RB_MISSED_STORED):
            raise MissedEvents(f"cpu{cpu}: a ring-buffer page lost events")
        end = base + 16 + (commit & RB_COMMIT_MASK)
        pos = base + 16
        while pos < end:
            (hdr,) = _U32.unpack_from(buf, pos)
            type_len = hdr & 31
            delta = hdr >> 5
            if type_len == RINGBUF_TYPE_PADDING:
                if delta == 0:
                    break  # the rest of the page is padding
                (length,) = _U32.unpack_from(buf, pos + 4)
                pos += 4 + length
                continue
            if type_len == RINGBUF_TYPE_TIME_EXTEND:
                (hi,) = _U32.unpack_from(buf, pos + 4)
                ts += (hi << TS_SHIFT) | delta
                pos += 8
                continue
            if type_len == RINGBUF_TYPE_TIME_STAMP:
                (hi,) = _U32.unpack_from(buf, pos + 4)
                ts = ((hi << TS_SHIFT) | delta) | (ts & TS_MSB)
                pos += 8
                continue
            ts += delta
            if type_len == 0:
                (length,) = _U32.unpack_from(buf, pos + 4)
                data = buf[pos + 8 : pos + 4 + length]
                pos += 4 + length
            else:
                data = buf[pos + 4 : pos + 4 + 4 * type_len]
                pos += 4 + 4 * type_len
            (etype,) = struct.unpack_from("<H", data, 0)
            yield ts, cpu, etype, data


def _cpu_stream(path: Path, page_size: int, cpu: int) -> Iterator[tuple[int, int, int, bytes]]:
    f: BinaryIO
    with open(path, "rb") as f:
        while True:
            chunk = f.read(page_size * 256)
            if not chunk:
                return
            yield from _page_events(chunk, page_size, cpu)


def read_events(paths: Sequence[Path], page_size: Optional[int] = None) -> Iterator[tuple[int, int, int, bytes]]:
    """All CPUs' events merged in timestamp (counter) order."""
    ps = page_size or os.sysconf("SC_PAGE_SIZE")
    streams = [_cpu_stream(p, ps, cpu) for cpu, p in enumerate(paths)]
    return heapq.merge(*streams)
