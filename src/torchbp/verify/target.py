"""What ``torchbp-verify module:Symbol --inputs SPEC`` checks: the user's symbol, loaded by
name, and example inputs built from a short text spec.

The spec lists the inputs in order, separated by ``;`` (or one per line in a spec file
given as ``@path``; ``#`` starts a comment):

- ``4,5``: a float tensor of shape (4, 5) drawn from a standard normal; ``()`` is 0-dim;
- ``4,5[0.1,2]``: the float tensor drawn uniformly from [0.1, 2] instead, for a fn whose
  domain is restricted (a log or sqrt: positive; an acos: ``[-0.9,0.9]``), also after a
  dtype prefix (``float32:4,5[0.1,2]``);
- ``int:4<10``: an int64 tensor of shape (4,) with values in [0, 10) (class targets);
- ``bool:4,5``: a boolean tensor of shape (4, 5), each value true with probability 1/2
  (a mask);
- ``complex:4,5``: a complex128 tensor of shape (4, 5), real and imaginary parts drawn
  from a standard normal;
- ``float32:4,5`` (or ``bfloat16:``, ``float16:``, ``float64:``): the float tensor in that
  dtype (the values of ``4,5``, rounded); without ``--dtype`` it is cast to float64 for
  every check, and ``reference_dtype`` also runs fn on it in its own dtype against the
  reference in float64 (a backward wrong only in float32 fails there);
- ``=VALUE``: a Python literal passed as is, e.g. ``=1``, ``=-100``, ``=True``, ``='mean'``.

Examples:
    >>> [tuple(x.shape) for x in parse_inputs("4,5;4")]
    [(4, 5), (4,)]
    >>> parse_inputs("int:3<2;=-1")[1]
    -1
    >>> bool((parse_inputs("100[0.5,2]")[0] >= 0.5).all())
    True
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["FLOAT_DTYPES", "TargetError", "load_symbol", "parse_inputs", "read_spec"]

#: The dtypes a float input may be given in (``float32:4,5``), by the spec's prefix.
FLOAT_DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class TargetError(ValueError):
    """A target or input spec that cannot be used (the CLI's usage error)."""


def load_symbol(target: str) -> Any:
    """The object named by ``module:Symbol`` or ``path/to/file.py:Symbol``.

    ``Symbol`` may be dotted (``Outer.Inner``). The current directory is importable, as
    with ``python -m``; a file's own directory is, for its imports of sibling modules, as
    with ``python path/to/file.py``.

    Args:
        target: where the object lives and its name.

    Raises:
        TargetError: the target is malformed, the module cannot be imported (it is missing,
            or raised while importing) or has no such name.
    """
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise TargetError(
            f"target {target!r} must look like module:Symbol or path/to/file.py:Symbol"
        )
    if where.endswith(".py"):
        module = _module_from_file(Path(where))
    else:
        if "" not in sys.path and str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise TargetError(f"cannot import module {where!r}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
            raise TargetError(f"cannot import module {where!r}: {_raised(exc)}") from exc
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise TargetError(f"{where} has no attribute {name!r} ({part!r} is missing)")
        obj = getattr(obj, part)
    return obj


def _loaded_from(path: Path) -> Any | None:
    """The module already imported from the file ``path`` under its stem (the target and
    the reference named from one file), or None: running the file again would repeat its
    side effects (a ``torch.library`` op defined twice raises)."""
    module = sys.modules.get(path.stem)
    origin = getattr(module, "__file__", None)
    if module is None or origin is None:
        return None
    return module if Path(origin).resolve() == path.resolve() else None


def _module_from_file(path: Path) -> Any:
    if not path.is_file():
        raise TargetError(f"no such file: {path}")
    loaded = _loaded_from(path)
    if loaded is not None:
        return loaded
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the file's sibling modules, as python file.py finds them
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    registered = sys.modules.setdefault(path.stem, module) is module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the file raised while importing
        if registered:
            del sys.modules[path.stem]  # no half-run module for a later import to find
        raise TargetError(f"cannot import {path}: {_raised(exc)}") from exc
    return module


def _raised(exc: BaseException) -> str:
    """What an import raised, in one line (a SyntaxError with its file and line)."""
    where = ""
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        where = f" ({exc.filename}, line {exc.lineno})"
    message = str(exc.msg if isinstance(exc, SyntaxError) else exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}{where}"


def read_spec(spec: str) -> str:
    """The spec itself, or the contents of the spec file when ``spec`` is ``@path``
    (one input per line, ``#`` comments and blank lines ignored)."""
    if not spec.startswith("@"):
        return spec
    path = Path(spec[1:])
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TargetError(f"cannot read the input spec file {path}: {exc}") from None
    items = [line.split("#", 1)[0].strip() for line in lines]
    return ";".join(item for item in items if item)


def _shape(text: str, item: str) -> tuple[int, ...]:
    text = text.strip()
    if text in ("()", ""):
        return ()
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise TargetError(
            f"input {item!r}: a shape is comma-separated sizes, e.g. 4,5 (or () for 0-dim)"
        ) from None
    if any(d < 0 for d in dims):
        raise TargetError(f"input {item!r}: sizes must not be negative")
    return dims


def _float_values(
    text: str, item: str, generator: torch.Generator, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The float64 values of a float input of ``dtype``, ``SHAPE`` (a standard normal) or
    ``SHAPE[LO,HI]`` (uniform in [LO, HI], for a fn with a restricted domain, each value
    one of ``dtype``'s, so that casting it to ``dtype`` keeps it inside [LO, HI])."""
    shape_text, bracket, bounds = text.partition("[")
    size = _shape(shape_text, item)
    if not bracket:
        return torch.randn(size, generator=generator, dtype=torch.float64)
    low, high = _bounds(bounds, item, dtype)
    low_in_dtype, high_in_dtype = _representable_bounds(low, high, item, dtype)
    u = torch.rand(size, generator=generator, dtype=torch.float64)
    # (1 - u) LO + u HI, not LO + u (HI - LO): HI - LO overflows for [-1e308, 1e308]
    drawn = ((1 - u) * low + u * high).to(dtype)
    # rounding to dtype may cross a bound (float16's 0.1 is 0.09998; 1e-8 is its 0)
    return drawn.clamp(low_in_dtype, high_in_dtype).to(torch.float64)


def _representable_bounds(
    low: float, high: float, item: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest value of ``dtype`` at or above ``low`` and the largest at or below
    ``high``, as 0-dim tensors of ``dtype``; a :class:`TargetError` when [LO, HI] holds
    no value of ``dtype`` (``float16:4[1e-9,2e-8]``, between its 0 and its smallest
    subnormal)."""
    low_t = torch.tensor(low, dtype=torch.float64).to(dtype)
    high_t = torch.tensor(high, dtype=torch.float64).to(dtype)
    if float(low_t) < low:
        low_t = torch.nextafter(low_t, torch.tensor(math.inf, dtype=dtype))
    if float(high_t) > high:
        high_t = torch.nextafter(high_t, torch.tensor(-math.inf, dtype=dtype))
    if float(low_t) > float(high_t):
        name = str(dtype).removeprefix("torch.")
        raise TargetError(
            f"input {item!r}: the range [{low:g}, {high:g}] holds no {name} value (its "
            f"nearest are {float(high_t):g} and {float(low_t):g}); widen it or give "
            "the input in a wider dtype (float32:, float64:)"
        )
    return low_t, high_t


def _bounds(text: str, item: str, dtype: torch.dtype) -> tuple[float, float]:
    """``LO`` and ``HI`` of a range ``LO,HI]``, finite in ``dtype`` with ``LO < HI``."""
    usage = f"input {item!r}: a range is SHAPE[LO,HI] with LO < HI, e.g. 4,5[0.1,2]"
    inside, closed, rest = text.partition("]")
    if not closed or rest.strip():
        raise TargetError(usage)
    try:
        low, high = (float(b) for b in inside.split(","))
    except ValueError:
        raise TargetError(usage) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise TargetError(usage)
    largest = torch.finfo(dtype).max
    if max(-low, high) > largest:
        name = str(dtype).removeprefix("torch.")
        raise TargetError(
            f"input {item!r}: the range goes beyond {name}'s largest value ({largest:g}), "
            "where its values are infinite"
        )
    return low, high


def _refuse_range(item: str, kind: str) -> None:
    """A :class:`TargetError` when the ``bool``, ``complex`` or ``int`` input ``item`` has a
    range ``[LO,HI]``, which only float inputs take."""
    if "[" in item:
        raise TargetError(
            f"input {item!r}: a range [LO,HI] is for float inputs only (4,5[0.1,2], "
            f"float32:4,5[0.1,2]), not {kind}: inputs"
        )


def _unknown_prefix(item: str) -> str:
    """The message for an input ``item`` whose prefix before ``:`` names no input kind."""
    known = ", ".join(f"{kind}:" for kind in ("bool", "complex", "int", *FLOAT_DTYPES))
    prefix = item.partition(":")[0]
    return f"input {item!r}: unknown prefix {prefix!r}, expected one of {known}"


def parse_inputs(spec: str, seed: int = 0) -> tuple[Any, ...]:
    """Build the example inputs a spec describes (float64 or another float dtype given
    with its prefix, complex128, int64 and bool tensors on CPU).

    Args:
        spec: ``;``-separated inputs (see the module docstring), or ``@path`` of a file.
        seed: seed of the random values.

    Raises:
        TargetError: on a malformed item, naming it, a spec that lists no inputs, or a seed
            torch cannot take.
    """
    if not -(2**63) <= seed < 2**64:  # what torch's generators take
        raise TargetError(f"seed must be in [-2**63, 2**64), got {seed}")
    text = read_spec(spec)
    if not text.strip():
        raise TargetError(f"the input spec {spec!r} lists no inputs; e.g. --inputs '4,5;5'")
    generator = torch.Generator().manual_seed(seed)
    inputs: list[Any] = []
    for raw in text.split(";"):
        item = raw.strip()
        if not item:
            raise TargetError(f"empty input in {spec!r} (two ';' in a row?)")
        if item.startswith("="):
            try:
                inputs.append(ast.literal_eval(item[1:].strip()))
            except (ValueError, SyntaxError):
                raise TargetError(
                    f"input {item!r}: after '=' give a Python literal (1, -100, True, 'mean')"
                ) from None
        elif item.startswith("bool:"):
            _refuse_range(item, "bool")
            size = _shape(item[5:], item)
            inputs.append(torch.rand(size, generator=generator, dtype=torch.float64) < 0.5)
        elif item.startswith("complex:"):
            _refuse_range(item, "complex")
            size = _shape(item[8:], item)
            inputs.append(torch.randn(size, generator=generator, dtype=torch.complex128))
        elif item.startswith("int:"):
            _refuse_range(item, "int")
            shape_text, sep, high = item[4:].partition("<")
            if not sep or not high.strip().isdigit() or int(high) < 1:
                raise TargetError(
                    f"input {item!r}: an integer tensor is int:SHAPE<HIGH, e.g. int:4<10"
                )
            size = _shape(shape_text, item)
            inputs.append(torch.randint(int(high), size, generator=generator))
        elif item.partition(":")[0] in FLOAT_DTYPES:
            prefix, _, shape_text = item.partition(":")
            values = _float_values(shape_text, item, generator, FLOAT_DTYPES[prefix])
            inputs.append(values.to(FLOAT_DTYPES[prefix]))
        elif ":" in item:
            raise TargetError(_unknown_prefix(item))
        else:
            inputs.append(_float_values(item, item, generator))
    return tuple(inputs)
