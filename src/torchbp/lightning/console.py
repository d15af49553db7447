"""What ``torchbp-train`` tells a person: errors that start with their cause, and no warnings
they cannot act on."""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NoReturn

from pytorch_lightning.cli import LightningArgumentParser

from torchbp.lightning.config_files import bundled_configs

__all__ = ["ShortErrorParser", "closest_key", "exit_with_error", "headline", "quiet_lightning"]

#: warnings about Lightning's own code (``message`` regexes)
UNACTIONABLE_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)
#: Lightning's warning on a fit resumed within an epoch, which it gives for every loader
#: without ``state_dict``: ERMClassifier continues the epoch with torchbp's loaders, and
#: warns itself, naming the loader, about one it cannot continue (a loader of your own,
#: or one with workers)
NOT_RESUMABLE_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"
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

#: jsonargparse's messages for a key it does not know: a config file's key (from the main
#: parser, naming the subcommand), a class's argument (from the class's parser) and a
#: command line option (from the subcommand's parser)
_NOT_ACCEPTED_BY_SUBCOMMAND = re.compile(r"^Subcommand '([^']+)' does not accept option '([^']+)'")
_NOT_ACCEPTED = re.compile(r"^Option '([^']+)' is not accepted")
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)")
#: jsonargparse's message for a ``--config`` that names no file (nor a bundled config)
_CONFIG_NOT_FOUND = re.compile(r"""^Parser key "config": File does not exist: '(.*)'$""")


def closest_key(unknown: str, known: Iterable[str]) -> str | None:
    """The ``known`` key closest to a misspelt ``unknown`` one, or ``None`` if none is close.

    Examples::

        >>> closest_key("model.hiden_sizes", ["model.hidden_sizes", "model.bias"])
        'model.hidden_sizes'
    """
    close = difflib.get_close_matches(unknown, list(known), n=1)
    return close[0] if close else None


def _option_names(parser: Any) -> list[str]:
    """The dotted keys ``parser`` accepts (none if they cannot be listed)."""
    try:
        return list(parser.get_defaults().keys())
    except Exception:  # a hint only: the error it would decorate is what matters
        return []


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


def _config_not_found(path: str) -> str:
    """The message for a ``--config`` that is neither a file nor a bundled config's name
    (jsonargparse said only "File does not exist"), with the bundled names and the one a
    misspelt name most likely means.

    Examples::

        >>> _config_not_found("/home/me/irs")  # doctest: +ELLIPSIS
        "config: no file '/home/me/irs', nor a bundled config (...); did you mean iris?"
    """
    names = list(bundled_configs())
    meant = closest_key(os.path.splitext(os.path.basename(path))[0], names)
    hint = f"; did you mean {meant}?" if meant else ""
    return f"config: no file {path!r}, nor a bundled config ({', '.join(names)}){hint}"


class ShortErrorParser(LightningArgumentParser):
    """LightningArgumentParser whose errors print their one-line cause first (then the full
    message if it has more to say, and a hint at ``--help``) instead of a long usage dump."""

    #: every parser made (the main one and a subcommand's), to name the keys a subcommand
    #: accepts in the main parser's errors
    _made: ClassVar[weakref.WeakSet] = weakref.WeakSet()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        ShortErrorParser._made.add(self)

    def _with_suggestion(self, message: str) -> str:
        """``message`` with the key a misspelt one (a config file's key, a class's argument
        or a command line option) most likely means, after its first line."""
        first, _, rest = message.partition("\n")
        rest = f"\n{rest}" if rest else ""
        if match := _CONFIG_NOT_FOUND.match(first):
            return _config_not_found(match.group(1)) + rest
        if match := _NOT_ACCEPTED_BY_SUBCOMMAND.match(first):
            subcommand, key = match.groups()
            parsers = [p for p in self._made if str(p.prog).endswith(f" {subcommand}")]
            meant = closest_key(key, [n for p in parsers for n in _option_names(p)])
            hints = [repr(meant)] if meant else []
        elif match := _NOT_ACCEPTED.match(first):
            meant = closest_key(match.group(1), _option_names(self))
            hints = [repr(meant)] if meant else []
        elif match := _UNRECOGNIZED.match(first):
            names = _option_names(self)
            options = [o for o in match.group(1).split() if o.startswith("--")]
            meant_options = [closest_key(o[2:].split("=", 1)[0], names) for o in options]
            hints = [f"--{m}" for m in meant_options if m]
        else:
            hints = []
        if not hints:
            return message
        return f"{first}; did you mean {' or '.join(hints)}?{rest}"

    def error(self, message: str, *args: Any, **kwargs: Any) -> NoReturn:
        message = self._with_suggestion(message)
        if not self.exit_on_error:
            super().error(message, *args, **kwargs)
        lines = [line for line in message.splitlines() if line.strip()]
        details = [f"  {line}" for line in lines] if len(lines) > 2 else []
        exit_with_error(headline(message), *details, "tip: add --help to list every option")


#: Lightning's message on the checkpoint saved on an exception, whose line continuation
#: inside its f-string puts a run of spaces before the (often empty) exception message:
#: "An KeyboardInterrupt was raised with message:             , saved checkpoint to ..."
_EXCEPTION_CHECKPOINT = re.compile(
    r"^An (\w+) was raised with message:\s*(.*?), saved checkpoint to (.*)$", re.DOTALL
)


def _for_a_person(record: logging.LogRecord) -> bool:
    """Drop an advert; say Lightning's checkpoint-on-exception message in one tidy line:
    ``KeyboardInterrupt: saved a checkpoint to PATH`` (with the exception's message, if
    any, after its name)."""
    message = record.getMessage()
    if message.startswith(UNACTIONABLE_LOGS):
        return False
    saved = _EXCEPTION_CHECKPOINT.match(message)
    if saved:
        name, said, path = saved.groups()
        record.msg = f"{name}{f' ({said})' if said else ''}: saved a checkpoint to {path}"
        record.args = ()
    return True


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's warnings and messages that a user cannot act on, and tidy its
    message on the checkpoint saved on an exception, inside the block.

    Lightning's "your dataloader is not resumable" on a fit resumed within an epoch is
    hidden too: :class:`~torchbp.lightning.ERMClassifier` continues the epoch with torchbp's
    loaders, and warns itself about a loader it cannot continue.

    Examples::

        with quiet_lightning():
            trainer.fit(model, datamodule)
    """
    # a block within another leaves the filter to the outer block, which added it
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    loggers = [logger for logger in loggers if _for_a_person not in logger.filters]
    with warnings.catch_warnings():
        for pattern in (*UNACTIONABLE_WARNINGS, NOT_RESUMABLE_WARNING):
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.addFilter(_for_a_person)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(_for_a_person)
