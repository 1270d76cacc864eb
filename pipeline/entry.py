"""What the process entry points (``treepo-sampler``, ``treepo-learner``) share: the command
line, settings with ``--port``/``$PORT`` and ``--model`` overrides, signal handling, and the
runner both ``main()`` functions are (``ProcessSpec``, ``process_main``, ``exit_now``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, Protocol, TypeVar

from pydantic_settings import BaseSettings

from pipeline.config import load_settings
from pipeline.errors import ConfigError, TransportError

S = TypeVar("S", bound=BaseSettings)
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
"""torch.distributed variables a launcher sets for its ranks: a process that starts a pipeline
must not hand its own to the pipeline's learner (its port may be taken)."""


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a pipeline's processes started from this one: without ``TREEPO_*``
    settings (they come from the run's own files) and without a launcher's rank variables."""
    source = os.environ if environ is None else environ
    return {
        k: v for k, v in source.items() if not k.startswith("TREEPO_") and k not in LAUNCHER_ENV
    }


log = logging.getLogger(__name__)


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
    parser.add_argument(
        "--config",
        help="TOML settings file (default: $TREEPO_CONFIG_FILE); the environment overrides it",
    )
    return parser


def process_settings(cls: type[S], section: str, args: argparse.Namespace) -> S:
    """Settings of one process, with ``--port`` (or ``$PORT``, set by honcho) and ``--model``
    applied to its own section. Raises ``ConfigError`` on bad settings."""
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"))
    settings = load_settings(cls, config=getattr(args, "config", None))
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


class Process(Protocol):
    """A built sampler or learner, as the runner drives it."""

    async def run(self, bound: int | None) -> int:
        """Work until stopped (or ``bound`` units of work); returns the units done."""
        ...

    def request_stop(self) -> None: ...

    def close(self) -> None:
        """Release what outlives ``run`` (the sampler's engine processes)."""
        ...

    def exit_code(self) -> int: ...


@dataclass(frozen=True)
class ProcessSpec(Generic[S]):
    """One process's command line and how to build it from its settings."""

    prog: str
    description: str
    settings: type[S]
    section: str
    """The process's own settings section (``--port`` and ``--model`` apply to it)."""
    build: Callable[[S], Process]
    """Raises ``ConfigError`` on settings it cannot start with."""
    bound_flag: str
    bound_help: str
    done: str
    """Log line at exit, ``%d`` = the units done."""
    options: tuple[tuple[str, dict[str, Any]], ...] = ()
    """More command-line options (flag, ``add_argument`` keywords) the entry point reads
    itself before ``process_main``; listed in ``--help``."""


def process_main(spec: ProcessSpec[S], argv: list[str] | None = None) -> int:
    """Parse the command line, build the process (exit code 2 on a configuration error), run it
    until done or SIGTERM/SIGINT, close it; returns its exit code."""
    parser = process_parser(spec.prog, spec.description)
    bound = parser.add_argument(spec.bound_flag, type=int, help=spec.bound_help).dest
    for flag, kwargs in spec.options:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    try:
        process = spec.build(process_settings(spec.settings, spec.section, args))
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    asked: list[bool] = []

    def request_stop() -> None:
        asked.append(True)
        process.request_stop()

    try:
        done = serve(lambda: process.run(getattr(args, bound)), request_stop)
    except TransportError as exc:
        # one line, no traceback: Redis going away is an outage, not a bug of this process
        if asked:  # the normal end of a run: everything stops at once, Redis too
            log.warning("stopped; Redis went away during the stop (%s)", exc)
            return process.exit_code()
        log.error("Redis unavailable: %s", exc)
        return 1
    finally:
        process.close()
    log.info(spec.done, done)
    return process.exit_code()


def exit_now(main: Callable[[], int]) -> NoReturn:
    """Console-script entry: ``main()``, then exit at once. The process shut down in order
    (checkpoint written, trees acknowledged, prompts handed back); skipping the interpreter's
    slow teardown of torch/vLLM/DeepSpeed keeps SIGTERM-to-exit under 5 s."""
    exit_at_once(main())


def exit_at_once(code: int) -> NoReturn:
    """Exit with ``code`` without the interpreter's teardown, once the logs and standard streams
    are flushed (``os._exit`` flushes nothing)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
