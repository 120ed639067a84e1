#!/usr/bin/env python3
"""Summarize a py-spy ``--format raw`` profile (collapsed stacks): where the coordinator's time goes.

    python stress/profile_summary.py /tmp/prof/coordinator-insert-lb-c1-p2.txt [--top 25]

Prints samples per thread kind (client server threads, database threads, others),
then the top functions by self samples and by inclusive samples (a function
counted once per stack), each as a share of all samples.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_THREAD = re.compile(r"^thread \((?:0x)?[0-9a-fA-F]+\): ?(?P<name>[^;]*)")


def thread_kind(name: str) -> str:
    if name.startswith("db-"):
        return "database threads (db-*)"
    if name in ("accept", "MainThread"):
        return name
    return "client server threads"  # the Manager names them "client", then after the client process


def load(path: Path) -> list[tuple[str, list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        body, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = body.split(";")
        name = ""
        m = _THREAD.match(frames[0]) if frames else None
        if m:
            name = m.group("name")
            frames = frames[1:]
        stacks.append((name, frames, n))
    return stacks


def short(frame: str) -> str:
    # "Func (path/file.py:123)" -> "Func (file.py)" so all lines of a function add up
    m = re.match(r"^(?P<fn>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$", frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("django_lb_shm/", "django/", "multiprocessing/"):
        if marker in file:
            file = file[file.index(marker):]
            break
    else:
        file = file.rsplit("/", 1)[-1]
    return f"{m.group('fn')} ({file})"


def summarize(path: Path, top: int = 25) -> str:
    stacks = load(path)
    total = sum(n for _, _, n in stacks) or 1
    kinds: Counter = Counter()
    self_c: Counter = Counter()
    incl: Counter = Counter()
    for name, frames, n in stacks:
        kinds[thread_kind(name)] += n
        if frames:
            self_c[short(frames[-1])] += n
        for f in {short(f) for f in frames}:
            incl[f] += n
    out = [f"{path.name}: {total} samples"]
    out.append("by thread kind:")
    out += [f"  {100.0 * n / total:5.1f}%  {k}" for k, n in kinds.most_common()]
    out.append(f"top {top} by self samples:")
    out += [f"  {100.0 * n / total:5.1f}%  {f}" for f, n in self_c.most_common(top)]
    out.append(f"top {top} by inclusive samples:")
    out += [f"  {100.0 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    return "\n".join(out)


CATEGORIES = (  # (thread kind prefix, substring in the stack, label); first match wins
    ("client", "Sequencer.acquire", "write: waiting for the write-order lock (Sequencer.acquire)"),
    ("client", "Sequencer.leader", "write: choosing the leader (Sequencer.leader)"),
    ("client", "Sequencer._wait_for_acks", "write: waiting for WRITE_ACK (Sequencer._wait_for_acks)"),
    ("client", "DbConnection.begin", "write: leader BEGIN"),
    ("client", "DbConnection.set_marker", "write: leader UPDATE marker"),
    ("client", "DbConnection.commit", "write: leader COMMIT"),
    ("client", "Journal.append", "write: journal append"),
    ("client", "Sequencer._execute", "write: leader statement"),
    ("client", "Sequencer._publish", "write: queue to followers"),
    ("client", "RequestRouter._await", "read: waiting for the database thread"),
    ("client", "RequestRouter.read", "read: dispatch (algorithm, submit)"),
    ("client", "RequestRouter._decode", "decode request"),
    ("client", "RequestRouter.execute", "other RequestRouter.execute (pickle reply, bookkeeping)"),
    ("client", "_ConnectionBase.send", "sending the reply (Manager)"),
    ("client", "_ConnectionBase.recv", "idle: waiting for the client's next request"),
    ("database", "DbConnection.begin", "follower: BEGIN"),
    ("database", "DbConnection.set_marker", "follower: UPDATE marker"),
    ("database", "DbConnection.commit", "follower: COMMIT"),
    ("database", "DbConnection.apply_block", "follower: statement"),
    ("database", "DbThread._read", "read: executing on the database thread"),
    ("database", "probe_latency", "latency probe"),
    ("database", "DbThread.run_once", "idle: waiting on its queue"),
)


def categories(path: Path) -> str:
    """Wall-clock view (record with --idle): what each kind of thread is doing."""
    stacks = load(path)
    totals: Counter = Counter()
    cats: Counter = Counter()
    for name, frames, n in stacks:
        kind = thread_kind(name)
        totals[kind] += n
        text = ";".join(frames)
        label = "other: " + (short(frames[-1]) if frames else "?")
        for prefix, needle, cat in CATEGORIES:
            if kind.startswith(prefix) and needle in text:
                label = cat
                break
        cats[(kind, label)] += n
    out = [f"{path.name}: wall-clock categories (share of each thread kind's samples)"]
    for kind, total in totals.most_common():
        out.append(f"  {kind}: {total} samples")
        for (k, label), n in cats.most_common():
            if k == kind:
                out.append(f"    {100.0 * n / total:5.1f}%  {label}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--categories", action="store_true",
                   help="wall-clock categories of the read/write path (profile recorded with py-spy --idle)")
    args = p.parse_args()
    for path in args.paths:
        print(categories(path) if args.categories else summarize(path, args.top))
        print()


if __name__ == "__main__":
    main()
