"""Does the installed numpy's OpenBLAS still corrupt the heap with its SkylakeX kernels?
(``planner/_openblas.py`` keeps its workaround while it does.)

``python -m bench.openblas_check [--n N]`` runs, in child processes with the kernels
OpenBLAS would choose by itself (``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE``
unset, numpy imported before planner) and with ``Haswell``, two threads each: a
``U @ U.T`` of a (n × 200) ``U`` and the Cholesky factorisation of ``U Uᵀ + I``.
It prints how each child ended: ``ok``, a wrong answer (a positive definite matrix
refused), or the signal that killed it.  On a machine without AVX-512 both runs use
the same kernels and say so.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

CHILD = """
import sys
import numpy as np
import scipy.linalg as sla
from threadpoolctl import threadpool_info, threadpool_limits
arch = {i.get("architecture") for i in threadpool_info() if i["internal_api"] == "openblas"}
print("kernels", sorted(a for a in arch if a), flush=True)
n = int(sys.argv[1])
U = np.random.default_rng(0).standard_normal((n, 200))
with threadpool_limits(2):
    S = U @ U.T
    S[np.diag_indices(n)] += 1.0
    try:
        sla.cholesky(S, lower=True, check_finite=False, overwrite_a=True)
    except np.linalg.LinAlgError as exc:
        print("wrong answer:", exc, flush=True)
        sys.exit(3)
print("ok", flush=True)
"""


def run(n: int, coretype: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS_")}
    if coretype:
        env["OPENBLAS_CORETYPE"] = coretype
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n)], env=env, capture_output=True, text=True
    )
    said = " ".join(out.stdout.split())
    if out.returncode < 0:
        return f"{said}; killed by {signal.Signals(-out.returncode).name}"
    return f"{said}; exit {out.returncode}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20_300)
    args = ap.parse_args(argv)
    for name, coretype in (("own choice", None), ("Haswell", "Haswell")):
        print(f"{name}: {run(args.n, coretype)}", flush=True)


if __name__ == "__main__":
    main()
