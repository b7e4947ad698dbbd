"""Routes: which teacher positions survive, chosen by exact block costs (docs/theory.md §5, §6).

A route assigns each student position a block of consecutive teacher
positions.  When there are few routes every one is finished; otherwise each
block (an edge of the route graph) is scored on the teacher's Gaussian itself,
through its scorer, so one Gaussian ranks routes the same way in every format:

* a block whose layers are small is built alone, exactly as the constructive
  pass would (its top shrunk by exact increments, its merged layers paired by
  assignment), and scored by its exact cost;
* a block of large layers is scored on a deterministic sample of rows: the
  exact stand-alone cost of each candidate column (over the sampled rows) and
  of each sampled row's best unit vector, scaled up to the layer.

The ``k`` routes of least total block cost (``networkx.shortest_simple_paths``)
are finished, ``k`` sized by the work one route costs (about one pass over the
posterior).
"""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np

from ..criteria import Criterion, NeuronContext
from ..lattice import END, Route, route_graph, routes
from ..posterior import Posterior
from ..posterior.scoring import Columns, LayerBlock
from ..structure import Structure
from .construction import STAGE_WORK, _Builder, _merge, _shrink

__all__ = ["candidate_routes"]

#: Parameters the search may spend finishing routes (a route is about one pass).
ROUTE_WORK = 5e7
#: Blocks whose layers hold at most this many parameters are built exactly.
EXACT_BLOCK = 200_000
#: Rows a large layer is sampled at, evenly spaced.
SAMPLE_ROWS = 256


def route_budget(teacher: Structure, k: int) -> int:
    """Routes to finish at most: ``k``, fewer for teachers too large to finish many."""
    return max(1, min(k, int(ROUTE_WORK // max(teacher.n_params, 1))))


def candidate_routes(
    posterior: Posterior, student: Structure, crit: Criterion, k: int, budget=None
) -> tuple[list[Route], int]:
    """The routes to finish and how many routes there are (counted up to ``k + 1``).
    With a ``budget``, its deadline is checked before each block is scored."""
    teacher = posterior.structure
    G = route_graph(teacher, student)
    first = list(itertools.islice(routes(teacher, student, G), k + 1))
    k = route_budget(teacher, k)
    if len(first) <= k:
        return first, len(first)
    scores = _BlockScores(posterior, student, crit)
    for a, _b, data in G.edges(data=True):
        if budget is not None:
            budget.check("scoring routes")
        s, e = data["block"]
        data["cost"] = scores(s, e, a[1])
    out = []
    for path in itertools.islice(nx.shortest_simple_paths(G, (1, 1), END, weight="cost"), k):
        out.append(Route(tuple(G.edges[a, b]["block"] for a, b in itertools.pairwise(path))))
    return out, len(first)


class _BlockScores:
    """Block costs on the Gaussian: exact for small blocks, sampled for large ones."""

    def __init__(self, posterior: Posterior, student: Structure, crit: Criterion) -> None:
        self.post, self.student, self.crit = posterior, student, crit
        self.f = posterior.structure
        self.scorer = posterior.scorer()  # for its work model only
        self._drops: dict[int, np.ndarray] = {}
        self._rows: dict[int, tuple[float, np.ndarray]] = {}

    def __call__(self, s: int, e: int, j: int) -> float:
        f, w = self.f, self.student.width(j)
        shrinks = 1 < e < f.T and f.width(e) > w
        size = sum(f.layer_size(p) for p in range(s + 1, e + 1))
        size += f.layer_size(e + 1) if shrinks else 0
        # exact when small, and when its greedy is light (a structured kernel's greedy
        # over a wide position costs far more than its parameters say)
        work = (
            (f.width(e) - w) * self.scorer.step_work(f.width(e), f.width(e + 1)) if shrinks else 0
        )
        if size <= EXACT_BLOCK and work <= STAGE_WORK:
            return self.exact(s, e, w)
        cost = 0.0
        if shrinks:
            cost += float(np.sum(self.drop_costs(e + 1)[: f.width(e) - w]))
        for p in range(s + 1, e + 1):
            cost += self.merge_cost(p, w)
        return max(cost, 0.0)

    def exact(self, s: int, e: int, w: int) -> float:
        b = _Builder(self.f, Route(((s, e),)))  # only its steps are applied, never finished
        sc = self.post.scorer()
        rng = np.random.default_rng(0)

        def context(t: int) -> NeuronContext:
            return NeuronContext(self.post, b.tr, t, rng)

        if 1 < e < self.f.T and self.f.width(e) > w:
            _shrink(b, sc, e, w, self.crit, context)
        for p in range(e, s, -1):
            _merge(b, sc, p, self.crit, context, rng)
        return max(float(sc.cost), 0.0)

    def _sample(self, n: int) -> tuple[np.ndarray, float]:
        k = min(n, SAMPLE_ROWS)
        return np.unique(np.linspace(0, n - 1, k).astype(np.int64)), n / k

    def drop_costs(self, layer: int) -> np.ndarray:
        """Sorted stand-alone costs of zeroing each column of ``layer`` (sampled rows)."""
        if layer not in self._drops:
            rows, scale = self._sample(self.f.width(layer))
            cols = np.arange(self.f.width(layer - 1))
            inc = self.post.scorer().drops(Columns(self.f, layer, rows, cols)).increments()
            self._drops[layer] = np.sort(inc) * scale
        return self._drops[layer]

    def merge_cost(self, layer: int, w: int) -> float:
        """The cost of conditioning w rows of ``layer`` to unit vectors, from sampled rows:
        the block's all-zero cost per row, plus the best rows' cheapest unit vectors."""
        if layer not in self._rows:
            rows, _ = self._sample(self.f.width(layer))
            cols = np.arange(self.f.width(layer - 1))
            block = self.post.scorer().block(LayerBlock(self.f, layer, rows, cols))
            zero = block.cost(np.zeros(block.linear.size)) / rows.size
            best = np.sort(block.linear[: rows.size * cols.size].reshape(rows.size, -1).min(1))
            self._rows[layer] = (zero, best)
        zero, best = self._rows[layer]
        m = max(1, round(best.size * w / self.f.width(layer)))
        return w * zero + w * float(np.mean(best[:m]))
