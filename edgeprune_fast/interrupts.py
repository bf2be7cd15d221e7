"""Stopping a long run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's kill): the first
signal is only noted, and the run stops at its next safe point (after a training step,
between phases) with a checkpoint; a second one stops at once, as the signal would.

    with StopOnSignal() as stop:
        trainer.run(should_stop=stop.requested)    # checkpoints, raises TrainingInterrupted
    ... stop.exit_code                             # 130 (SIGINT) or 143 (SIGTERM), the shell's 128 + N
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager noting SIGINT / SIGTERM; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._note)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _note(self, signum: int, frame) -> None:
        if self.received is not None:  # the second signal: stop now, the way it would have
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
            signal.raise_signal(signum)
            return
        self.received = signum

    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or 0)
