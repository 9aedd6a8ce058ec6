"""Overlap of reading, computing and writing in a row-block loop, with bounded memory.

``read_ahead(read, items, depth)`` runs ``read`` on the items in order on one reader thread,
at most ``depth`` items ahead of the one the caller holds, and yields the results in order.
``write_behind(write, depth)`` gives a ``submit`` that hands each item to one writer thread,
with at most ``depth`` items queued or being written. With ``depth`` 0 both are plain serial
loops on the caller's thread: the overlap changes when work is done, never what is done, so the
output bytes do not depend on it.

Errors are those of the serial loop, in its order. A reader's error reaches the caller when it
asks for that item (an error in an earlier item, raised by the caller, comes first). A writer's
error is raised by the next ``submit`` or on leaving; when the caller fails meanwhile, the
queued writes (all of earlier items) are finished first and a writer's error replaces the
caller's, as it would have come first serially. Ctrl-C, SIGTERM (``Interrupted``) and other
``BaseException``s are never replaced: queued writes are dropped instead (the sink removes the
partial output). Leaving either context joins its thread, whatever happened: no thread
outlives the loop that started it. Both threads are daemons, so a second Ctrl-C while one
is being joined cannot keep the interpreter alive.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from specmerge.errors import Interrupted

T = TypeVar("T")
R = TypeVar("R")

POLL_S = 0.05  # how often a waiting thread looks whether it was told to stop


@contextlib.contextmanager
def read_ahead(read: Callable[[T], R], items: Sequence[T], depth: int) -> Iterator[Iterator[R]]:
    """Yield an iterator over ``read(item)`` for ``items`` in order; with ``depth`` ≥ 1 a reader
    thread computes them ahead, holding at most ``depth`` results beyond the caller's current
    one (so at most ``depth + 1`` results are alive at once)."""
    if depth < 1 or len(items) < 2:
        yield (read(item) for item in items)
        return
    results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    slots = threading.Semaphore(depth + 1)
    stop = threading.Event()

    def reader() -> None:
        try:
            for item in items:
                slots.acquire()
                if stop.is_set():
                    return
                results.put((True, read(item)))
        except BaseException as err:  # handed to the caller, who raises it at this item
            results.put((False, err))

    def take() -> Iterator[R]:
        for _ in items:
            ok, value = results.get()
            if not ok:
                raise value
            yield value
            del value
            slots.release()  # the caller is done with the last item: one more may be read

    thread = threading.Thread(target=reader, name="specmerge-read", daemon=True)
    thread.start()
    try:
        yield take()
    finally:
        stop.set()
        slots.release()  # wake the reader if it waits for a slot; it sees ``stop`` and returns
        thread.join()
        while not results.empty():  # drop what was read ahead and never taken
            results.get()


@contextlib.contextmanager
def write_behind(write: Callable[[T], None], depth: int) -> Iterator[Callable[[T], None]]:
    """Yield ``submit(item)``, which runs ``write(item)``: on the caller's thread with ``depth``
    0, else on a writer thread with at most ``depth`` items queued or being written (``submit``
    waits for room). Leaving normally waits for every write and raises the first failure."""
    if depth < 1:
        yield write
        return
    pending: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    room = threading.Semaphore(depth)
    failed: list[BaseException] = []
    drop = threading.Event()  # set on Ctrl-C and the like: queued writes are skipped

    def writer() -> None:
        while True:
            more, item = pending.get()
            if not more:
                return
            try:
                if not failed and not drop.is_set():
                    write(item)
            except BaseException as err:  # raised on the caller's thread
                failed.append(err)
            finally:
                del item
                room.release()  # always: a waiting ``submit`` wakes up, to write or to fail

    def submit(item: T) -> None:
        room.acquire()
        if failed:
            room.release()
            raise failed[0]
        pending.put((True, item))

    def close() -> None:
        pending.put((False, None))
        thread.join()

    thread = threading.Thread(target=writer, name="specmerge-write", daemon=True)
    thread.start()
    try:
        yield submit
    except BaseException as err:
        ordinary = isinstance(err, Exception) and not isinstance(err, Interrupted)
        if not ordinary:
            drop.set()
        close()
        if failed and ordinary and failed[0] is not err:
            # an earlier item's write failed: serially, that came first (and the caller's
            # own error would never have happened)
            raise failed[0] from None
        raise
    close()
    if failed:
        raise failed[0]
