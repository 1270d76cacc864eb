"""The small aiohttp server every long-running process exposes: ``/metrics`` and ``/healthz``.

Processes add their own routes (the learner's weight server) to the app this factory returns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric

from pipeline.wire.streams import DEADLETTER_REASONS


class Labelled:
    """A view of a registry whose every sample carries some constant labels (the run's name, so
    one Prometheus and one dashboard serve several runs)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**self.labels, **s.labels}) for s in family.samples]
            yield out


def make_app(
    registry: CollectorRegistry,
    health: Callable[[], dict[str, Any]],
    labels: dict[str, str] | None = None,
) -> web.Application:
    """An app serving ``registry`` on /metrics (every sample with ``labels`` added) and
    ``health()`` as JSON on /healthz (HTTP 503 when it reports ``ok: False``)."""
    source: Any = Labelled(registry, labels) if labels else registry

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(source)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        state = health()
        return web.Response(
            text=json.dumps(state),
            content_type="application/json",
            status=200 if state.get("ok", True) else 503,
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``app``; returns the runner (``await runner.cleanup()`` to stop) and the
    bound port (useful with port 0)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=1.0)  # processes stop within 5 s
    await site.start()
    sockets = getattr(site._server, "sockets", None)
    bound = int(sockets[0].getsockname()[1]) if sockets else port
    return runner, bound


def deadletter_counter(prefix: str, what: str, registry: CollectorRegistry) -> Counter:
    """``<prefix>deadletter_total{reason}``: entries of ``what`` this process dead-lettered, one
    series per reason of ``pipeline.wire.streams.DEADLETTER_REASONS`` (all present from the start)."""
    counter = Counter(
        prefix + "deadletter",
        f"{what} sent to the dead-letter stream, by reason.",
        ["reason"],
        registry=registry,
    )
    for reason in DEADLETTER_REASONS:
        counter.labels(reason)
    return counter
