"""BLAS thread counts for the search's loops (threadpoolctl).

One :class:`~threadpoolctl.ThreadpoolController` is kept for the process: building
one scans the loaded libraries (about 0.45 ms), switching a limit with it costs
about 13 µs, so a loop may switch for each of its large products.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from threadpoolctl import ThreadpoolController

__all__ = ["all_threads", "single_threaded"]

_controller: ThreadpoolController | None = None
#: BLAS thread counts in force where each enclosing ``single_threaded`` began
_outer: list[int] = []


def _blas() -> ThreadpoolController:
    global _controller
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.select(user_api="blas")


@contextmanager
def single_threaded() -> Iterator[None]:
    """One BLAS thread: for loops of small products, where a thread pool's start-up and
    synchronisation cost several times the work (measured: 2.5–10× slower with two)."""
    blas = _blas()
    _outer.append(max((c.num_threads for c in blas.lib_controllers), default=1))
    try:
        with blas.limit(limits=1):
            yield
    finally:
        _outer.pop()


def all_threads():
    """The BLAS threads in force outside the innermost ``single_threaded``, for one large
    product inside a single-threaded loop; outside any, the threads in force stay (a
    caller's own limit, such as a service job's, is kept)."""
    return _blas().limit(limits=_outer[-1]) if _outer else nullcontext()
