"""``anonfolio record -o OUT.trace [--] COMMAND [ARG...]``: run a program on
this kernel and write what it did to its private anonymous memory, in the
trace format ``anonfolio replay`` reads.

How (see :mod:`.recorder`): COMMAND runs with THP off for it
(``prctl(PR_SET_THP_DISABLE)``, inherited across fork and execve, so each
first touch of a page is one order-0 fault), without address-space
randomisation (personality ``ADDR_NO_RANDOMIZE``, as ``setarch -R``), and
with the kernel's tracepoints for page faults (user and kernel mode: a
``read()`` into a fresh buffer faults inside the system call) and for the
memory system calls recorded into a tracefs instance of its own. ptrace
holds each process still at ``execve`` (the trace starts from its
``/proc/PID/smaps`` and ``pagemap``: the stack and everything the kernel
built), at a fork child's start (its own trace, ``OUT.PID.trace``, starts
from the copy it got) and at exit, where the recorder's picture of the VMAs
and of the present pages must equal the process's own.

Exit status: COMMAND's own; 2 with one line on stderr when COMMAND cannot
be started, when the tracing lost events, or when the picture at exit
differs from the kernel's (the traces written are kept).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .model import RecordError
from .recorder import DEFAULT_BUFFER_KB, Result, record

__all__ = ["add_subcommands", "cmd_record", "record", "RecordError", "Result"]


def add_subcommands(subparsers: Any) -> None:
    """Adds ``record`` to an argparse subparsers object (``func=cmd_record``)."""
    p = subparsers.add_parser(
        "record",
        help="run a program and record its anonymous memory as a trace (root)",
        description="Runs COMMAND with THP off and ASLR off, records every VMA operation and the "
        "first read or write of every private anonymous page, by thread, in the order they "
        "happened, and writes them as a trace. Each further process COMMAND forks gets "
        "OUT.PID.trace. Exit status is COMMAND's; 2 when it cannot start, when the tracing "
        "lost events or when the trace's picture of the VMAs differs from the kernel's at exit.",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT.trace", help="the trace to write")
    p.add_argument(
        "--buffer-size",
        type=int,
        default=DEFAULT_BUFFER_KB,
        metavar="KB",
        help=f"tracefs ring buffer per CPU, in KiB (default {DEFAULT_BUFFER_KB})",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="print on stderr, after the run: events read, trace lines, the program's run "
        "time under the recorder and the time spent writing the traces",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    p.set_defaults(func=cmd_record)


def _fail(msg: str) -> int:
    sys.stderr.write(f"anonfolio: error: {' '.join(msg.split())}\n")
    return 2


def cmd_record(args: argparse.Namespace) -> int:
    """Runs the recording; returns the exit status."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        return _fail("record: missing COMMAND")
    if args.buffer_size < 64:
        return _fail(f"record: --buffer-size {args.buffer_size} is below 64 KiB")
    try:
        res = record(command, args.output, buffer_kb=args.buffer_size)
    except RecordError as e:
        return _fail(f"record: {e}")
    if getattr(args, "stats", False):
        sys.stderr.write(
            f"record: {res.events} events, {res.lines} trace lines in {len(res.traces)} file(s); "
            f"run {res.run_s:.3f} s, processing {res.process_s:.3f} s\n"
        )
    if res.error:
        return _fail(f"record: {res.error}")
    return res.status
