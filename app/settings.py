"""Every setting of the service, from ``PLANNER_*`` environment variables."""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Configuration of one service instance (SPEC §9).

    With nothing set, data lives in ``./data`` (the embedded default store),
    there is no authentication, and priors are computed by a process pool as
    large as the machine.
    """

    model_config = SettingsConfigDict(env_prefix="PLANNER_", frozen=True)

    data_dir: Path = Field(Path("./data"), description="where the embedded store keeps its data")
    api_keys: str = Field(
        "", description="comma-separated bearer keys; empty turns authentication off"
    )
    max_upload_bytes: int = Field(16 * 2**30, description="largest teacher upload (bytes)")
    max_json_bytes: int = Field(4 * 2**20, description="largest JSON request body (bytes)")
    max_params: int = Field(
        4_000_000_000 // 8, description="most parameters a teacher may have (any format)"
    )
    max_dense_params: int = Field(
        30_000, description="most parameters of a teacher with a dense (p × p) matrix"
    )
    max_sequence_steps: int = Field(
        2_000_000, description="most structure-level steps one sequences answer may list"
    )
    plan_seconds: float = Field(
        120.0,
        gt=0,
        description="wall-clock safety net of one plan search: the search stops there and "
        "answers with the best plan found, marked as cut (search.cut)",
    )
    max_job_bytes: int = Field(
        default_factory=lambda: int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
        description="most working memory one prior computation may need (413 beyond)",
    )
    executor: Literal["process", "thread"] = Field(
        "process", description="what computes priors off the event loop"
    )
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)

    @cached_property
    def keys(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.api_keys.split(",") if k.strip())
