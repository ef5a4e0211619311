"""OpenTelemetry metrics for a serializer: what operators already collect, from what ``stats()``
already counts.

Nothing here is imported by ``writeturn`` itself, and this module imports
``opentelemetry`` only when :func:`instrument` is called, so a service without
the ``otel`` extra (``pip install 'writeturn[otel]'``) pays nothing.

Instruments (names in OpenTelemetry's semantic-convention style; durations in
seconds, counts with ``{annotation}`` units):

======================================  =========================  =================================
name                                    kind, unit                 attributes
======================================  =========================  =================================
``writeturn.writes``                    counter, ``{write}``       ``writeturn.outcome``: committed,
                                                                   rolled_back, withdrawn, unknown
``writeturn.write.wait.duration``       histogram, ``s``           submission to turn
``writeturn.write.hold.duration``       histogram, ``s``           how long a turn was held
``writeturn.queue.depth``               gauge, ``{write}``         writes waiting, all keys
``writeturn.key.queue.depth``           gauge, ``{write}``         ``writeturn.key``: each key named
                                                                   in ``keys``
``writeturn.writes.running``            gauge, ``{write}``         writes holding a turn
``writeturn.cancel_requests``           counter, ``{request}``
``writeturn.interrupts``                counter, ``{statement}``
``writeturn.connections.invalidated``   counter, ``{connection}``
``writeturn.retries``                   counter, ``{retry}``
======================================  =========================  =================================

Every point also carries ``writeturn.namespace`` and ``db.system.name``
(``sqlite`` or ``postgresql``), plus any ``attributes`` given. Keys are
reported one by one only when named: a key per customer or order would make
one time series each.

Example::

    from writeturn.metrics import instrument

    ser = WriteSerializer.from_url(url)
    metrics = instrument(ser, keys=["ledger"])   # the global MeterProvider, or meter_provider=
    ...
    metrics.close()                              # stop reporting (before ser is dropped)
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError
from .urls import backend_of

if TYPE_CHECKING:  # pragma: no cover
    from .serializer import WriteSerializer

__all__ = ["instrument", "Instrumentation", "METER_NAME"]

METER_NAME = "writeturn"
OTEL_EXTRA = "pip install 'writeturn[otel]'"
#: Histogram buckets in seconds, from 0.1 ms to 30 s: a turn is waited for briefly or long.
DURATION_BUCKETS = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_OUTCOMES = ("committed", "rolled_back", "withdrawn", "unknown")


def _metrics_api() -> Any:
    try:
        return importlib.import_module("opentelemetry.metrics")
    except ImportError:
        raise ConfigurationError(
            f"writeturn.metrics needs opentelemetry-api, which is not installed: {OTEL_EXTRA}"
        ) from None


class Instrumentation:
    """The instruments reporting one serializer; :meth:`close` stops the reporting."""

    def __init__(
        self,
        ser: WriteSerializer,
        meter: Any,
        keys: tuple[str, ...],
        attributes: Mapping[str, str],
        api: Any,
    ) -> None:
        self._ser = ser
        self._keys = keys
        self._attributes = dict(attributes)
        self._closed = False
        advice = {"explicit_bucket_boundaries_advisory": list(DURATION_BUCKETS)}
        self._wait = _histogram(
            meter,
            "writeturn.write.wait.duration",
            "Time from a write's submission to the start of its turn.",
            advice,
        )
        self._hold = _histogram(
            meter,
            "writeturn.write.hold.duration",
            "Time a write held its key's turn, its transaction included.",
            advice,
        )
        observation = api.Observation
        meter.create_observable_counter(
            "writeturn.writes",
            callbacks=[self._outcomes(observation)],
            unit="{write}",
            description="Finished writes, by outcome.",
        )
        for name, field, kind, unit, description in (
            ("writeturn.queue.depth", "queued", "gauge", "{write}", "Writes waiting for a turn."),
            ("writeturn.writes.running", "running", "gauge", "{write}", "Writes holding a turn."),
            (
                "writeturn.cancel_requests",
                "cancel_requests",
                "counter",
                "{request}",
                "Cancellations and timeouts that reached a write before it finished.",
            ),
            (
                "writeturn.interrupts",
                "interrupts",
                "counter",
                "{statement}",
                "Statements the driver was asked to stop after a cancellation.",
            ),
            (
                "writeturn.connections.invalidated",
                "connections_invalidated",
                "counter",
                "{connection}",
                "Connections discarded by writes (each costs a reconnect).",
            ),
            ("writeturn.retries", "retries", "counter", "{retry}", "Transient failures retried."),
        ):
            create = (
                meter.create_observable_gauge
                if kind == "gauge"
                else meter.create_observable_counter
            )
            create(
                name,
                callbacks=[self._field(field, observation)],
                unit=unit,
                description=description,
            )
        meter.create_observable_gauge(
            "writeturn.key.queue.depth",
            callbacks=[self._key_depths(observation)],
            unit="{write}",
            description="Writes waiting for a turn on each key named when instrumenting.",
        )
        self._unobserve = ser.observe(self._sample)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "reporting"
        return f"<Instrumentation of {self._ser!r}, keys={list(self._keys)!r}, {state}>"

    def close(self) -> None:
        """Stop reporting: histograms get no more samples, gauges and counters no points."""
        if self._closed:
            return
        self._closed = True
        self._unobserve()

    # -- what the instruments read ----------------------------------------------------

    def _sample(self, kind: str, seconds: float) -> None:
        histogram = self._wait if kind == "wait" else self._hold
        histogram.record(seconds, self._attributes)

    def _outcomes(self, observation: Any) -> Any:
        def callback(options: Any) -> Iterator[Any]:
            if self._closed:
                return
            stats = self._ser.stats()
            for outcome in _OUTCOMES:
                yield observation(
                    getattr(stats, outcome), {**self._attributes, "writeturn.outcome": outcome}
                )

        return callback

    def _field(self, field: str, observation: Any) -> Any:
        def callback(options: Any) -> Iterator[Any]:
            if not self._closed:
                yield observation(getattr(self._ser.stats(), field), self._attributes)

        return callback

    def _key_depths(self, observation: Any) -> Any:
        def callback(options: Any) -> Iterator[Any]:
            if self._closed:
                return
            for key in self._keys:
                waiting = self._ser.key_statistics(key).waiting
                yield observation(waiting, {**self._attributes, "writeturn.key": key})

        return callback


def _histogram(meter: Any, name: str, description: str, advice: Mapping[str, Any]) -> Any:
    try:
        return meter.create_histogram(name, unit="s", description=description, **advice)
    except TypeError:  # an API older than 1.23 takes no bucket advice
        return meter.create_histogram(name, unit="s", description=description)


def instrument(
    ser: WriteSerializer,
    *,
    meter_provider: Any = None,
    keys: Iterable[str] = (),
    attributes: Mapping[str, str] | None = None,
) -> Instrumentation:
    """Report ``ser``'s metrics through OpenTelemetry until the result is closed.

    ``meter_provider``: where to report (default: the global one, as set by
    ``opentelemetry.metrics.set_meter_provider`` or the SDK's auto-configuration).
    ``keys``: keys whose queue depth to report one by one (``writeturn.key``).
    ``attributes``: added to every point (e.g. ``{"service.instance.id": ...}``).
    Raises :class:`~writeturn.ConfigurationError` if ``opentelemetry-api`` is not
    installed, naming the extra to install.
    """
    api = _metrics_api()
    if isinstance(keys, str):
        raise ConfigurationError(
            f"keys must be a collection of key strings, not the single string {keys!r}; "
            f"use keys=[{keys!r}]"
        )
    key_tuple = tuple(dict.fromkeys(keys))
    bad = [k for k in key_tuple if not isinstance(k, str) or not k]
    if bad:
        raise ConfigurationError(f"keys must be non-empty strings, not {bad[0]!r}")
    from . import __version__

    provider = meter_provider if meter_provider is not None else api.get_meter_provider()
    meter = provider.get_meter(METER_NAME, __version__)
    base = {
        "writeturn.namespace": ser.namespace,
        "db.system.name": backend_of(ser.engine.url),
        **(attributes or {}),
    }
    return Instrumentation(ser, meter, key_tuple, base, api)
