"""What ``torchbp-train`` tells a person: errors that start with their cause, and no warnings
they cannot act on."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from pytorch_lightning.cli import LightningArgumentParser

__all__ = ["ShortErrorParser", "exit_with_error", "headline", "quiet_lightning"]

#: warnings about Lightning's own code (``message`` regexes)
UNACTIONABLE_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
#: log messages that advertise rather than inform (prefixes)
UNACTIONABLE_LOGS = ("💡 Tip: For seamless cloud logging",)
#: the loggers of Lightning's ``rank_zero_info`` messages
LIGHTNING_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)

_PARSER_KEY = re.compile(r'^Parser key "([^"]+)":$')
#: lines of jsonargparse messages that frame the causes rather than state one
_FRAMING = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:"
    r"|Problem with given class_path|Given value)"
)


def exit_with_error(message: str, *details: str) -> NoReturn:
    """Print ``error: MESSAGE`` (then any detail lines) to stderr and exit with status 2."""
    sys.stderr.write("".join(f"{line}\n" for line in (f"error: {message}", *details)))
    raise SystemExit(2)


def headline(message: str) -> str:
    """The one-line cause of a jsonargparse error message.

    jsonargparse nests causes under ``Parser key "KEY":`` lines; the headline is the dotted
    path of those keys and the first line after the innermost one that states a cause. A
    message with no key (an error raised while instantiating a Union's subtype) heads with
    its first line that states a cause.

    Args:
        message: The parser's error message.

    Examples::

        >>> headline('Parser key "model.hidden_sizes":\\n  Expected a list. Got value: oops')
        'model.hidden_sizes: Expected a list. Got value: oops'
        >>> headline("unrecognized arguments: --nope")
        'unrecognized arguments: --nope'
    """
    lines = [line.strip(" -") for line in message.splitlines() if line.strip(" -")]
    keys: list[str] = []
    cause = ""
    for line in lines:
        key = _PARSER_KEY.match(line)
        if key:
            keys.append(key.group(1))
            cause = ""
        elif not cause and not _FRAMING.match(line):
            cause = line
    if not keys:  # the first line that states a cause (after a Union's framing)
        return next((line for line in lines if not _FRAMING.match(line)), message)
    if not cause:
        return lines[0]
    return f"{'.'.join(keys)}: {cause}"


class ShortErrorParser(LightningArgumentParser):
    """LightningArgumentParser whose errors print their one-line cause first (then the full
    message if it has more to say, and a hint at ``--help``) instead of a long usage dump."""

    def error(self, message: str, *args: Any, **kwargs: Any) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, *args, **kwargs)
        lines = [line for line in message.splitlines() if line.strip()]
        details = [f"  {line}" for line in lines] if len(lines) > 2 else []
        exit_with_error(headline(message), *details, "tip: add --help to list every option")


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(UNACTIONABLE_LOGS)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's warnings and messages that a user cannot act on, inside the block.

    Examples::

        with quiet_lightning():
            trainer.fit(model, datamodule)
    """
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    with warnings.catch_warnings():
        for pattern in UNACTIONABLE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.addFilter(_not_an_advert)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(_not_an_advert)
