"""Benchmarks of the alignment core (issue 2): run by hand, ``python -m bench.core``.

1. Applying (10,100,50,1) → (10,50,1) on a full covariance (50 φ then ψ,
   |B| = 5000): the one-pass plan against a plain one-shot scipy conditioning
   of the same B (``cho_factor`` + ``cho_solve``) and against applying the 51
   operations one step at a time.
2. Planning (784, 2048×6, 10) → (784, 256, 256, 10) on a diag posterior.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.linalg as sla

from bench.common import best_of, random_spd, report
from planner import DiagPosterior, FullPosterior, Plan, Structure
from planner.search import search


def plain_scipy(post: FullPosterior, B, v, keep):
    """The textbook one-shot conditioning, with scipy's Cholesky helpers."""
    S, m = post.covariance, post.mean
    cf = sla.cho_factor(S[np.ix_(B, B)], lower=True)
    S_aB = S[np.ix_(keep, B)]
    mean = m[keep] + S_aB @ sla.cho_solve(cf, v - m[B])
    cov = S[np.ix_(keep, keep)] - S_aB @ sla.cho_solve(cf, S_aB.T)
    return mean, cov


def step_by_step(post: FullPosterior, plan: Plan):
    """Apply the plan one operation at a time: a new covariance after every step."""
    cur = post
    for op in plan.ops:
        cur = Plan(cur.structure, (op,)).apply(cur)
    return cur


def apply_bench(quick: bool) -> list[dict]:
    widths, student_w = ((10, 100, 50, 1), (10, 50, 1)) if not quick else ((4, 12, 6, 1), (4, 6, 1))
    teacher = Structure.mlp(widths)
    rng = np.random.default_rng(0)
    p = teacher.n_params
    post = FullPosterior.from_dense(teacher, rng.normal(size=p), random_spd(rng, p))
    plan = search(post, teacher.inherit(student_w), work=0).plan
    c = plan.compiled
    t_plan, ours = best_of(lambda: plan.apply(post))
    t_scipy, (m_ref, _) = best_of(lambda: plain_scipy(post, c.conditioned, c.targets, c.kept))
    t_steps, steps = best_of(lambda: step_by_step(post, plan), repeat=1)
    assert np.allclose(ours.mean, m_ref) and np.allclose(ours.mean, steps.mean)
    return [
        {
            "case": f"apply {widths}→{student_w} full, |B|={c.conditioned.size}",
            "one_pass_s": t_plan,
            "scipy_one_shot_s": t_scipy,
            "step_by_step_s": t_steps,
            "scipy/ours": t_scipy / t_plan,
            "steps/ours": t_steps / t_plan,
        }
    ]


def search_bench(quick: bool) -> list[dict]:
    hidden, n, w = (6, 2048, 256) if not quick else (4, 64, 8)
    teacher = Structure.mlp((784, *(n,) * hidden, 10))
    student = teacher.inherit((784, w, w, 10))
    rng = np.random.default_rng(1)
    p = teacher.n_params
    post = DiagPosterior(teacher, rng.normal(size=p), rng.uniform(0.5, 2.0, size=p))
    t, res = best_of(lambda: search(post, student))
    return [
        {
            "case": f"search {teacher.widths}→{student.widths} diag, p={p}",
            "seconds": t,
            "goal_s": 1.0,
            "routes": res.routes_considered,
            "steps": len(res.plan.ops),
        }
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, nothing saved")
    args = ap.parse_args(argv)
    report("core_apply", apply_bench(args.quick), args.quick)
    report("core_search", search_bench(args.quick), args.quick)


if __name__ == "__main__":
    main()
