"""SIGINT / SIGTERM for a run: stop at a round boundary, checkpoint, exit 130 / 143.

Python's default SIGINT raises KeyboardInterrupt wherever the main thread happens to be:
inside XLA's compiler (a crash), inside a garbage-collection callback (swallowed), or
mid-round (a long traceback). Here the signal only records itself, and:

* while a run is TRAINING (``phase == "training"``), the rounds loop sees
  :attr:`Interrupts.requested` after the current round, checkpoints it and raises
  :class:`Interrupted`; the CLI prints one line and exits 128 + signal number (130 for
  SIGINT, 143 for SIGTERM);
* before training (loading, compiling: nothing new to save) and on a SECOND signal at any
  time, a watcher thread exits the process at once (``os._exit``) with the same code and
  one line. The watcher wakes on ``signal.set_wakeup_fd``, written by the C-level handler,
  so it acts within milliseconds even while the main thread is inside a long compile.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager


class Interrupted(Exception):
    """The run stopped on a signal after checkpointing ``round``."""

    def __init__(self, signum: int, round_num: int | None):
        self.signum, self.round = signum, round_num
        super().__init__(f"interrupted ({signal.Signals(signum).name}) after round "
                         f"{round_num}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupts:
    """Shared by the CLI (which installs it) and the runner (which polls it)."""

    def __init__(self):
        self.requested: int | None = None     # the first signal's number
        self.phase = "setup"                  # "setup" | "training"
        self.out_dir: str | None = None
        # called (exit code, message) just before exiting at once: a multi-process run
        # tells the other processes (``distributed.leave``, which exits itself)
        self.on_exit = None

    def _exit_now(self, signum: int) -> None:
        where = f" ({self.out_dir})" if self.out_dir else ""
        msg = ("fedjax-lite: interrupted again; stopped at once" if self.requested
               else "fedjax-lite: interrupted before training started; nothing to save")
        try:
            os.write(2, f"{msg}{where}\n".encode())
            if self.on_exit is not None:
                self.on_exit(128 + signum, msg[len("fedjax-lite: "):])
        finally:
            os._exit(128 + signum)

    def _on_signal(self, signum: int) -> None:
        if self.requested is not None or self.phase != "training":
            self._exit_now(signum)
        self.requested = signum


@contextmanager
def handling(enabled: bool = True):
    """Installs the handlers (main thread only) for the duration; yields the
    :class:`Interrupts` to pass to ``runner.run``."""
    intr = Interrupts()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield intr
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                data = os.read(read_fd, 16)
            except OSError:
                return
            for b in data:
                if b and not stop.is_set():
                    intr._on_signal(b)

    for s in previous:
        signal.signal(s, lambda *_: None)     # recorded by the watcher via the wakeup fd
    watcher = threading.Thread(target=watch, name="fedjax-lite-signals", daemon=True)
    watcher.start()
    try:
        yield intr
    finally:
        stop.set()
        signal.set_wakeup_fd(old_fd)
        os.write(write_fd, b"\0")            # wakes the watcher, which then returns
        watcher.join(timeout=1.0)
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(write_fd)
        os.close(read_fd)
        sys.stderr.flush()


__all__ = ["Interrupted", "Interrupts", "handling"]
