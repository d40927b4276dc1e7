"""A background sender for tracking writes: the training loop never waits on the store.

:class:`Outbox` takes writes (metric batches, tags, run status) from the loop with a
non-blocking :meth:`Outbox.put` and sends them in order on one daemon thread through a
``send(record)`` function. When a send fails (the MLflow server is down, a timeout),
the record stays at the head of the queue and is retried with a capped back-off; the
first failure prints ONE warning line that names the fallback file. Nothing is dropped:

- while the store is unreachable the records wait in memory, up to ``max_pending``;
  older ones beyond that are appended to the fallback file (JSON lines) at once;
- :meth:`Outbox.close` waits at most ``timeout_s`` for the queue to drain; whatever is
  still unsent then is appended to the fallback file, and close returns.

A record is a plain JSON-able dict (``{"kind": ..., ...}``), so the fallback file can be
replayed into the store later. The sender is store-agnostic: it never imports MLflow.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

Record = dict[str, Any]

#: Back-off between retries of a failed send: doubles from the first, capped at the last.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0


class Outbox:
    """Ordered, bounded, asynchronous delivery of tracking records (see the module doc)."""

    def __init__(
        self,
        send: Callable[[Record], None],
        fallback: Path,
        warn: Callable[[str], None],
        max_pending: int = 50_000,
    ) -> None:
        self._send = send
        self.fallback = fallback
        self._warn = warn
        self._max_pending = max_pending
        self._pending: deque[Record] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self.failures = 0
        """Failed send attempts so far."""
        self.sent = 0
        """Records delivered."""
        self.spilled = 0
        """Records written to the fallback file instead."""
        self._warned = False
        self._give_up = False
        self._thread = threading.Thread(target=self._run, name="turnout-tracking", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> None:
        """Queue ``record`` (never blocks on the store)."""
        overflow: list[Record] = []
        with self._cond:
            self._pending.append(record)
            while len(self._pending) > self._max_pending:
                overflow.append(self._pending.popleft())
            self._cond.notify()
        if overflow:
            self._spill(overflow)

    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + (1 if self._busy else 0)

    def _run(self) -> None:
        delay = RETRY_FIRST_S
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                record = self._pending[0]
                self._busy = True
            try:
                self._send(record)
            except Exception as e:  # any store error: keep the record, retry later
                self.failures += 1
                self._first_warning(e)
                with self._cond:
                    self._busy = False
                    self._cond.wait(delay)
                    if self._closing and self._give_up:
                        return
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            with self._cond:
                self._busy = False
                if self._pending and self._pending[0] is record:
                    self._pending.popleft()
                self.sent += 1
                self._cond.notify_all()
            delay = RETRY_FIRST_S

    def _first_warning(self, error: BaseException) -> None:
        if self._warned:
            return
        self._warned = True
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        self._warn(
            f"turnout: warning: the MLflow store is unreachable ({first}); training goes on, "
            f"metrics wait in memory and are sent when it is back, else written to "
            f"{self.fallback} (send it later: turnout replay-tracking FILE --uri URI)"
        )

    def _spill(self, records: list[Record]) -> None:
        if not records:
            return
        self.fallback.parent.mkdir(parents=True, exist_ok=True)
        with self.fallback.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        self.spilled += len(records)

    def close(self, timeout_s: float) -> bool:
        """Send what is queued, waiting at most ``timeout_s``; spill the rest to the
        fallback file. True when everything reached the store."""
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._pending and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))
            left = list(self._pending)
            self._pending.clear()
            self._give_up = True
            self._cond.notify_all()
        self._spill(left)
        self._thread.join(timeout=0.5)
        return not left
