"""`Affine`: a linear expression over the LP's placement variables, evaluated or handed to pulp.

The same expression objects give the LP its constraints and ``predict`` its numbers, so the LP
optimum and the prediction of the policy it returns agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VARIABLES = ("wg", "hg", "alpha", "beta")  # see cost_model.timing for their meaning


@dataclass(frozen=True)
class Affine:
    const: float = 0.0  # constant term
    coefs: dict[str, float] = field(default_factory=dict)  # variable name -> coefficient

    @staticmethod
    def var(name: str, scale: float = 1.0) -> Affine:
        assert name in VARIABLES, name
        return Affine(0.0, {name: scale})

    def __add__(self, other: Affine | float) -> Affine:
        if not isinstance(other, Affine):
            return Affine(self.const + other, dict(self.coefs))
        coefs = dict(self.coefs)
        for name, value in other.coefs.items():
            coefs[name] = coefs.get(name, 0.0) + value
        return Affine(self.const + other.const, coefs)

    __radd__ = __add__

    def __sub__(self, other: Affine | float) -> Affine:
        return self + (other * -1.0)

    def __rsub__(self, other: float) -> Affine:
        return (self * -1.0) + other

    def __mul__(self, scale: float) -> Affine:
        return Affine(self.const * scale, {k: v * scale for k, v in self.coefs.items()})

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> Affine:
        return self * (1.0 / scale)

    def value(self, assignment: dict[str, float]) -> float:
        return self.const + sum(v * assignment[k] for k, v in self.coefs.items())

    def to_pulp(self, variables: dict[str, Any]) -> Any:
        import pulp

        return pulp.lpSum([v * variables[k] for k, v in self.coefs.items()]) + self.const
