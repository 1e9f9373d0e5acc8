"""Short full garbage collections with tens of thousands of connections open.

Measured with the pause log (``pauses.py``) under the hub benchmark's fleet: each open device connection
keeps about 21 objects the collector tracks (TLS shell, uvloop transport, MQTT driver and state machine,
link, session, deques, a timer, a context), and a full (generation 2) collection walks every one of them,
scattered among OpenSSL's per-connection buffers: about 165 ms of CPU at 10,000 connections (16 ms per
1,000, against 13 ms for the whole start-up heap).  CPython starts a full collection once the objects
promoted out of the young generations exceed a quarter of the old one, and at thousands of messages per
second the objects of messages in flight (alive for the few milliseconds to their commit) are promoted
by the thousand: at 19,500 devices and 3,900 msgs/s there were six full collections in the 60 s window,
400-580 ms each, and the worst acknowledgements (1.0-1.7 s, the p99 of 1.25 s) were the messages queued
behind them.

The remedy servers with large long-lived heaps use: move what lives long out of the collector's sight
(:func:`gc.freeze`: the permanent generation, never walked; reference counting still frees its objects):

- at start-up: collect, freeze (modules, classes, the parts: ~65,000 objects);
- as connections arrive: once ``batch`` connections opened since the last freeze, or ``settle`` seconds
  after the last one of a burst, collect (which walks only what is not frozen yet: the newcomers) and
  freeze;
- the price: a reference cycle among frozen objects is never collected.  A closed MQTT connection's
  objects are freed by reference counting alone (the TLS shell drops its transport and driver when the
  connection is lost: tested), but whatever else a connection's life left in cycles (an AMQP or HTTPS
  connection, an endpoint's own bookkeeping) would stay; so once the frozen connections that closed since
  the last thaw (through any number of freezes) reach ``thaw_fraction`` of those open at the last freeze
  (and at least ``thaw_min``), everything is unfrozen while the churn
  lasts (the collector works as it did without this module) and frozen again ``settle`` seconds after
  the last connection opened or closed.

Connections are counted by the MQTT core (:class:`azure_iot_emulator.mqtt.broker.Broker`); other objects
(AMQP, HTTPS) are frozen along with them at each freeze.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Protocol

log = logging.getLogger(__name__)

BATCH = 1000  # connections opened between freezes during a burst (~16 ms of collection each)
SETTLE = 1.0  # seconds without a new connection that end a burst
THAW_FRACTION = 0.5  # frozen connections closed, of those frozen, that warrant a whole collection ...
THAW_MIN = 100  # ... and at least this many (what they leave meanwhile is ~13 small objects each)


class Collector(Protocol):
    """The three calls of :mod:`gc` this module makes (a test passes its own)."""

    def collect(self) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...


class _Gc:
    def collect(self) -> int:
        return gc.collect()

    def freeze(self) -> None:
        gc.freeze()

    def unfreeze(self) -> None:
        gc.unfreeze()


class LongLivedObjects:
    """Freezes connections' objects once they are long-lived.  :meth:`opened` returns a token the caller
    gives back to :meth:`closed`; both run on the event loop."""

    def __init__(
        self,
        *,
        batch: int = BATCH,
        settle: float = SETTLE,
        thaw_fraction: float = THAW_FRACTION,
        thaw_min: int = THAW_MIN,
        collector: Collector | None = None,
    ) -> None:
        self.batch = batch
        self.settle = settle
        self.thaw_fraction = thaw_fraction
        self.thaw_min = thaw_min
        self._gc: Collector = collector or _Gc()
        self._epoch = 0  # freezes so far; a connection's token is the epoch it opened in
        self._frozen_below = 0  # tokens below this are frozen connections (0 after a thaw: none)
        self._open = 0  # connections open now
        self._opened = 0  # connections opened since the last freeze
        self._frozen = 0  # connections open at the last freeze (all frozen) ...
        self._closed_frozen = 0  # ... and frozen connections closed since the last thaw (their cycles stay)
        self._thawed = False  # unfrozen for churn: freeze again once it settles
        self._last_change = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.freezes = 0
        self.thaws = 0

    def start(self) -> None:
        """Freeze what start-up made (everything alive now lives as long as the process)."""
        self._freeze()

    def stop(self) -> None:
        """No more freezing; what is frozen goes back to the collector (an embedding process is left as
        it was found)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._gc.unfreeze()

    def opened(self) -> int:
        token = self._epoch  # frozen once a freeze has moved the epoch past it
        self._open += 1
        self._opened += 1
        if self._opened >= self.batch:
            self._freeze()
        else:
            self._changed()
        return token

    def closed(self, token: int) -> None:
        self._open -= 1
        if token < self._frozen_below:
            self._closed_frozen += 1
            if self._closed_frozen >= max(self.thaw_min, self.thaw_fraction * self._frozen):
                self._thaw()
        if self._thawed:
            self._changed()

    # ------------------------------------------------------------------------------------- internals
    def _changed(self) -> None:
        """Something to freeze later: once no connection opened (or, after a thaw, closed) for
        ``settle`` seconds."""
        loop = asyncio.get_running_loop()
        self._last_change = loop.time()
        if self._timer is None:
            self._timer = loop.call_later(self.settle, self._settled)

    def _settled(self) -> None:
        self._timer = None
        if not (self._opened or self._thawed):
            return
        loop = asyncio.get_running_loop()
        wait = self._last_change + self.settle - loop.time()
        if wait > 0:  # the burst goes on
            self._timer = loop.call_later(wait, self._settled)
            return
        self._freeze()

    def _freeze(self) -> None:
        self._gc.collect()  # what is garbage now is not frozen; walks only what is not frozen yet
        self._gc.freeze()
        self._epoch += 1
        self._frozen_below = self._epoch
        # What closed frozen connections left stays frozen through this freeze: their count goes on.
        self._frozen, self._opened = self._open, 0
        self._thawed = False
        self.freezes += 1

    def _thaw(self) -> None:
        """Enough frozen connections closed that their leftover cycles matter: give everything back to
        the collector while the churn lasts (it collects as it did before any freeze), and freeze again
        once it has settled."""
        log.info(
            "%d of %d frozen connections closed: unfrozen until that settles",
            self._closed_frozen,
            self._frozen,
        )
        self._gc.unfreeze()
        self._frozen_below = 0
        self._frozen = self._closed_frozen = 0
        self._thawed = True
        self.thaws += 1
