"""Prometheus text-format metrics (no client library needed) and a real compilation counter.

Compilations are counted from jax's own monitoring events: every time a jitted function
lowers a new shape, jax records `/jax/core/compile/jaxpr_to_mlir_module_duration`; a backend
compile records `/jax/core/compile/backend_compile_duration`. The counters are process-wide,
so "flat after warm-up" is measured, not assumed.
"""
from __future__ import annotations

import bisect
import threading

__all__ = ["Metrics", "CompileCounter", "LATENCY_BUCKETS"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts jax lowerings and backend compilations in this process (registered once)."""

    _instance: "CompileCounter | None" = None
    _lock = threading.Lock()

    def __init__(self):
        self.lowerings = 0
        self.backend_compiles = 0
        self.compile_seconds = 0.0

    @classmethod
    def get(cls) -> "CompileCounter":
        with cls._lock:
            if cls._instance is None:
                import jax

                inst = cls()
                jax.monitoring.register_event_duration_secs_listener(inst._on_event)
                cls._instance = inst
            return cls._instance

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event == _LOWER_EVENT:
            self.lowerings += 1
        elif event == _BACKEND_EVENT:
            self.backend_compiles += 1
            self.compile_seconds += float(duration)


class _Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.n += 1


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


class Metrics:
    """Counters, gauges and histograms keyed by (name, labels); rendered as Prometheus text."""

    PREFIX = "embedrl_"
    HELP = {
        "requests_total": ("counter", "HTTP requests to the API routes by status code"),
        "request_duration_seconds": ("histogram", "request latency, body read to response"),
        "queue_time_seconds": ("histogram", "time an item waited in the queue before its batch ran"),
        "batch_size": ("histogram", "items per model batch (before padding to the compiled size)"),
        "batch_tokens": ("histogram", "real tokens per model batch"),
        "batch_padded_tokens": ("histogram", "compiled batch x sequence tokens per model batch"),
        "batch_seconds": ("histogram", "model time per batch"),
        "batches_total": ("counter", "model batches run, by stage and outcome"),
        "items_total": ("counter", "items embedded or reasoned, by stage"),
        "queue_items": ("gauge", "items waiting for the model"),
        "warmup_done": ("gauge", "1 once every planned shape is compiled"),
        "warmup_shapes": ("gauge", "shapes compiled during warm-up, by stage"),
        "compilations_total": ("counter", "jax lowerings of a new function or shape in this process"),
        "backend_compilations_total": ("counter", "XLA backend compilations in this process"),
        "compile_seconds_total": ("counter", "seconds spent in XLA backend compilation"),
        "compilations_after_warmup": ("gauge", "lowerings since warm-up finished (0 when no request compiled)"),
    }

    def __init__(self, compile_counter: CompileCounter | None = None):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = {}
        self._hists: dict[tuple[str, tuple], _Histogram] = {}
        self.compile_counter = compile_counter
        self.lowerings_at_warmup: int | None = None

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = float(value)

    def observe(self, name: str, value: float, buckets=LATENCY_BUCKETS, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            h = self._hists.get(key)
            if h is None:
                h = self._hists[key] = _Histogram(buckets)
            h.observe(value)

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def mark_warm(self) -> None:
        if self.compile_counter is not None:
            self.lowerings_at_warmup = self.compile_counter.lowerings
        self.set("warmup_done", 1)

    def compilations_after_warmup(self) -> int | None:
        if self.compile_counter is None or self.lowerings_at_warmup is None:
            return None
        return self.compile_counter.lowerings - self.lowerings_at_warmup

    def render(self) -> str:
        with self._lock:
            values = dict(self._values)
            hists = {k: (h.buckets, list(h.counts), h.sum, h.n) for k, h in self._hists.items()}
        cc = self.compile_counter
        if cc is not None:
            values[("compilations_total", ())] = cc.lowerings
            values[("backend_compilations_total", ())] = cc.backend_compiles
            values[("compile_seconds_total", ())] = cc.compile_seconds
            after = self.compilations_after_warmup()
            if after is not None:
                values[("compilations_after_warmup", ())] = after
        names = sorted({k[0] for k in values} | {k[0] for k in hists})
        lines = []
        for name in names:
            kind, text = self.HELP.get(name, ("untyped", name))
            full = self.PREFIX + name
            lines.append(f"# HELP {full} {text}")
            lines.append(f"# TYPE {full} {kind}")
            for (n, labels), v in sorted((k, v) for k, v in values.items() if k[0] == name):
                lines.append(f"{full}{_labels(dict(labels))} {_num(v)}")
            for (n, labels), (buckets, counts, total, count) in sorted(
                    ((k, v) for k, v in hists.items() if k[0] == name), key=lambda kv: kv[0]):
                cum = 0
                for b, c in zip(buckets, counts):
                    cum += c
                    lines.append(f"{full}_bucket{_labels({**dict(labels), 'le': _num(b)})} {cum}")
                lines.append(f"{full}_bucket{_labels({**dict(labels), 'le': '+Inf'})} {count}")
                lines.append(f"{full}_sum{_labels(dict(labels))} {_num(total)}")
                lines.append(f"{full}_count{_labels(dict(labels))} {count}")
        return "\n".join(lines) + "\n"


def _num(v) -> str:
    v = float(v)
    return str(int(v)) if v.is_integer() else repr(v)
