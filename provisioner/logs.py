"""Structured logging: JSON lines for machines, readable lines on a terminal, secrets masked."""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import structlog

from provisioner.redaction import redact_value

LogFormat = Literal["auto", "json", "console"]


def _redact(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Mask every known secret and bearer credential in every value of an event."""
    return {key: redact_value(value) for key, value in event.items()}


def configure(level: str = "info", fmt: LogFormat = "auto") -> None:
    """Set up structlog (and the stdlib loggers it shares a stream with) on stderr."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # httpx logs every request URL at INFO; filter URLs carry e-mail addresses.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
