"""Leases on a shared filesystem: exclusive claims that expire unless their holder's heartbeat
renews them. Notebook 01's workers claim blocks of vectors with them, and a run takes its lock so.

A claim on ``key`` is a file ``<folder>/<key>.<gen>`` created exclusively (``O_EXCL``: atomic on a
local filesystem and on NFS v3+) holding who took it; its modification time is the lease, renewed
by :class:`Heartbeat`. Once the newest generation's lease has expired (its holder was killed, hung
or preempted) another worker takes the key by creating generation ``gen + 1``, which only one can
do. Each expired generation counts as a failure of the attempt that took it; after
``max_failures`` in one attempt the key is given up by that attempt (a later attempt retries it).
Leases compare file times with the clock of the reader, so nodes' clocks must agree (NTP) to well
within a lease. A holder on the reader's own host is also checked directly: if its process is gone,
or its pid now belongs to a process started at another time (pids are reused), its claim is taken
over at once with a one-line notice, whatever the lease says (a killed run resumes without waiting).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from saets_utils.io_utils import atomic_write_json, create_exclusive_text

EXPIRED = (0.0, 0.0)  # file times that mark a lease as over at once


def _linux() -> bool:
    return Path("/proc/self/stat").is_file()


def process_start(pid: int) -> str | None:
    """When process ``pid`` of this host started, as an opaque token (None: no such process, a zombie,
    or the platform cannot tell). Linux: the boot id and ``/proc/<pid>/stat`` field 22 (start time in
    clock ticks since boot); elsewhere psutil's create time if psutil is installed."""
    if _linux():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # field 2 may hold ')'
            boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except (OSError, IndexError):
            return None
        return None if fields[0] in ("Z", "X") else f"{boot}:{fields[19]}"  # fields[0] is field 3 (state)
    try:
        import psutil

        return repr(psutil.Process(pid).create_time())
    except Exception:  # psutil missing, or no such process
        return None


def identity() -> dict[str, str | int | None]:
    """Who this process is: host, pid and the pid's start time (a requeued job keeps its worker
    name, not these)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": process_start(pid)}


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Claim:
    """One generation of a claim: its file, ``gen``, the holder's ``attempt``/``worker``/host/pid,
    the ``error`` it recorded if it failed, and the lease time (file mtime)."""

    path: Path
    gen: int
    attempt: str
    worker: str
    host: str
    pid: int
    error: str | None
    mtime: float
    start: str | None = None  # the holder's process start time (:func:`process_start`), if recorded

    def fresh(self, lease_s: float, now: float | None = None) -> bool:
        return self.error is None and self.mtime > (time.time() if now is None else now) - lease_s

    def holder(self) -> str:
        return f"{self.worker or 'a run'} (pid {self.pid} on {self.host})"

    def dead_holder(self) -> str | None:
        """Why this claim's holder is known dead, or None. Only a holder on this very host can be
        checked: its pid no longer exists (or is a zombie), or belongs to a process started at another
        time. A holder on another host, or one that wrote no identity yet, is left to its lease."""
        if not self.host or self.host != socket.gethostname() or self.pid <= 0:
            return None
        now = process_start(self.pid)
        if now is None:
            return "its process is gone" if _linux() or not pid_alive(self.pid) else None
        if self.start is not None and now != self.start:
            return "its pid now belongs to another process"
        return None


def read_claims(folder: Path, key: str) -> list[Claim]:
    """Every generation of ``key``'s claim, oldest first (a file being created reads as fresh).
    Generations are probed one by one (no directory listing: thousands of claims share a folder)."""
    out: list[Claim] = []
    gen = 0
    while True:
        p = folder / f"{key}.{gen}"
        try:
            mtime = p.stat().st_mtime
            text = p.read_text()
        except FileNotFoundError:
            return out
        try:
            info = json.loads(text or "{}")
        except json.JSONDecodeError:  # created, not yet written: its holder is alive
            info = {}
        out.append(
            Claim(
                p,
                gen,
                str(info.get("attempt", "")),
                str(info.get("worker", "")),
                str(info.get("host", "")),
                int(info.get("pid", -1)),
                info.get("error"),
                mtime,
                info.get("start"),
            )
        )
        gen += 1


@dataclass(frozen=True)
class ClaimOutcome:
    """``claimed`` (``path`` is ours now), ``held`` (another holder's lease is live) or ``given_up``
    (``failures`` of this attempt reached the limit; ``errors`` are theirs)."""

    state: Literal["claimed", "held", "given_up"]
    path: Path | None = None
    failures: int = 0
    errors: tuple[str, ...] = ()


def try_claim(
    folder: Path, key: str, attempt: str, worker: str, *, lease_s: float, max_failures: int | None = None
) -> ClaimOutcome:
    """Take ``key`` unless a live lease holds it or this attempt failed it ``max_failures`` times.
    A fresh lease whose holder is known dead (:meth:`Claim.dead_holder`) is taken over at once, with
    a one-line notice naming that holder."""
    folder.mkdir(parents=True, exist_ok=True)
    me = identity()
    claims = read_claims(folder, key)
    gen = 0
    if claims:
        last = claims[-1]
        # a requeued job (same worker name, new process) takes its own block back without waiting
        own_previous = last.worker == worker and (last.host, last.pid) != (me["host"], me["pid"])
        if last.fresh(lease_s) and not own_previous:
            why = last.dead_holder()
            if why is None:
                return ClaimOutcome("held")
            print(f"saets: taking over {folder.name}/{key} from {last.holder()}: {why}", flush=True)
        mine = [c for c in claims if c.attempt == attempt]
        errors = tuple(c.error or f"{c.worker} on {c.host} (pid {c.pid}) stopped renewing its lease" for c in mine)
        if max_failures is not None and len(mine) >= max_failures:
            return ClaimOutcome("given_up", failures=len(mine), errors=errors)
        gen = last.gen + 1
    path = folder / f"{key}.{gen}"
    info = {"attempt": attempt, "worker": worker, **me, "since": time.time()}
    # the claim appears with its holder's identity or not at all: an empty claim (a holder killed
    # mid-write) would name no holder to check, and the next run would wait out the lease
    if not create_exclusive_text(path, json.dumps(info)):
        return ClaimOutcome("held")  # another worker took this generation first
    return ClaimOutcome("claimed", path)


def fail_claim(path: Path, error: str) -> None:
    """Record ``error`` on a claim we hold and end its lease at once (it counts as a failure)."""
    info = json.loads(path.read_text())
    atomic_write_json(path, {**info, "error": error[-4000:]})
    os.utime(path, EXPIRED)


def expire_claims_of(folder: Path, worker: str) -> list[Path]:
    """End the leases ``worker`` holds (it is known dead), so others re-claim without waiting."""
    out = []
    for p in folder.glob("*.*"):
        try:
            if json.loads(p.read_text() or "{}").get("worker") == worker:
                os.utime(p, EXPIRED)
                out.append(p)
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    return out


class Heartbeat:
    """A daemon thread renewing the leases of ``paths`` (``add``/``discard`` while it runs) every
    ``interval_s``; used as a context manager. It stops renewing a file that was removed."""

    def __init__(self, interval_s: float, *paths: Path) -> None:
        self.interval_s = interval_s
        self._paths = set(paths)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saets-heartbeat", daemon=True)

    def add(self, path: Path) -> None:
        with self._lock:
            self._paths.add(path)

    def discard(self, path: Path) -> None:
        with self._lock:
            self._paths.discard(path)

    def beat(self) -> None:
        with self._lock:
            paths = list(self._paths)
        for p in paths:
            try:
                os.utime(p)
            except FileNotFoundError:
                self.discard(p)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def heartbeat_interval(lease_s: float) -> float:
    """Renew ~6 times per lease, so a missed beat or two under load does not lose it."""
    return max(0.05, lease_s / 6)
