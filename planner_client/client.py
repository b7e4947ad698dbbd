"""``PlannerClient``: upload teachers, plan, wait for priors, download arrays."""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .errors import PlanFailed, PriorFailed, error_for

__all__ = ["PlannerClient", "structure"]

#: Downloads larger than this show a progress bar (when ``progress`` is on).
PROGRESS_BYTES = 32 * 2**20


def structure(
    widths: Sequence[int],
    activation: str | Sequence[str] | None = None,
    output_activation: str | None = None,
    bias: bool | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """A structure as the API takes it; unset fields are defaulted or inherited."""
    d: dict[str, Any] = {"widths": [int(w) for w in widths]}
    for k, v in (
        (
            "activation",
            activation if activation is None or isinstance(activation, str) else list(activation),
        ),
        ("output_activation", output_activation),
        ("bias", bias),
        ("kind", kind),
    ):
        if v is not None:
            d[k] = v
    return d


def _plan_body(student, criterion, seed, ops, effort, seconds, budget=None) -> dict[str, Any]:
    body: dict[str, Any] = {"criterion": criterion, "seed": seed, "effort": effort}
    if student is not None:
        body["student"] = _as_structure(student)
    if budget is not None:
        body["budget"] = dict(budget)
    if seconds is not None:
        body["seconds"] = seconds
    if ops is not None:
        body["ops"] = [dict(o) for o in ops]
    return body


def _as_structure(s: Mapping[str, Any] | Sequence[int]) -> dict[str, Any]:
    return dict(s) if isinstance(s, Mapping) else structure(s)


class PlannerClient:
    """A client of one alignment-planner service.

    Parameters
    ----------
    base_url : str
        E.g. ``http://planner:8000``.
    api_key : str, optional
        Sent as ``Authorization: Bearer``; defaults to ``$PLANNER_API_KEY``.
    retries : int
        Attempts after a connection error or a 503, with exponential backoff.
    transport : httpx.BaseTransport, optional
        For tests (``httpx.MockTransport``) or custom networking.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 300.0,
        retries: int = 4,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        api_key = api_key if api_key is not None else os.environ.get("PLANNER_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )
        self.retries, self.backoff = retries, backoff

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PlannerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------
    def _send(self, method: str, url: str, *, stream: bool = False, **kw) -> httpx.Response:
        """One request, retried on connection errors and on 503 with ``Retry-After``, with
        backoff."""
        # a POST is retried only when it cannot have reached the server
        retryable = (
            (httpx.TransportError,)
            if method in ("GET", "HEAD", "DELETE", "PUT")
            else (httpx.ConnectError, httpx.ConnectTimeout)
        )
        for attempt in range(self.retries + 1):
            try:
                req = self._http.build_request(method, url, **kw)
                resp = self._http.send(req, stream=stream)
            except retryable:
                if attempt == self.retries:
                    raise
                self._sleep(attempt)
                kw = self._rewind(kw)
                continue
            # a 503 that says when to retry (busy, a lost worker, the scheduler away); one
            # without Retry-After (a search past its deadline) would only fail again
            if resp.status_code == 503 and "retry-after" in resp.headers and attempt < self.retries:
                resp.close()
                self._sleep(attempt)
                kw = self._rewind(kw)
                continue
            if resp.status_code >= 400:
                if stream:
                    resp.read()
                raise error_for(resp.status_code, self._problem(resp))
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _sleep(self, attempt: int) -> None:
        time.sleep(self.backoff * 2**attempt)

    @staticmethod
    def _rewind(kw: dict) -> dict:
        for f in (kw.get("files") or {}).values():
            fh = f[1] if isinstance(f, tuple) else f
            if hasattr(fh, "seek"):
                fh.seek(0)
        return kw

    @staticmethod
    def _problem(resp: httpx.Response) -> dict[str, Any]:
        try:
            body = resp.json()
            return body if isinstance(body, dict) else {"detail": str(body)}
        except ValueError:
            return {"status": resp.status_code, "detail": resp.text[:500]}

    def _json(self, method: str, url: str, **kw) -> Any:
        resp = self._send(method, url, **kw)
        return None if resp.status_code == 204 else resp.json()

    # -- service -------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/healthz")

    # -- teachers --------------------------------------------------------------------------
    def upload_teacher(
        self,
        name: str,
        structure: Mapping[str, Any] | Sequence[int],
        format: str,
        arrays: Mapping[str, np.ndarray | str | os.PathLike] | None = None,
        *,
        archive: str | os.PathLike | None = None,
    ) -> dict:
        """Upload a teacher from arrays (in memory or ``.npy`` paths) or one archive.

        In-memory arrays are written to temporary ``.npy`` files first, so the
        upload streams from disk whatever the size.
        """
        if (arrays is None) == (archive is None):
            raise ValueError("give either arrays or archive")
        spec = {
            "name": name,
            "structure": _as_structure(structure),
            "posterior": {"format": format},
        }
        with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
            files: dict[str, tuple[str, Any, str]] = {}
            if archive is not None:
                fh = stack.enter_context(open(archive, "rb"))
                files["archive"] = (Path(archive).name, fh, "application/octet-stream")
            else:
                for key, value in arrays.items():
                    path = Path(value) if isinstance(value, str | os.PathLike) else None
                    if path is None:
                        path = Path(tmp) / f"{key}.npy"
                        np.save(path, np.ascontiguousarray(value), allow_pickle=False)
                    fh = stack.enter_context(open(path, "rb"))
                    files[key] = (f"{key}.npy", fh, "application/octet-stream")
            return self._json("POST", "/v1/teachers", data={"spec": json.dumps(spec)}, files=files)

    def teachers(self) -> list[dict]:
        return self._json("GET", "/v1/teachers")

    def teacher(self, teacher_id: str) -> dict:
        return self._json("GET", f"/v1/teachers/{teacher_id}")

    def delete_teacher(self, teacher_id: str) -> None:
        self._json("DELETE", f"/v1/teachers/{teacher_id}")

    # -- structures ------------------------------------------------------------------------
    def sequences(
        self,
        teacher: Mapping[str, Any] | Sequence[int],
        student: Mapping[str, Any] | Sequence[int],
        limit: int = 100,
    ) -> dict:
        body = {
            "teacher": _as_structure(teacher),
            "student": _as_structure(student),
            "limit": limit,
        }
        return self._json("POST", "/v1/structures/sequences", json=body)

    # -- plans -------------------------------------------------------------------------------
    def plan(
        self,
        teacher_id: str,
        student: Mapping[str, Any] | Sequence[int] | None,
        criterion: str = "posterior_ratio",
        seed: int = 0,
        ops: Sequence[Mapping[str, Any]] | None = None,
        *,
        effort: str = "fast",
        seconds: float | None = None,
        budget: Mapping[str, Any] | None = None,
    ) -> dict:
        """Search a plan (``effort``: ``fast``, the default, or ``thorough``; ``seconds``: a
        deadline), or validate and score ``ops``.  ``student`` may be ``None`` with
        ``budget`` (``{"keep": 0.5}`` or ``{"max_params": N}``, optional ``floors``): the
        planner then chooses the student within it."""
        body = _plan_body(student, criterion, seed, ops, effort, seconds, budget)
        return self._json("POST", f"/v1/teachers/{teacher_id}/plans", json=body)

    def submit_plan(
        self,
        teacher_id: str,
        student: Mapping[str, Any] | Sequence[int] | None,
        criterion: str = "posterior_ratio",
        seed: int = 0,
        ops: Sequence[Mapping[str, Any]] | None = None,
        *,
        effort: str = "fast",
        seconds: float | None = None,
        budget: Mapping[str, Any] | None = None,
    ) -> dict:
        """Ask for a plan as a job (``Prefer: respond-async``): the job at once, to poll with
        :meth:`wait_plan` (or cancel with :meth:`cancel_plan`); for long searches."""
        body = _plan_body(student, criterion, seed, ops, effort, seconds, budget)
        return self._json(
            "POST",
            f"/v1/teachers/{teacher_id}/plans",
            json=body,
            headers={"Prefer": "respond-async"},
        )

    def plan_job(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/plan-jobs/{job_id}")

    def wait_plan(self, job_id: str, timeout: float = 3600.0) -> dict:
        """Wait (long-polling) for a plan job; the plan once it is done, or
        :class:`PlanFailed` with the job's problem when it failed or was cancelled."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            job = self._json(
                "GET", f"/v1/plan-jobs/{job_id}", params={"wait": max(0.0, min(30.0, left))}
            )
            if job["status"] == "done":
                return self.get_plan(job["plan"])
            if job["status"] in ("failed", "cancelled"):
                problem = job["problem"] or {
                    "status": 409,
                    "detail": f"plan job {job_id} was cancelled",
                }
                raise PlanFailed(problem.get("status", 500), problem)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"plan job {job_id} still {job['status']} after {timeout} s")

    def cancel_plan(self, job_id: str) -> None:
        self._json("DELETE", f"/v1/plan-jobs/{job_id}")

    def get_plan(self, plan_id: str) -> dict:
        return self._json("GET", f"/v1/plans/{plan_id}")

    # -- priors ------------------------------------------------------------------------------
    def request_prior(self, plan_id: str) -> dict:
        return self._json("POST", f"/v1/plans/{plan_id}/prior")

    def prior(self, prior_id: str) -> dict:
        return self._json("GET", f"/v1/priors/{prior_id}")

    def wait_prior(self, prior_id: str, timeout: float = 3600.0) -> dict:
        """Wait (long-polling the service) until the prior is done (returned) or
        failed (:class:`PriorFailed`)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            p = self._json(
                "GET", f"/v1/priors/{prior_id}", params={"wait": max(0.0, min(30.0, left))}
            )
            if p["status"] == "done":
                return p
            if p["status"] == "failed":
                raise PriorFailed(p["problem"].get("status", 500), p["problem"] or {})
            if time.monotonic() >= deadline:
                raise TimeoutError(f"prior {prior_id} still {p['status']} after {timeout} s")

    def array(self, prior_id: str, name: str, dtype: str | None = None) -> np.ndarray:
        """One array of a done prior, in memory."""
        params = {"dtype": dtype} if dtype else None
        resp = self._send("GET", f"/v1/priors/{prior_id}/arrays/{name}", params=params)
        return np.load(io.BytesIO(resp.content), allow_pickle=False)

    def arrays(self, prior_id: str, dtype: str | None = None) -> dict[str, np.ndarray]:
        """Every array of a done prior, in memory."""
        return {n: self.array(prior_id, n, dtype) for n in self.prior(prior_id)["arrays"]}

    def align(
        self,
        teacher_id: str,
        student: Mapping[str, Any] | Sequence[int] | None,
        criterion: str = "posterior_ratio",
        seed: int = 0,
        timeout: float = 3600.0,
        *,
        budget: Mapping[str, Any] | None = None,
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """Plan, compute and fetch the aligned prior: (plan, arrays).  ``student`` is any
        structure JSON (widths, or a network's ``input`` and ``stages``, e.g. from
        ``planner_client.torch.structure_of``), or ``None`` with a ``budget``."""
        plan = self.plan(teacher_id, student, criterion, seed, budget=budget)
        prior = self.wait_prior(self.request_prior(plan["id"])["id"], timeout)
        return plan, self.arrays(prior["id"])

    def download(
        self,
        prior_id: str,
        path: str | os.PathLike,
        name: str | None = None,
        *,
        format: str = "npz",
        dtype: str | None = None,
        progress: bool = True,
    ) -> Path:
        """Download one array (``name``) or the archive to ``path``, resuming a partial
        file with HTTP Range; a tqdm bar shows large transfers."""
        path = Path(path)
        if name is None:
            url, params = f"/v1/priors/{prior_id}/archive", {"format": format}
        else:
            url, params = f"/v1/priors/{prior_id}/arrays/{name}", {"dtype": dtype} if dtype else {}
        part = path.with_name(path.name + ".part")
        for attempt in range(self.retries + 1):
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                resp = self._send("GET", url, params=params, headers=headers, stream=True)
                self._save(resp, part, have, progress)
                break
            except (httpx.TransportError, OSError):
                if attempt == self.retries:
                    raise
                self._sleep(attempt)
        part.replace(path)
        return path

    @staticmethod
    def _save(resp: httpx.Response, part: Path, have: int, progress: bool) -> None:
        from tqdm import tqdm

        try:
            if resp.status_code == 200:
                have = 0  # the server sent it whole
            total = have + int(resp.headers.get("content-length", 0))
            bar = tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=part.stem,
                disable=not progress or total < PROGRESS_BYTES,
            )
            with open(part, "ab" if have else "wb") as f, bar:
                for chunk in resp.iter_bytes(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        finally:
            resp.close()
