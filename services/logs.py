"""One log format for everything a process writes: JSON lines on stderr (`--log-format json`, the
default) or console rendering (`--log-format console`, for `make run`).

Every line goes through one handler on the root logger whose formatter is structlog's
`ProcessorFormatter`: our structlog lines (routed through the standard library), and the records of
libraries that use `logging` (nats, aiohttp, asyncio, vLLM, our KV connector inside vLLM), and
warnings (`logging.captureWarnings`) and uncaught exceptions. Each line has `timestamp`, `level`,
`event` and `logger`, the process's name (`process`), and the contextvars bound while it is written:
a request's identity (`request_id`, `region`, `priority`; bus/log_context.py), stdlib records
included. A line from a child process (vLLM's engine core) also names it (`subprocess`).

Levels: ours (the `grokstack` loggers) at the configured level, vLLM's at INFO (its start-up lines
say what it loaded and how much KV cache it has), every other library at WARNING.

vLLM configures logging itself in each process it starts, its engine core included (a child
process made with spawn, which inherits none of this set-up): it applies the dictConfig file that
VLLM_LOGGING_CONFIG_PATH names. `configure` writes this process's own configuration to such a
file, so the engine core's lines (vLLM's and our KV connector's) come out in the same format.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.config
import os
import sys
import tempfile
import threading
from types import TracebackType
from typing import Any

import structlog

OURS = "grokstack"  # every logger of ours is grokstack.<part>
VLLM_LEVEL = "INFO"
LIBRARY_LEVEL = "WARNING"  # the root logger's: nats, aiohttp, asyncio, transformers, torch ...

# Both kinds of line get these before rendering: structlog's in the logging call, the standard
# library's in the handler (`foreign_pre_chain`), which runs in the thread and context of the call.
_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]

_config_file: str | None = None  # this process's logging configuration, for vLLM's processes


def level_name(level: str) -> str:
    """INFO, WARNING ... for a level setting ("info"; an unknown one: INFO)."""
    name = level.upper()
    return name if isinstance(logging.getLevelName(name), int) else "INFO"


class _Origin:
    """Names the process on every line, from any thread (contextvars bound at start reach only
    the main thread's tasks), and a child process (vLLM's EngineCore_DP0) by its own name."""

    def __init__(self, process: str) -> None:
        self.process = process

    def __call__(self, _logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if self.process:
            event_dict.setdefault("process", self.process)
        record = event_dict.get("_record")
        if record is not None and record.processName not in (None, "MainProcess"):
            event_dict.setdefault("subprocess", record.processName)
        return event_dict


def formatter(fmt: str = "json", level: str = "INFO", process: str = "") -> logging.Formatter:
    """The formatter of the root handler. vLLM's processes build it from the configuration file
    (see `configure`), so it also sets up there what our code needs: structlog routed through the
    standard library, and warnings logged instead of printed."""
    if not structlog.is_configured():
        _configure_structlog(level_name(level))
    logging.captureWarnings(True)
    _adopt_console_handlers()
    renderer: list[Any] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()] if fmt == "json"
        # renders exc_info itself; a plain traceback (rich's shows local variables: secrets too)
        else [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                            exception_formatter=structlog.dev.plain_traceback)])
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.add_logger_name,
            _Origin(process),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *renderer,
        ])


def logging_config(fmt: str, level: str, process: str) -> dict[str, Any]:
    """The standard library's configuration (dictConfig), for this process and vLLM's."""
    return {
        "version": 1,
        "disable_existing_loggers": False,  # nats' and others' loggers exist already
        "formatters": {OURS: {"()": f"{__name__}.formatter", "fmt": fmt, "level": level, "process": process}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": OURS, "stream": "ext://sys.stderr"}},
        "root": {"level": LIBRARY_LEVEL, "handlers": ["stderr"]},
        "loggers": {  # these and their children: no handler of their own, to the root handler
            OURS: {"level": level, "propagate": True},
            "vllm": {"level": VLLM_LEVEL, "propagate": True},
        },
    }


def _adopt_console_handlers() -> None:
    """Loggers of libraries that print their records themselves (torch, transformers and
    huggingface_hub add a stderr handler when imported) hand them to the root handler instead.
    vLLM applies the configuration after its imports, in each of its processes, so these are
    caught; a line logged while such a library is imported, before that, keeps its format."""
    consoles = {sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__}
    for logger in list(logging.root.manager.loggerDict.values()):
        if not isinstance(logger, logging.Logger):
            continue
        printing = [h for h in logger.handlers
                    if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in consoles]
        if printing:
            for handler in printing:
                logger.removeHandler(handler)
            logger.propagate = True


def configure(level: str = "info", fmt: str = "json", process: str = "") -> None:
    level = level_name(level)
    _configure_structlog(level)
    config = logging_config(fmt, level, process)
    logging.config.dictConfig(config)
    structlog.contextvars.clear_contextvars()
    if process:
        structlog.contextvars.bind_contextvars(process=process)
    _hand_to_vllm(config)
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread


def _configure_structlog(level: str) -> None:
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )


def _hand_to_vllm(config: dict[str, Any]) -> None:
    """Write `config` to this process's file and point vLLM at it: vLLM applies it in this process
    and in every process it starts (its engine core is spawned: nothing of this process's logging
    reaches it otherwise). These two variables are set here and nowhere else; an operator's value is
    overridden, as any other file or vLLM's own format would break the one format of the stack."""
    global _config_file
    if _config_file is None:
        fd, _config_file = tempfile.mkstemp(prefix="grokstack-logging-", suffix=".json")  # private: 0600
        os.close(fd)
        atexit.register(_remove, _config_file, os.getpid())
    with open(_config_file, "w", encoding="utf-8") as file:
        json.dump(config, file)
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = _config_file
    os.environ["VLLM_CONFIGURE_LOGGING"] = "1"  # with 0, vLLM refuses a config file


def _remove(path: str, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child
        try:
            os.unlink(path)
        except OSError:
            pass


def _uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    structlog.get_logger(OURS).critical("uncaught exception", exc_info=(kind, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    structlog.get_logger(OURS).error(
        "uncaught exception in thread", thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
