"""One logging setup for the three services: every line on stderr names its service,
at the level asked for (`--log-level debug|info|warning|error`), as text or with
`--log-json` as one JSON object per line (time, service, level, logger, message and,
where there is one, the exception's traceback). Python warnings are logged the same way.

Each service's `main()` calls `setup_from_argv(name, argv)` first: it takes the two
flags out of argv, sets up the root logger, and returns the rest for the service's
own parser. The launcher passes the flags of `strata serve` on to all three (`argv`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
TEXT_FORMAT = "%(asctime)s {service} %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in the message are escaped)."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "service": self.service,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def setup(service: str, level: str = "info", json_lines: bool = False) -> None:
    """Route every logger's records to stderr, named for `service`; replaces any handler
    set before, so calling it twice leaves one."""
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    text = logging.Formatter(TEXT_FORMAT.format(service=service))
    handler.setFormatter(JsonFormatter(service) if json_lines else text)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become log lines too ("py.warnings")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LEVELS, default="info", help="least severe level logged (default info)")
    parser.add_argument("--log-json", action="store_true", help="log one JSON object per line")


def argv_for(level: str, json_lines: bool) -> list[str]:
    """The flags that give a service this setup (what the launcher appends)."""
    return ["--log-level", level] + (["--log-json"] if json_lines else [])


def setup_from_argv(service: str, argv: list[str] | None = None) -> list[str]:
    """Set up logging from `--log-level`/`--log-json` in argv (default sys.argv[1:]) and
    return the other arguments, in order, for the service's own parser."""
    parser = argparse.ArgumentParser(prog=service, add_help=False, allow_abbrev=False)
    add_arguments(parser)
    known, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    setup(service, known.log_level, known.log_json)
    return rest
