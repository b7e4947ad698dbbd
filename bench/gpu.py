"""Dense kernels on torch (``planner.backend``): the apply of a ``full`` plan on a device
against numpy on the same machine, and against a hand-written torch one-shot on the
same device (the floor the backend should stay within 2× of).

``python -m bench.gpu [--device cuda|cpu] [--quick]``: the Table-1 search and apply
(10,100,50,1) → (10,50,1), and a p = 20,300 full posterior (20,400,30,10) planned to
(20,100,30,10) and applied; each search on numpy and on the device (the dense greedy's
large kernels there), each apply likewise. On a machine without a GPU, ``--device cpu``
measures torch's CPU kernels (the code path, not the speed a GPU gives). Results in
``bench/results/gpu_<device>.json``.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import best_of, random_spd, report
from planner import FullPosterior, Structure
from planner.backend import use
from planner.search import search


def _one_shot(torch, device, S, m, B, keep, v):
    """The floor: index, factor, solve, product, written directly in torch."""
    St = torch.from_numpy(S).to(device)
    Bt, kt = torch.from_numpy(B).to(device), torch.from_numpy(keep).to(device)
    L = torch.linalg.cholesky(St[Bt][:, Bt])
    W = torch.linalg.solve_triangular(L, St[Bt][:, kt], upper=False)
    d = torch.from_numpy(v - m[B]).to(device)[:, None]
    mu = (
        torch.from_numpy(m[keep]).to(device)
        + (W.T @ torch.linalg.solve_triangular(L, d, upper=False))[:, 0]
    )
    out = St[kt][:, kt] - W.T @ W
    if device.type == "cuda":
        torch.cuda.synchronize()
    return mu.cpu().numpy(), out.cpu().numpy()


def case(name, widths, student, device, rng) -> dict:
    import torch

    dev = torch.device(device)
    s = Structure.mlp(widths)
    p = s.n_params
    S = random_spd(rng, p)
    m = rng.normal(size=p)
    post = FullPosterior(s, m, S)
    target = s.inherit(student)
    search(post, target)  # warm-up, as on the device below
    t_search, found = best_of(lambda: search(post, target), 1)
    with use(device):  # the dense greedy's large kernels on the device too
        search(post, target)  # warm-up
        t_search_dev, found_dev = best_of(lambda: search(post, target), 1)
    plan = found.plan
    c = plan.compiled
    t_np, base = best_of(lambda: plan.apply(post))
    with use(device):
        plan.apply(post)  # warm-up (kernels, allocator)
        t_dev, got = best_of(lambda: plan.apply(post))
    args = (S, m, c.conditioned, c.kept, c.targets)
    _one_shot(torch, dev, *args)
    t_floor, _ = best_of(lambda: _one_shot(torch, dev, *args))
    err = float(np.abs(got.mean - base.mean).max() / max(1.0, np.abs(base.mean).max()))
    return {
        "case": name,
        "p": p,
        "|B|": int(c.n_conditioned),
        "device": device,
        "search_numpy_s": t_search,
        "search_device_s": t_search_dev,
        "search numpy/device": t_search / t_search_dev,
        "cost_rel_diff": abs(found_dev.cost - found.cost) / abs(found.cost),
        "apply_numpy_s": t_np,
        "apply_device_s": t_dev,
        "numpy/device": t_np / t_dev,
        "one_shot_torch_s": t_floor,
        "device/one_shot": t_dev / t_floor,
        "plan_and_apply numpy/device": (t_search + t_np) / (t_search_dev + t_dev),
        "max_rel_diff_mean": err,
    }


def main(argv: list[str] | None = None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    cases = [("Table-1 (10,100,50,1)→(10,50,1)", (10, 100, 50, 1), (10, 50, 1))]
    if not args.quick:
        cases.append(("20k (20,400,30,10)→(20,100,30,10)", (20, 400, 30, 10), (20, 100, 30, 10)))
    else:
        cases = [("small (6,20,10,2)→(6,10,2)", (6, 20, 10, 2), (6, 10, 2))]
    rows = [case(n, w, st, args.device, rng) for n, w, st in cases]
    report(f"gpu_{args.device}", rows, args.quick)


if __name__ == "__main__":
    main()
