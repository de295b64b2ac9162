"""The dynamic batcher: a bounded, thread-safe queue of Jobs grouped by (stage, modality, length bucket).

The worker thread calls `next_batch()`; it returns the oldest group that is full (its planned
capacity for that bucket) or whose oldest job has waited `max_delay` seconds, or any group at
once while draining. `submit` is all-or-nothing: a request whose items do not all fit gets
`QueueFull` (answered 429) and nothing of it is queued.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Sequence

__all__ = ["Batcher", "QueueFull", "Closed"]


class QueueFull(Exception):
    pass


class Closed(Exception):
    pass


class Batcher:
    def __init__(self, capacity: Callable[[str, int], int], *, max_queue: int, max_delay_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity  # (stage, seq) -> most items a batch of that bucket takes
        self.max_queue = max_queue
        self.max_delay_s = max_delay_s
        self.clock = clock
        self._cond = threading.Condition()
        self._groups: "OrderedDict[tuple, list]" = OrderedDict()
        self._count = 0  # jobs waiting
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return self._count

    @property
    def closed(self) -> bool:
        return self._closed

    def room(self) -> int:
        with self._cond:
            return self.max_queue - self._count

    def submit(self, jobs: Sequence, *, force: bool = False) -> None:
        """Queue all `jobs` or none. `force` skips the size limit (a reasoned item's embed stage)."""
        with self._cond:
            if self._closed and not force:
                raise Closed("the server is shutting down")
            if not force and self._count + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue holds {self._count} of {self.max_queue} items; "
                                f"{len(jobs)} more do not fit")
            now = self.clock()
            for job in jobs:
                job.t_enqueue = now
                self._groups.setdefault(job.key, []).append(job)
            self._count += len(jobs)
            self._cond.notify_all()

    def close(self) -> None:
        """Take no new requests; queued jobs still run, without waiting for their delay."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _ready(self, now: float):
        """(key, wait): a group to run now, or how long until the first deadline."""
        wait = None
        # groups are ordered by creation; the oldest job of a group is its first
        for key, jobs in sorted(self._groups.items(), key=lambda kv: kv[1][0].t_enqueue):
            cap = self.capacity(key[0], key[2])
            due = jobs[0].t_enqueue + self.max_delay_s
            if len(jobs) >= cap or now >= due or self._closed:
                return key, 0.0
            wait = due - now if wait is None else min(wait, due - now)
        return None, wait

    def next_batch(self, timeout: float | None = None):
        """The next list of jobs to run (one group), or None when closed and empty (or on timeout)."""
        end = None if timeout is None else self.clock() + timeout
        with self._cond:
            while True:
                now = self.clock()
                key, wait = self._ready(now)
                if key is not None:
                    jobs = self._groups[key]
                    cap = self.capacity(key[0], key[2])
                    batch, rest = jobs[:cap], jobs[cap:]
                    if rest:
                        self._groups[key] = rest
                    else:
                        del self._groups[key]
                    self._count -= len(batch)
                    return batch
                if self._closed and not self._groups:
                    return None
                if end is not None:
                    left = end - now
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)
