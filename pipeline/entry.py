"""What the process entry points (``treepo-sampler``, ``treepo-learner``) share: the command
line, settings with ``--port``/``$PORT`` and ``--model`` overrides, and signal handling."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic_settings import BaseSettings

from pipeline.config import load_settings

S = TypeVar("S", bound=BaseSettings)


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    """Process-wide logging: one line per event (called by entry points, never at import)."""
    fmt = (
        '{"t":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}'
        if json_lines
        else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def process_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--port", type=int, help="HTTP port (default: $PORT, else the settings)")
    parser.add_argument("--model", help="model directory (default: the settings)")
    return parser


def process_settings(cls: type[S], section: str, args: argparse.Namespace) -> S:
    """Settings of one process, with ``--port`` (or ``$PORT``, set by honcho) and ``--model``
    applied to its own section. Raises ``ConfigError`` on bad settings."""
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"))
    settings = load_settings(cls)
    updates: dict[str, Any] = {}
    port = args.port if args.port is not None else os.environ.get("PORT")
    if port is not None:
        updates["port"] = int(port)
    if args.model:
        updates["model"] = args.model
    setattr(settings, section, getattr(settings, section).model_copy(update=updates))
    return settings


def serve(run: Callable[[], Awaitable[int]], request_stop: Callable[[], None]) -> int:
    """Run the process's main coroutine; SIGTERM and SIGINT ask it to stop."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_stop)
        return await run()

    return asyncio.run(main())
