"""The Pareto set of points trading accuracy against speed: pure functions, no I/O.

A point is dominated when another is at least as good on both axes and
strictly better on one. Points with equal coordinates do not dominate each
other, so exact ties all stay on the frontier.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["dominates", "pareto_indices"]


def _key(point: tuple[float, float], higher_x: bool, higher_y: bool) -> tuple[float, float]:
    x, y = point
    return (x if higher_x else -x, y if higher_y else -y)


def dominates(a: tuple[float, float], b: tuple[float, float], higher_x: bool = True, higher_y: bool = False) -> bool:
    """True when ``a`` is at least as good as ``b`` on both axes and better on one."""
    (ax, ay), (bx, by) = _key(a, higher_x, higher_y), _key(b, higher_x, higher_y)
    return ax >= bx and ay >= by and (ax > bx or ay > by)


def pareto_indices(points: Sequence[tuple[float, float]], higher_x: bool = True, higher_y: bool = False) -> list[int]:
    """Indices of the non-dominated points, ordered by x (best-x last for higher_x).

    Defaults: x is a speedup (higher is better), y a perplexity (lower is
    better). Points with a NaN or infinite coordinate are never on the
    frontier and never dominate.
    """
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    keys = {i: _key(points[i], higher_x, higher_y) for i in finite}
    # sweep by x descending (best first), ties by y descending: a point is kept when its y beats every y seen at a larger x
    order = sorted(finite, key=lambda i: (-keys[i][0], -keys[i][1]))
    front: list[int] = []
    best_y = -math.inf
    k = 0
    while k < len(order):
        # a group of equal x: only those with the group's best y can survive
        j = k
        while j < len(order) and keys[order[j]][0] == keys[order[k]][0]:
            j += 1
        group = order[k:j]
        group_best = keys[group[0]][1]
        if group_best > best_y:
            front += [i for i in group if keys[i][1] == group_best]
            best_y = group_best
        k = j
    return sorted(front, key=lambda i: (points[i][0], i) if higher_x else (-points[i][0], i))
