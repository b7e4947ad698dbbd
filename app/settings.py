"""Every setting of the service, from ``PLANNER_*`` environment variables."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Configuration of one service replica (docs/service.md, docs/scaling.md).

    With nothing set, the service is embedded: metadata in SQLite and arrays in
    a folder, both in ``./data``, a process pool as large as the machine, no
    authentication.  Scaled out, ``database_url``, ``storage_url`` and
    ``executor=dask`` (with ``dask_scheduler``) point every replica and worker
    at the same PostgreSQL, S3 bucket and scheduler.
    """

    model_config = SettingsConfigDict(env_prefix="PLANNER_", frozen=True, populate_by_name=True)

    data_dir: Path = Field(Path("./data"), description="where the embedded store keeps its data")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the metadata database: SQLite in data_dir by default, "
        "postgresql+psycopg://user@host:5432/db scaled out",
    )
    storage_url: str | None = Field(
        None,
        description="fsspec URL of the arrays: a folder in data_dir by default, "
        "s3://bucket/prefix scaled out (endpoint and keys from the AWS_* variables)",
    )
    scratch_dir: Path | None = Field(
        None, description="a process's local scratch space (default: data_dir/scratch)"
    )
    cache_bytes: int = Field(
        16 * 2**30,
        ge=0,
        description="most bytes of remote (S3) arrays a process keeps local copies of",
    )
    api_keys: str = Field(
        "", description="comma-separated bearer keys; empty turns authentication off"
    )
    metrics_key: str = Field(
        "",
        description="with API keys on, the bearer key that may read /metrics (its counts "
        "are summed over tenants, so no tenant's key reads them); empty: /metrics is closed",
    )
    max_upload_bytes: int = Field(16 * 2**30, description="largest teacher upload (bytes)")
    max_json_bytes: int = Field(4 * 2**20, description="largest JSON request body (bytes)")
    max_form_bytes: int = Field(
        1 * 2**20, description="most bytes of an upload's non-file form fields, all together"
    )
    max_parts: int = Field(64, ge=1, description="most parts of one multipart upload")
    max_gradient_examples: int = Field(
        100_000, ge=1, description="most rows (examples) of an uploaded gradients array"
    )
    body_timeout: float = Field(
        30.0,
        gt=0,
        description="most seconds a client may leave between two chunks of a request body "
        "(408 beyond); headers are bounded by PLANNER_HEADER_TIMEOUT (docs/limits.md)",
    )
    header_timeout: float = Field(
        10.0, gt=0, description="most seconds a request's line and headers may take to arrive"
    )
    max_client_connections: int = Field(
        128, ge=1, description="most connections one client address may hold at once"
    )
    max_connections: int = Field(
        1000, ge=1, description="most requests served at once by one replica (503 beyond)"
    )
    max_params: int = Field(
        4_000_000_000 // 8, description="most parameters a teacher may have (any format)"
    )
    max_dense_params: int = Field(
        30_000, description="most parameters of a teacher with a dense (p × p) matrix"
    )
    max_sequence_steps: int = Field(
        100_000, description="most structure-level steps one sequences answer may list"
    )
    max_count_states: int = Field(
        50_000,
        description="most lattice states one sequences answer may visit to count the "
        "sequences exactly (about a second); beyond, `count` is null and `count_note` says why",
    )
    plan_seconds: float = Field(
        120.0,
        gt=0,
        description="wall-clock safety net of one plan search: the search stops there and "
        "answers with the best plan found, marked as cut (search.cut)",
    )
    job_memory: int = Field(
        default_factory=lambda: _default_job_memory(),
        validation_alias=AliasChoices("PLANNER_JOB_MEMORY", "PLANNER_MAX_JOB_BYTES", "job_memory"),
        gt=0,
        description="most working memory one job (upload, plan, prior) may hold: a prior "
        "estimated above it is refused (413), a plan search degrades within half of it, and "
        "each process-pool worker runs under it as an OS limit (RLIMIT_DATA), so a job that "
        "still exceeds it fails alone (default: 80 % of memory, shared by the workers)",
    )
    plan_job_seconds: float = Field(
        3000.0,
        gt=0,
        description="deadline of a plan search run as a job (Prefer: respond-async); keep it "
        "under PLANNER_JOB_SECONDS - PLANNER_JOB_GRACE",
    )
    job_seconds: float = Field(
        3600.0,
        gt=0,
        description="hard wall-clock limit of one upload validation or prior computation in a "
        "process-pool worker: past it the worker is killed and replaced",
    )
    job_grace: float = Field(
        15.0,
        ge=0,
        description="a plan's worker is killed this long after the plan's own deadline "
        "(the search stops by itself at the deadline; this only catches a stuck step)",
    )
    max_attempts: int = Field(
        3, ge=1, description="claims of a prior whose workers died before it is marked failed"
    )
    max_plan_ops: int = Field(
        100_000,
        ge=1,
        description="most operations one plan may have, given or searched (413 beyond)",
    )
    device: Literal["cpu", "cuda"] | None = Field(
        None,
        description="where the dense formats' kernels run: unset, numpy; cpu or cuda, torch "
        "there in float64 (the gpu extra). A Dask worker's own PLANNER_DEVICE overrides it, "
        "so workers with a GPU run the dense jobs on it",
    )
    executor: Literal["process", "thread", "dask"] = Field(
        "process", description="what computes plans, uploads and priors off the event loop"
    )
    workers: int = Field(
        default_factory=lambda: len(os.sched_getaffinity(0)) or 1,
        ge=1,
        description="processes of the embedded executor (default: the cores this process may use)",
    )
    dask_scheduler: str | None = Field(None, description="tcp://host:8786 for executor=dask")
    lease_seconds: float = Field(
        30.0, gt=0, description="a job's claim holds this long without a renewal"
    )
    resubmit_seconds: float = Field(
        300.0, gt=0, description="a queued prior submitted this long ago is submitted again"
    )
    reap_seconds: float = Field(5.0, gt=0, description="how often a replica looks for lost jobs")
    sweep_seconds: float = Field(600.0, gt=0, description="how often storage is swept")
    sweep_grace: float = Field(
        3600.0, gt=0, description="objects no row owns are swept once this old (seconds)"
    )

    @cached_property
    def keys(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())

    @cached_property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'planner.sqlite3').resolve()}"

    @cached_property
    def storage(self) -> str:
        if self.storage_url:
            return self.storage_url
        return (self.data_dir / "arrays").resolve().as_uri()

    @cached_property
    def scratch(self) -> Path:
        return (self.scratch_dir or self.data_dir / "scratch").resolve()

    @cached_property
    def config(self):
        """What jobs need to reach this service's state (``app.compute.Config``)."""
        from .compute import Config

        return Config(
            self.database,
            self.storage,
            str(self.scratch),
            self.lease_seconds,
            self.cache_bytes,
            self.device,
        )


def _default_job_memory() -> int:
    """80 % of the machine's memory, shared by the process-pool workers that may run side
    by side (``PLANNER_WORKERS``, by default one per core)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    workers = int(os.environ.get("PLANNER_WORKERS") or len(os.sched_getaffinity(0)) or 1)
    return int(0.8 * total / max(workers, 1))
