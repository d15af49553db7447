"""The bug zoo: realistic buggy autograd Functions, each beside its correct twin.

One module per family of bug (:mod:`.formulas`, :mod:`.loss_options`, :mod:`.numerics`,
:mod:`.aliasing`, :mod:`.structure`, :mod:`.layouts`); :data:`ZOO` lists every entry
(:class:`~tests.verify.zoo.entry.ZooEntry`). Used by ``tests/verify/test_verify_zoo.py``
and ``experiments/verify_zoo_table.py``.
"""

from __future__ import annotations

from tests.verify.zoo import aliasing, formulas, layouts, loss_options, numerics, structure
from tests.verify.zoo.entry import ZooEntry

__all__ = ["FAMILIES", "ZOO", "ZooEntry"]

#: The families, in the order the table lists them.
FAMILIES = ("formulas", "loss_options", "numerics", "aliasing", "structure", "layouts")

ZOO: tuple[ZooEntry, ...] = tuple(
    entry
    for module in (formulas, loss_options, numerics, aliasing, structure, layouts)
    for entry in module.ENTRIES
)
