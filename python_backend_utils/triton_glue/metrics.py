"""Publishing our numbers through Triton's custom metrics API (served on the metrics port).

Values are published from snapshots taken anywhere (engine stats, kv_transfer counters,
orchestrator counters): the totals in COUNTERS as Prometheus counters, raised by what the total
grew since the last snapshot (so `rate()` and `increase()` work on them), everything else as a
gauge set to its current value.
"""

from __future__ import annotations

import ctypes
import threading

import triton_python_backend_utils as pb_utils

from python_backend_utils.triton_glue.metric_names import COUNTERS


def _keep_for_the_process(metric) -> None:
    """Never destroy `metric` (a family or a gauge): tritonserver keeps one family per name for the
    whole server, shared by every model instance that names it (each version of a model, their
    replacements after a reload). Deleting one instance's copy removes it for all of them, and the
    server then sets freed gauges (heap corruption, seen when a version reloaded next to a live
    one). A deletion is also a message to the server, which may not answer it while it unloads
    the model (an unload was seen to hang), and left to the interpreter's exit it messages a server
    the stub has already left. The cost: an unloaded instance's gauges keep their last values."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(metric))


def _family(name: str, description: str, counter: bool):
    kind = pb_utils.MetricFamily.COUNTER if counter else pb_utils.MetricFamily.GAUGE
    family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
    _keep_for_the_process(family)  # it also outlives its metrics, or setting them fails
    return family


class _Published:
    """One metric of a family: a gauge is set to the value, a counter raised by the value's growth.

    A counter's Triton-side value lives as long as the server, across this instance's reloads:
    each instance adds what its own totals grew, from 0."""

    def __init__(self, family, labels: dict[str, str], counter: bool) -> None:
        self._metric = family.Metric(labels=labels)
        _keep_for_the_process(self._metric)
        self._counter = counter
        self._last = 0.0

    def publish(self, value: float) -> None:
        if not self._counter:
            self._metric.set(value)
            return
        if value > self._last:
            self._metric.increment(value - self._last)
        self._last = value  # a total that went back (its source restarted) counts on from there


class MetricSet:
    """One family per name, labelled with this model instance; `publish` updates them all from a snapshot."""

    def __init__(self, prefix: str, descriptions: dict[str, str], labels: dict[str, str]) -> None:
        self._metrics = {name: _Published(_family(f"{prefix}_{name}", description, name in COUNTERS), labels,
                                          name in COUNTERS) for name, description in descriptions.items()}
        self._lock = threading.Lock()  # snapshots come from `execute` and from background threads

    def publish(self, values: dict[str, float]) -> None:
        with self._lock:
            for name, metric in self._metrics.items():
                if name in values:
                    metric.publish(float(values[name]))


class LabelledMetrics:
    """One family whose label sets appear at runtime (e.g. one per routed target)."""

    def __init__(self, name: str, description: str, labels: dict[str, str]) -> None:
        self._counter = name in COUNTERS
        self._family = _family(name, description, self._counter)
        self._labels = labels
        self._metrics: dict[tuple[tuple[str, str], ...], _Published] = {}
        self._lock = threading.Lock()

    def set(self, labels: dict[str, str], value: float) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            metric = self._metrics.get(key)
            if metric is None:
                metric = self._metrics[key] = _Published(self._family, {**self._labels, **labels}, self._counter)
            metric.publish(float(value))
