"""Benchmarks of convolutional and residual teachers (issue 16): ``python -m bench.networks
[--quick]``.

One run reports, for a residual CNN with a dense posterior (``full`` and ``precision``,
about 10,000 parameters: a stem and two identity blocks at 16 channels on 3×16×16
inputs, a global pool and a linear head) aligned to half the channels and one block
fewer:

* plan time / one-shot conditioning time of the plan's own B (goal ≤ 3×), best of 3
  each;
* searched cost / the cost of the space-by-space greedy (each space shrunk in turn,
  deepest first, by exact increments, the blocks removed last): what ranking every
  space together buys;
* a ``diag`` row on a wider residual CNN (about 700 k parameters), search + apply;
* a ``kron`` row (laplace-torch's K-FAC of Conv2d, random factors) on a residual CNN of
  about 1 M parameters: search + apply (goal < 10 s), and the apply alone.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from bench.common import interleaved_best, random_spd, report
from planner import FullPosterior, Network, PhiSpace, Plan, PsiBlock
from planner.network_lattice import network_routes
from planner.ops import Tracked
from planner.posterior import DiagPosterior, KronPosterior, PrecisionPosterior
from planner.search import search
from planner.search.construction import least


def resnet(width: int, inner: int, blocks: int, hw: int, stages: int = 1) -> dict:
    """A stem and ``stages`` stages of ``blocks`` identity blocks (the first block of every
    later stage strided, with a projection, at twice the width), a global pool, a head."""
    out = [{"type": "conv", "out": width, "kernel": 3, "padding": 1, "activation": "relu"}]
    for k in range(stages):
        for b in range(blocks):
            proj = k > 0 and b == 0
            wi = inner * 2**k
            w_out = width * 2**k
            block = {
                "type": "residual",
                "activation": "relu",
                "branch": [
                    {
                        "type": "conv",
                        "out": wi,
                        "kernel": 3,
                        "stride": 2 if proj else 1,
                        "padding": 1,
                        "activation": "relu",
                    },
                    {"type": "conv", "out": w_out, "kernel": 3, "padding": 1},
                ],
            }
            if proj:
                block["shortcut"] = {
                    "type": "conv",
                    "out": w_out,
                    "kernel": 1,
                    "stride": 2,
                    "bias": False,
                }
            out.append(block)
    out += [
        {"type": "pool", "mode": "avg", "global": True},
        {"type": "flatten"},
        {"type": "linear", "out": 10},
    ]
    return {"input": [3, hw, hw], "stages": out}


def student_of(d: dict, keep_blocks: int) -> dict:
    """Half the channels everywhere; ``keep_blocks`` blocks of each stage's identity ones."""
    import copy

    s = copy.deepcopy(d)
    stages, seen = [], 0
    for st in s["stages"]:
        if st["type"] == "residual" and st.get("shortcut") is None:
            seen += 1
            if seen > keep_blocks:
                continue
        if st["type"] == "residual":
            seen = 0 if st.get("shortcut") else seen
            for b in st["branch"]:
                b["out"] //= 2
            if st.get("shortcut"):
                st["shortcut"]["out"] //= 2
        elif st["type"] == "conv":
            st["out"] //= 2
        stages.append(st)
    s["stages"] = stages
    return s


def space_by_space(post, student: Network) -> float:
    """The baseline: per route, each shrinking space in turn (deepest first) by exact
    increments, then the blocks; the cheapest route's cost."""
    teacher = post.structure
    best = np.inf
    for route in network_routes(teacher, student):
        tr, sc = Tracked.start(teacher), post.scorer()
        inner = {s for b in route.removed_blocks for s in teacher.graph.blocks[b - 1].inner}
        for s, w in sorted(route.widths, reverse=True):
            if s in inner:
                continue
            while tr.neurons[tr.positions.index(s)].size > w:
                inc = sc.drops(tr.consumer_groups(s)).increments()
                eff = tr.apply(PhiSpace(s, least(inc, sc.cost)))
                sc.commit(eff.conditioned, eff.targets)
        for b in route.removed_blocks:
            eff = tr.apply(PsiBlock(b))
            sc.commit(eff.conditioned, eff.targets)
        best = min(best, sc.cost)
    return best


def dense_rows(quick: bool) -> list[dict]:
    d = resnet(6, 6, 2, 6) if quick else resnet(16, 16, 2, 16)
    teacher = Network.from_json(d)
    student = Network.from_json(student_of(d, 1))
    p = teacher.n_params
    rng = np.random.default_rng(0)
    mean = rng.normal(size=p)
    cov = random_spd(rng, p, rank=min(400, p // 2))
    rows = []
    full = FullPosterior(teacher, mean, cov)
    baseline = space_by_space(full, student)
    prec = np.linalg.inv(cov)
    prec = (prec + prec.T) / 2
    for fmt, make in (
        ("full", lambda: FullPosterior(teacher, mean, cov)),
        ("precision", lambda: PrecisionPosterior(teacher, mean, prec)),
    ):
        c = search(make(), student).plan.compiled
        B, v, keep = c.conditioned, c.targets, c.kept
        # best of 3 for the plan as for the one-shot, in turn (this VM's noise is ±10 %,
        # and its speed drifts between spells)
        (t_plan, found), (t_one, _) = interleaved_best(
            [
                lambda make=make: search(make(), student),
                lambda make=make, B=B, v=v, keep=keep, c=c: make().condition(B, v, keep, c.student),
            ],
            3,
        )
        rows.append(
            {
                "teacher": teacher.describe(),
                "p": p,
                "student": student.describe(),
                "format": fmt,
                "|B|": int(B.size),
                "cost": found.cost,
                "space_by_space_cost": baseline,
                "cost/space_by_space": found.cost / baseline,
                "plan_s": t_plan,
                "one_shot_s": t_one,
                "plan/one_shot": t_plan / t_one,
                "exhaustive": found.exhaustive,
                "goal": "plan/one_shot <= 3",
            }
        )
        print(rows[-1], flush=True)
    return rows


def _row(post, student: Network, size: int, **extra) -> dict:
    """Search and apply, timed (best of 2), and the peak traced memory of one more run
    over ``size``, the bytes of the posterior's arrays (traced apart: tracemalloc slows
    every allocation, nearly doubling a search of many small steps)."""

    def run():
        t0 = time.perf_counter()
        found = search(post, student)
        t1 = time.perf_counter()
        Plan.from_compiled(found.plan.compiled).apply(post)
        return found, t1 - t0, time.perf_counter() - t1

    runs = [run() for _ in range(2)]
    found, t_search, t_apply = min(runs, key=lambda r: r[1] + r[2])
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "teacher": post.structure.describe(),
        "p": post.n,
        "student": student.describe(),
        "format": post.format,
        "cost": found.cost,
        "search_s": t_search,
        "apply_s": t_apply,
        "search_and_apply_s": t_search + t_apply,
        "peak_over_posterior": peak / size,
        "ops": len(found.plan.ops),
        **extra,
    }


def _wide(quick: bool, width: int) -> tuple[Network, Network]:
    """A three-stage residual CNN on 3×32×32 (``width`` channels first) and its student:
    half the channels, one identity block fewer per stage."""
    d = resnet(8, 8, 2, 8, stages=2) if quick else resnet(width, width, 2, 32, stages=3)
    return Network.from_json(d), Network.from_json(student_of(d, 1))


def diag_row(quick: bool) -> dict:
    teacher, student = _wide(quick, 32)
    p = teacher.n_params
    rng = np.random.default_rng(1)
    post = DiagPosterior(teacher, rng.normal(size=p), rng.uniform(0.5, 2.0, size=p))
    return _row(post, student, 16 * p)


def kron_row(quick: bool) -> dict:
    teacher, student = _wide(quick, 40)
    p = teacher.n_params
    rng = np.random.default_rng(2)
    arrays = {"mean": rng.normal(size=p)}
    for u in teacher.graph.units:
        (seg,) = u.segments
        m = seg.width * seg.group
        arrays[f"row{u.layer}"] = random_spd(rng, u.rows, rank=u.rows)
        arrays[f"col{u.layer}"] = random_spd(rng, m, rank=min(m, 256))
        if u.bias is not None:
            arrays[f"bias{u.layer}"] = rng.uniform(0.5, 2.0, size=u.rows)
    post = KronPosterior.from_arrays(teacher, arrays)
    size = sum(a.nbytes for a in arrays.values())
    return _row(post, student, size, goal="search + apply < 10 s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rows = dense_rows(args.quick)
    rows.append(diag_row(args.quick))
    rows.append(kron_row(args.quick))
    report("networks", rows, args.quick)


if __name__ == "__main__":
    main()
