"""Who is still there, in a multi-process run: the watchdog and the abort hook.

JAX's own failure detection aborts the surviving processes with a multi-line C++ log
(after its heartbeat deadline, or at once when the coordinator, process 0, is gone). On
top of it a watchdog thread in every process keeps a heartbeat counter in the
coordinator's key-value store (keys under ``fedjax_lite/``): process 0 watches everyone's
counter and exit record, the others watch process 0's counter and the verdict process 0
publishes. A process that stops counting for ``timeout`` seconds (three ticks once a
collective has failed), or that records an error before exiting, makes every other
process print ONE line naming it and exit with :data:`EXIT_LOST` (4) — before JAX's own,
later, heartbeat deadline. Process 0 waits (at most ``timeout`` s) for the others to
record their exit before it leaves, so none of them dies of a lost coordinator instead.
When process 0 itself dies, JAX aborts the others at once; the SIGABRT hook then prints
the same kind of line, naming process 0.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

EXIT_LOST = 4
KV = "fedjax_lite/"


class Group:
    """This process's view of the run's processes (``pid`` of ``n``)."""

    def __init__(self, pid: int, n: int, coordinator: str, timeout: float):
        from jax._src import distributed as jd
        self.pid, self.n, self.coordinator, self.timeout = pid, n, coordinator, timeout
        self.client = jd.global_state.client
        self.watchdog = Watchdog(self)

    def line(self, lost: int | None, what: str) -> str:
        who = ("a process" if lost is None else f"process {lost} of {self.n}"
               + (f" (the coordinator, {self.coordinator})" if lost == 0 else ""))
        return (f"fedjax-lite: {who} {what}; stopping process {self.pid} "
                f"(exit {EXIT_LOST})")

    def abort_line(self) -> str | None:
        """For the SIGABRT hook: the lost process as far as the watchdog can tell (None:
        the watchdog has said it already)."""
        if self.watchdog.verdict is not None:
            return None
        return self.line(*self.watchdog.suspect())

    def set(self, key: str, value: str) -> None:
        try:
            self.client.key_value_set(KV + key, value, allow_overwrite=True)
        except Exception:  # noqa: BLE001 -- the coordinator is gone: nothing to tell
            pass

    def wait_for_others(self, lost: int | None = None) -> None:
        """Process 0 keeps the coordinator up (at most ``timeout`` s) until every other
        process (but ``lost``) has recorded its exit, so none dies of a lost
        coordinator."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                keys = {k for k, _ in self.client.key_value_dir_get(KV + "exit/")}
            except Exception:  # noqa: BLE001
                return
            if all(f"{KV}exit/{j}" in keys for j in range(1, self.n) if j != lost):
                return
            time.sleep(0.05)



class Watchdog(threading.Thread):
    """The heartbeat thread (see the module docstring)."""

    def __init__(self, group: Group):
        super().__init__(name="fedjax-lite-watchdog", daemon=True)
        self.group = group
        self.tick = max(0.1, min(1.0, group.timeout / 5))
        self.seen: dict[int, tuple[str | None, float]] = {}
        self.verdict: tuple[int | None, str] | None = None
        self.suspicious = False      # a collective failed: judge silence sooner
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2 * self.tick + 1)

    def _fresh(self, j: int, count: str | None, now: float) -> bool:
        """Whether process ``j``'s counter moved within the timeout."""
        last = self.seen.get(j)
        if last is None or count != last[0]:
            self.seen[j] = (count, now)
            return True
        limit = min(self.group.timeout, 3 * self.tick) if self.suspicious else \
            self.group.timeout
        return now - last[1] <= limit

    def _silent(self, j: int, now: float) -> str:
        return f"stopped responding (no heartbeat for {now - self.seen[j][1]:.1f} s)"

    def run(self) -> None:
        g, count, start = self.group, 0, time.monotonic()
        for j in range(g.n):
            self.seen[j] = (None, start)
        while not self._halt.wait(self.tick):
            count += 1
            now = time.monotonic()
            try:
                # process 0's counter sits beside its verdict: one read for the others
                mine = "p0/alive" if g.pid == 0 else f"alive/{g.pid}"
                g.client.key_value_set(KV + mine, str(count), allow_overwrite=True)
                found = self._check_all(now) if g.pid == 0 else self._check_coordinator(now)
            except Exception:  # noqa: BLE001 -- the coordinator does not answer
                found = None if g.pid == 0 or self._fresh(0, self.seen[0][0], now) else (
                    0, f"stopped answering (for {g.timeout:g} s)")
            if found is not None and not self._halt.is_set():
                self._stop_here(*found)

    def _check_all(self, now: float):
        entries = dict(self.group.client.key_value_dir_get(KV))
        for j in range(1, self.group.n):
            reason = entries.get(f"{KV}exit/{j}")
            if reason is not None:
                if reason != "done":
                    return j, f"failed ({reason})"
            elif not self._fresh(j, entries.get(f"{KV}alive/{j}"), now):
                return j, self._silent(j, now)
        return None

    def _check_coordinator(self, now: float):
        entries = dict(self.group.client.key_value_dir_get(KV + "p0/"))
        verdict = entries.get(f"{KV}p0/verdict")
        if verdict is not None:
            lost, what = verdict.split("\t", 1)
            return int(lost), what
        if not self._fresh(0, entries.get(f"{KV}p0/alive"), now):
            return 0, self._silent(0, now)
        return None

    def _stop_here(self, lost: int, what: str) -> None:
        g = self.group
        self.verdict = (lost, what)
        if g.pid == 0:
            g.set("p0/verdict", f"{lost}\t{what}")
        os.write(2, (g.line(lost, what) + "\n").encode())
        g.set(f"exit/{g.pid}", f"stopped: process {lost} {what}")
        if g.pid == 0:
            g.wait_for_others(lost)
        sys.stderr.flush()
        os._exit(EXIT_LOST)

    def suspect(self) -> tuple[int | None, str]:
        """Who is most likely lost, from what this watchdog saw (for the abort hook)."""
        if self.verdict is not None:
            return self.verdict
        if self.group.pid != 0:
            return 0, "was lost or reported an error"
        now = time.monotonic()
        stale = {j: now - t for j, (_, t) in self.seen.items() if j != 0}
        if stale and max(stale.values()) > 3 * self.tick:
            j = max(stale, key=stale.get)
            return j, f"stopped responding ({stale[j]:.0f} s without a heartbeat)"
        return None, "was lost (reported by JAX's distributed runtime)"


_HOOK = None


def install_abort_hook(line) -> None:
    """JAX's distributed runtime aborts (SIGABRT) a process whose coordinator is gone or
    does not answer, or that it finds in a failed run; before the abort ends it, print
    ``line()`` (or nothing if it returns None) and exit 4 (the runtime's own log comes
    first)."""
    global _HOOK
    uninstall_abort_hook()
    try:
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
    except (OSError, AttributeError):
        return

    @ctypes.CFUNCTYPE(None, ctypes.c_int)
    def on_abort(_signum):
        text = line()
        if text:
            os.write(2, (text + "\n").encode())
        os._exit(EXIT_LOST)

    libc.signal(signal.SIGABRT, ctypes.cast(on_abort, ctypes.c_void_p))
    _HOOK = (libc, on_abort)          # the callback must outlive the registration


def uninstall_abort_hook() -> None:
    global _HOOK
    if _HOOK is not None:
        _HOOK[0].signal(signal.SIGABRT, None)        # SIG_DFL
        _HOOK = None


__all__ = ["EXIT_LOST", "Group", "Watchdog", "install_abort_hook", "uninstall_abort_hook"]
