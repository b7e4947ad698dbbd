"""What the aligned prior buys on real data: scikit-learn's digits, small training sets.

    python -m experiments.digits [--quick] [--out DIR] [--url URL] [--seeds K]

Data: the 1,797 8×8 digits bundled with scikit-learn (no download), pixels / 16.
Per seed, a fresh split: 397 test images, 200 validation images (used only to
choose the baselines' hyperparameters) and a pool of 1,200 on which the teachers
are trained; each student sees the first n of the pool (n = 50, 100, 200, 500,
nested, so sizes are paired too).

Teachers (ReLU, bias), MAP with the prior precision ``λ_T`` they are then
Laplace-fitted with (laplace-torch, GGN, on the whole pool):

* ``A`` = (64, 128, 64, 10): a damped ``kron`` posterior (and a ``diag`` one for
  the shortcut);
* ``B`` = (64, 32, 32, 10): ``full`` (uploaded as its precision), ``diag`` and
  damped ``kron`` posteriors.

Students (64, 32, 16, 10) (neurons removed) and (64, 32, 10) (a layer removed by
ψ), trained by MAP (full batch, Adam) on ``mean NLL + energy / n`` under:

* ``isotropic``: ``N(0, λ⁻¹ I)``, ``λ`` chosen on the validation set from a grid,
  torch's default initialisation; the baseline every difference is taken against;
* ``hinton[T]``: Hinton et al.'s distillation from teacher T on the student's
  own n images (``(1 − α) CE + α τ² KL``, ``α = ½``, ``τ`` chosen on the
  validation set) with the isotropic prior chosen above;
* ``shortcut[T]``: the authors' shortcut, random neurons kept from T's
  *diagonal* posterior (criterion ``random``): selection, its mean and variances;
* ``aligned[T fmt]``: this project, the searched plan (``posterior_ratio``) on
  T's posterior in format fmt, the aligned prior's exact energy
  (``PriorPenalty``);
* ``mean-only[T fmt]``: the same aligned mean with an isotropic covariance
  ``λ⁻¹ I`` (``λ`` chosen on the validation set): separates what the conditioned
  mean buys from what the covariance adds;
* ``aligned+hinton[T fmt]``: the aligned prior together with Hinton's loss
  (``τ`` chosen on the validation set): the method is distillation, so both.

The two ablations run for B's full posterior and A's kron one.

Students with a teacher-derived prior start from its mean. Reported: test NLL,
accuracy and expected calibration error (15 bins), each as the paired
difference against ``isotropic`` (mean over seeds with a 95 % t interval).
Without ``--url`` an embedded service is started on a free port.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from experiments.seed_synthetic import local_service
from planner_client import PlannerClient
from planner_client.torch import PriorPenalty, from_laplace, load_mean, module_of, structure_of

RESULTS = Path(__file__).parent / "results"
TEACHERS = {"A": (64, 128, 64, 10), "B": (64, 32, 32, 10)}
POSTERIORS = {"A": ("kron", "diag"), "B": ("full", "diag", "kron")}
STUDENTS = ((64, 32, 16, 10), (64, 32, 10))
SIZES = (50, 100, 200, 500)
METRICS = ("nll", "accuracy", "ece")


def split(seed: int):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(X))
    X = torch.tensor(X[perm] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[perm], dtype=torch.long)
    return (X[:397], y[:397]), (X[397:597], y[397:597]), (X[597:], y[597:])


def mlp(widths) -> torch.nn.Sequential:
    return module_of({"widths": list(widths), "activation": "relu", "bias": True})


def metrics(model, X, y) -> dict[str, float]:
    with torch.no_grad():
        logp = F.log_softmax(model(X).double(), dim=1)
    p = logp.exp()
    conf, pred = p.max(1)
    correct = (pred == y).double()
    bins = torch.clamp((conf * 15).long(), max=14)
    ece = sum(
        (bins == b).double().mean() * abs(correct[bins == b].mean() - conf[bins == b].mean())
        for b in range(15)
        if (bins == b).any()
    )
    return {
        "nll": float(F.nll_loss(logp, y)),
        "accuracy": float(correct.mean()),
        "ece": float(ece),
    }


def train(model, X, y, energy, steps: int, lr: float, teacher_logits=None, tau: float = 1.0):
    """MAP, full batch: mean cross-entropy (or Hinton's loss) + energy() / n."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(X)
    for _ in range(steps):
        opt.zero_grad()
        logits = model(X)
        loss = F.cross_entropy(logits, y)
        if teacher_logits is not None:
            kl = F.kl_div(
                F.log_softmax(logits / tau, 1),
                F.log_softmax(teacher_logits / tau, 1),
                log_target=True,
                reduction="batchmean",
            )
            loss = 0.5 * loss + 0.5 * tau**2 * kl
        loss = loss + energy(model) / n
        loss.backward()
        opt.step()
    return model


def isotropic(lam: float):
    def energy(model):
        return 0.5 * lam * sum((p * p).sum() for p in model.parameters())

    return energy


def fit_teacher(name: str, pool, cfg: dict, seed: int):
    """The MAP teacher and its laplace-torch posteriors, converted (``from_laplace``)."""
    torch.manual_seed(seed)
    X, y = pool
    model = mlp(TEACHERS[name])
    train(model, X, y, isotropic(cfg["teacher_prior"]), cfg["teacher_steps"], 3e-3)
    out = {}
    for fmt in POSTERIORS[name]:
        la = fitted_laplace(model, X, y, fmt, cfg["teacher_prior"], cfg["laplace_examples"])
        out[fmt] = from_laplace(la)
    return model, out


def fitted_laplace(model, X, y, fmt: str, prior: float, examples: int):
    """laplace-torch's GGN Laplace of ``model`` over all weights in ``fmt`` (K-FAC damped),
    fitted on the first ``examples`` of ``(X, y)``."""
    from laplace import Laplace

    ds = torch.utils.data.TensorDataset(X[:examples], y[:examples])
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=fmt,
        prior_precision=prior,
        **({"damping": True} if fmt == "kron" else {}),
    )
    la.fit(torch.utils.data.DataLoader(ds, batch_size=200))
    return la


def run(url: str, cfg: dict, tmp: Path, log=print) -> dict:
    runs: list[dict] = []
    teachers: list[dict] = []
    t_start = time.perf_counter()
    with PlannerClient(url, timeout=3600) as client:
        for seed in cfg["seeds"]:
            test, val, pool = split(seed)
            priors: dict[tuple, tuple] = {}  # (teacher, kind, student) → (fmt, arrays, cost)
            teacher_models = {}
            for tname in cfg["teachers"]:
                model, posts = fit_teacher(tname, pool, cfg, seed)
                teacher_models[tname] = model
                teachers.append(
                    {"seed": seed, "teacher": tname, **metrics(model, *test)}
                    | {"posteriors": {f: p[0] for f, p in posts.items()}}
                )
                for fmt, (upload_fmt, arrays) in posts.items():
                    t = client.upload_teacher(
                        f"digits-{tname}-{fmt}-{seed}", structure_of(model), upload_fmt, arrays
                    )
                    for sw in cfg["students"]:
                        if fmt == "diag":  # the shortcut: random neurons from the diagonal
                            plan, arr = client.align(t["id"], list(sw), "random", seed=seed)
                            priors[(tname, "shortcut", sw)] = ("diag", arr, plan["cost"])
                        if fmt != "diag" or tname == "B":
                            plan, arr = client.align(t["id"], list(sw), "posterior_ratio")
                            priors[(tname, f"aligned {fmt}", sw)] = (upload_fmt, arr, plan["cost"])
                    client.delete_teacher(t["id"])
            log(f"seed {seed}: teachers and priors in {time.perf_counter() - t_start:.0f} s")
            for n in cfg["sizes"]:
                X, y = pool[0][:n], pool[1][:n]
                for sw in cfg["students"]:
                    runs.extend(
                        _students(seed, n, sw, X, y, val, test, priors, teacher_models, cfg)
                    )
            log(f"seed {seed}: students done at {time.perf_counter() - t_start:.0f} s")
    return {"config": _jsonable(cfg), "teachers": teachers, "runs": runs}


def _students(seed, n, sw, X, y, val, test, priors, teacher_models, cfg) -> list[dict]:
    out = []

    def record(method, model, **extra):
        out.append(
            {"seed": seed, "n": n, "student": list(sw), "method": method}
            | metrics(model, *test)
            | extra
        )

    def fresh():
        torch.manual_seed(10_000 * seed + n)
        return mlp(sw)

    best = None
    for lam in cfg["isotropic_grid"]:
        m = train(fresh(), X, y, isotropic(lam), cfg["steps"], cfg["lr"])
        v = metrics(m, *val)["nll"]
        if best is None or v < best[0]:
            best = (v, lam, m)
    _, lam, model = best
    record("isotropic", model, prior_precision=lam)
    for tname, teacher in teacher_models.items():
        with torch.no_grad():
            t_logits = teacher(X)
        best = None
        for tau in cfg["tau_grid"]:
            m = train(fresh(), X, y, isotropic(lam), cfg["steps"], cfg["lr"], t_logits, tau)
            v = metrics(m, *val)["nll"]
            if best is None or v < best[0]:
                best = (v, tau, m)
        record(f"hinton[{tname}]", best[2], tau=best[1])
    for (tname, kind, s), (fmt, arrays, cost) in priors.items():
        if s != sw:
            continue
        model = load_mean(fresh(), arrays)
        penalty = PriorPenalty(model, fmt, arrays)
        train(model, X, y, lambda _m, pen=penalty: pen(), cfg["steps"], cfg["lr"])
        method = f"shortcut[{tname}]" if kind == "shortcut" else f"aligned[{tname} {kind[8:]}]"
        record(method, model, plan_cost=cost)
        if kind == "shortcut" or fmt != cfg["ablation_format"].get(tname):
            continue
        label = f"{tname} {kind[8:]}"
        # the aligned mean with an isotropic covariance (λ chosen on validation): does
        # the covariance matter, or only the conditioned mean?
        best = None
        for lam_m in cfg["isotropic_grid"]:
            m = load_mean(fresh(), arrays)
            mu = torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
            train(m, X, y, _around(mu, lam_m), cfg["steps"], cfg["lr"])
            v = metrics(m, *val)["nll"]
            if best is None or v < best[0]:
                best = (v, lam_m, m)
        record(f"mean-only[{label}]", best[2], prior_precision=best[1], plan_cost=cost)
        # the aligned prior with Hinton's loss (the method is distillation: both at once)
        with torch.no_grad():
            t_logits = teacher_models[tname](X)
        best = None
        for tau in cfg["tau_grid"]:
            m = load_mean(fresh(), arrays)
            pen = PriorPenalty(m, fmt, arrays)
            train(m, X, y, lambda _m, p=pen: p(), cfg["steps"], cfg["lr"], t_logits, tau)
            v = metrics(m, *val)["nll"]
            if best is None or v < best[0]:
                best = (v, tau, m)
        record(f"aligned+hinton[{label}]", best[2], tau=best[1], plan_cost=cost)
    return out


def _around(mu: torch.Tensor, lam: float):
    """The energy of ``N(μ, λ⁻¹ I)``: the aligned mean with an isotropic covariance."""

    def energy(model):
        theta = torch.nn.utils.parameters_to_vector(model.parameters())
        return 0.5 * lam * ((theta - mu) ** 2).sum()

    return energy


def _jsonable(cfg: dict) -> dict:
    return {k: [list(v) if isinstance(v, tuple) else v for v in x] if isinstance(x, list | tuple)
            else x for k, x in cfg.items()}  # fmt: skip


def config(quick: bool, seeds: int | None) -> dict:
    if quick:
        return {
            "seeds": list(range(seeds or 2)),
            "teachers": ["B"],
            "students": list(STUDENTS),
            "sizes": [50],
            "teacher_steps": 150,
            "teacher_prior": 1.0,
            "laplace_examples": 200,
            "steps": 40,
            "lr": 1e-2,
            "isotropic_grid": [0.1, 10.0],
            "tau_grid": [2.0],
            "ablation_format": {"B": "precision"},
        }
    return {
        "seeds": list(range(seeds or 10)),
        "teachers": ["A", "B"],
        "students": list(STUDENTS),
        "sizes": list(SIZES),
        "teacher_steps": 1500,
        "teacher_prior": 1.0,
        "laplace_examples": 1200,
        "steps": 400,
        "lr": 1e-2,
        "isotropic_grid": [0.01, 0.1, 1.0, 10.0, 100.0],
        "tau_grid": [1.0, 2.0, 4.0],
        # the aligned prior whose mean-only and +Hinton variants are run too (by the
        # format it is uploaded in): B's full posterior (uploaded as its precision) and A's
        # kron
        "ablation_format": {"B": "precision", "A": "kron"},
    }


def _sk(student):
    """A student as a key: its name (a string) or its widths (a tuple)."""
    return student if isinstance(student, str) else tuple(student)


def _label(student) -> str:
    """A student in summary keys: its name, or its widths as a list."""
    return student if isinstance(student, str) else str(list(student))


def summarise(results: dict) -> dict:
    """Per student, n and method: each metric's mean and its paired difference against
    ``isotropic`` (same seed, n, student) with a 95 % t interval over seeds."""
    base = {
        (r["seed"], r["n"], _sk(r["student"])): r
        for r in results["runs"]
        if r["method"] == "isotropic"
    }
    groups: dict[tuple, list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((_sk(r["student"]), r["n"], r["method"]), []).append(r)
    out = {}
    for (sw, n, method), rs in sorted(groups.items()):
        row = {"k": len(rs)}
        for m in METRICS:
            vals = np.array([r[m] for r in rs])
            diffs = np.array([r[m] - base[(r["seed"], n, sw)][m] for r in rs])
            half = (
                float(stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs)))
                if len(diffs) > 1
                else float("nan")
            )
            d = float(diffs.mean())
            row[m] = {"mean": float(vals.mean()), "diff": d, "lo": d - half, "hi": d + half}
        who = sw if isinstance(sw, str) else list(sw)
        out[f"{_label(sw)} n={n} {method}"] = {"student": who, "n": n, "method": method} | row
    return out


def paired(results: dict, a: str, b: str, sw, n: int, metric: str) -> dict | None:
    """``a − b`` on ``metric``, paired by seed, for one student and n: mean, 95 % t interval."""
    runs = {
        (r["method"], r["seed"]): r[metric]
        for r in results["runs"]
        if _sk(r["student"]) == _sk(sw) and r["n"] == n
    }
    seeds = sorted({s for m, s in runs if m == a} & {s for m, s in runs if m == b})
    if len(seeds) < 2:
        return None
    d = np.array([runs[(a, s)] - runs[(b, s)] for s in seeds])
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return {"diff": float(d.mean()), "lo": float(d.mean()) - half, "hi": float(d.mean()) + half}


def _comparisons(results: dict, methods: list[str]) -> list[str]:
    """Each aligned prior against the same teacher's shortcut and Hinton (test NLL)."""
    cfg = results["config"]
    lines = [
        "",
        "## The aligned prior against the shortcut, Hinton's distillation and its own mean "
        "(test NLL)",
        "",
        "Paired by seed, each aligned prior minus the same teacher's baseline: negative "
        "means the aligned prior is better. `aligned − mean-only` is what the aligned "
        "covariance adds to the aligned mean; `aligned+hinton − hinton` what the prior adds "
        "to distillation.",
    ]
    for sw in cfg["students"]:
        lines += ["", f"### student {tuple(sw)}", ""]
        lines.append("| comparison | " + " | ".join(f"n = {n}" for n in cfg["sizes"]) + " |")
        lines.append("| --- |" + " --- |" * len(cfg["sizes"]))
        for a in (m for m in methods if m.startswith("aligned[")):
            label = a[len("aligned[") : -1]
            teacher = label.split()[0]
            pairs = [(a, f"shortcut[{teacher}]"), (a, f"hinton[{teacher}]")]
            if f"mean-only[{label}]" in methods:  # what the covariance adds to the mean
                pairs.append((a, f"mean-only[{label}]"))
            if f"aligned+hinton[{label}]" in methods:  # what the prior adds to distillation
                pairs.append((f"aligned+hinton[{label}]", f"hinton[{teacher}]"))
            for a2, b in pairs:
                cells = []
                for n in cfg["sizes"]:
                    c = paired(results, a2, b, sw, n, "nll")
                    cells.append(
                        "" if c is None else f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"
                    )
                lines.append(f"| {a2} − {b} | " + " | ".join(cells) + " |")
    return lines


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = results["summary"] = summarise(results)
    (out / "digits.json").write_text(json.dumps(results, indent=1))
    cfg = results["config"]
    methods = sorted({r["method"] for r in summary.values()}, key=_order)
    lines = [
        "# Digits: what the aligned prior buys at small n",
        "",
        f"scikit-learn digits; seeds {cfg['seeds']} (paired: same split, data and "
        "initialisation across methods); students trained by MAP, "
        f"{cfg['steps']} full-batch Adam steps. Each cell: the mean over seeds of "
        "(method − isotropic) on the 397 test images, with its 95 % t interval; "
        "negative NLL and ECE differences and positive accuracy differences are better. "
        "`python -m experiments.digits` wrote this file; see its docstring for the set-up.",
        "",
        "Teachers on the test set (mean over seeds): "
        + "; ".join(
            f"{t} {TEACHERS[t]}: NLL {np.mean([x['nll'] for x in results['teachers'] if x['teacher'] == t]):.3f}, "  # noqa: E501
            f"accuracy {np.mean([x['accuracy'] for x in results['teachers'] if x['teacher'] == t]):.3f}"  # noqa: E501
            for t in cfg["teachers"]
        )
        + ".",
    ]
    lines += metric_tables(summary, cfg["sizes"], cfg["students"], methods)
    lines += _comparisons(results, methods)
    (out / "digits.md").write_text("\n".join(lines) + "\n")
    _plot(summary, cfg, methods, out / "digits.png")


def metric_tables(summary: dict, sizes, students, methods) -> list[str]:
    """Markdown tables, per metric and student: the baseline's mean, every other method's
    paired difference against it with its 95 % interval."""
    lines: list[str] = []
    for metric, label in (("nll", "test NLL"), ("accuracy", "test accuracy"), ("ece", "test ECE")):
        for sw in students:
            lines += ["", f"## {label}, student {_sk(sw)}", ""]
            lines.append("| method | " + " | ".join(f"n = {n}" for n in sizes) + " |")
            lines.append("| --- |" + " --- |" * len(sizes))
            for method in methods:
                cells = []
                for n in sizes:
                    r = summary.get(f"{_label(sw)} n={n} {method}")
                    if r is None:
                        cells.append("")
                    elif method == "isotropic":
                        cells.append(f"{r[metric]['mean']:.3f} (baseline)")
                    else:
                        c = r[metric]
                        cells.append(f"{c['diff']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]")
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _order(method: str) -> tuple:
    return (
        ["isotropic", "hinton", "shortcut", "mean-only", "aligned", "aligned+hinton"].index(
            method.split("[")[0]
        ),
        method,
    )


def _plot(summary, cfg, methods, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(cfg["students"]), figsize=(6 * len(cfg["students"]), 4.5))
    for ax, sw in zip(np.atleast_1d(axes), cfg["students"], strict=True):
        for i, method in enumerate(m for m in methods if m != "isotropic"):
            rows = [summary.get(f"{_label(sw)} n={n} {method}") for n in cfg["sizes"]]
            ns = [n * (1 + 0.03 * (i - 3)) for n, r in zip(cfg["sizes"], rows, strict=True) if r]
            rows = [r for r in rows if r]
            if not rows:
                continue
            d = np.array([r["nll"]["diff"] for r in rows])
            err = np.array([[r["nll"]["diff"] - r["nll"]["lo"] for r in rows],
                            [r["nll"]["hi"] - r["nll"]["diff"] for r in rows]])  # fmt: skip
            ax.errorbar(ns, d, yerr=err, marker="o", capsize=3, label=method)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training images n")
        ax.set_ylabel("test NLL − isotropic (95 % CI)")
        ax.set_title(f"student {sw if isinstance(sw, str) else tuple(sw)}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="teacher B, 2 seeds, n = 50, short")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--url", default=None, help="a running service (else an embedded one)")
    ap.add_argument("--seeds", type=int, default=None, help="how many seeds (10; 2 quick)")
    args = ap.parse_args(argv)
    cfg = config(args.quick, args.seeds)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        with contextlib.nullcontext(args.url) if args.url else local_service(tmp / "data") as url:
            results = run(url, cfg, tmp)
    write(results, args.out)
    return results


if __name__ == "__main__":
    main()
