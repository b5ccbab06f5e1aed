"""Structured logging: JSON lines for machines, readable lines on a terminal, secrets masked.

structlog renders; the standard library's loggers (the SCIM client's retries,
APScheduler) go through the same processors, so every line has one format and
no line escapes redaction.
"""

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
    """Send structlog and standard-library logging to stderr, rendered alike."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    numeric = logging.getLevelName(level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _redact, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # httpx logs every request URL at INFO; filter URLs carry e-mail addresses.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # One line per job run is noise next to our own cycle events.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # Alembic describes its context on every start; the store logs the upgrades it makes.
    logging.getLogger("alembic").setLevel(logging.WARNING)
