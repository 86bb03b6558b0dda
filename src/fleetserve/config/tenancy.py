"""The `tenancy` settings group: keys, shared counters, the database and the ledger.

Environment: FLEETSERVE_AUTH, FLEETSERVE_DATABASE_URL, FLEETSERVE_REDIS_URL,
FLEETSERVE_KEY_PEPPER (these four are the names users set most, so they have top-level
aliases) and FLEETSERVE_TENANCY__<FIELD> for the rest.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

AuthMode = Literal["none", "keys"]
RedisFailure = Literal["fail_closed", "local"]


class PriceSpec(BaseModel):
    """A model's internal chargeback rate (fleet file: `pricing:` under a model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok_usd: float = Field(0.0, ge=0, description="USD per million input tokens")
    output_per_mtok_usd: float = Field(0.0, ge=0, description="USD per million output tokens")


class TenancySettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    auth: AuthMode | None = Field(
        None,
        description="none: /v1 is open; keys: /v1 needs `Authorization: Bearer fs-...` "
        "(None: keys on a non-loopback address, none on loopback)",
    )
    database_url: SecretStr | None = Field(
        None,
        description="SQLAlchemy URL of the tenant store and usage ledger, e.g. "
        "postgresql+asyncpg://user@host/db (None: SQLite at <state dir>/fleetserve.db)",
    )
    redis_url: SecretStr | None = Field(
        None,
        description="Redis for limits shared by every worker and gateway replica "
        "(None: limits are exact within one gateway process)",
    )
    redis_prefix: str = Field(
        "fleetserve",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9:_.-]+$",
        description="namespace of fleetserve's keys in Redis (several fleets can share one)",
    )
    redis_failure: RedisFailure = Field(
        "fail_closed",
        description="when Redis is unreachable: fail_closed answers 503; local enforces "
        "each limit divided by gateway_processes in each process",
    )
    gateway_processes: int | None = Field(
        None,
        ge=1,
        description="gateway processes sharing the limits (all replicas x workers), for the "
        "`local` fallback (None: this gateway's worker count)",
    )
    key_pepper: SecretStr | None = Field(
        None, description="HMAC pepper of stored keys (None: generated into the state dir)"
    )
    default_max_tokens: int = Field(
        4096,
        ge=1,
        description="output tokens reserved against TPM and budget when a request gives no "
        "max_tokens",
    )
    lease_ttl_s: float = Field(
        15.0, gt=0, description="a concurrency lease expires unless renewed within this"
    )
    key_cache_ttl_s: float = Field(
        0.5,
        gt=0,
        description="a looked-up key is trusted this long (revocations reach every replica "
        "within it; with Redis they are also pushed at once)",
    )
    metrics_top_tenants: int = Field(
        20, ge=1, description="tenants with their own metric labels; the rest are `other`"
    )
    ledger_batch_s: float = Field(0.25, gt=0, description="the ledger writes at least this often")
    ledger_batch_rows: int = Field(500, ge=1, description="... or when this many rows wait")
