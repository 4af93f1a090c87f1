"""Pallas call operands by name: the positional arguments and the output aliases of a call.

A `pallas_call` takes its operands by position, and `input_output_aliases` names an operand by
its position too, so a hand-counted index (`11 + i`) aliases the wrong buffer as soon as an
operand is added before it. Here a call site lists its operands' names once, in order; the
aliases come from the names of the operands each output reuses (`aliases`), and the arguments
from keywords put in that order (`ordered`), so both follow the one list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def aliases(names: Sequence[str], outputs: Sequence[str]) -> dict[int, int]:
    """`input_output_aliases` for a call whose operands are `names` (in order, scalar
    prefetch included) and whose output `j` reuses the operand named `outputs[j]`."""
    unknown = [n for n in outputs if n not in names]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"aliased outputs {list(outputs)} must name distinct operands of "
            f"{list(names)}; unknown: {unknown}"
        )
    return {names.index(n): j for j, n in enumerate(outputs)}


def ordered(names: Sequence[str], **operands: Any) -> tuple[Any, ...]:
    """The operands given by keyword, in the order of `names` (every name exactly once)."""
    if set(operands) != set(names):
        raise ValueError(
            f"operands {sorted(operands)} are not the call's {list(names)}: "
            f"missing {sorted(set(names) - set(operands))}, "
            f"unknown {sorted(set(operands) - set(names))}"
        )
    return tuple(operands[n] for n in names)
