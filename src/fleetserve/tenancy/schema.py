"""The tenant store's tables, defined once (SQLAlchemy Core) for SQLite and PostgreSQL.

Alembic migrates a database to them (tenancy/migrations/); a test checks that the newest
migration and these definitions agree. Money is integer micro-dollars (BIGINT); times are
Unix seconds (double precision). Ledger columns are unbounded TEXT, so that no long model or
replica name can fail a batch of usage rows; tenant names are checked before they are
written (`model.valid_name`).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

# Constraint and index names fixed by convention, so that migrations can name them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

VERSION_TABLE = "fleetserve_alembic_version"
"""Alembic's bookkeeping table, named apart so that a database shared with another
Alembic-managed application keeps both histories."""

NAME_LEN = 63  # model.NAME_PATTERN
PREFIX_LEN = 8  # keys.PREFIX_LEN

metadata = MetaData(naming_convention=NAMING_CONVENTION)

tenants = Table(
    "tenants",
    metadata,
    Column("name", String(NAME_LEN), primary_key=True),
    Column("weight", Double, nullable=False),
    Column("priority", String(16), nullable=False),  # Priority's name: interactive, ...
    Column("models", Text, nullable=True),  # a JSON list of names; NULL: every model
    Column("rpm", Integer, nullable=True),
    Column("tpm", BigInteger, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("budget_micro_usd", BigInteger, nullable=True),  # NULL: no budget
    Column("budget_period", String(8), nullable=True),
    Column("budget_soft_alert_frac", Double, nullable=True),
    Column("created_at", Double, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("prefix", String(PREFIX_LEN), primary_key=True),
    Column(
        "tenant",
        String(NAME_LEN),
        ForeignKey("tenants.name", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("digest", String(64), nullable=False),  # HMAC-SHA256, hex; never the key itself
    Column("label", Text, nullable=True),
    Column("rpm", Integer, nullable=True),
    Column("tpm", BigInteger, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("created_at", Double, nullable=False),
    Column("expires_at", Double, nullable=True),
    Column("revoked_at", Double, nullable=True),
    Index(None, "tenant"),
)

usage = Table(
    "usage",
    metadata,
    Column("request_id", Text, primary_key=True),  # idempotent writes: ON CONFLICT DO NOTHING
    Column("tenant", Text, nullable=False),  # no foreign key: rows outlive their tenant
    Column("key_prefix", Text, nullable=True),
    Column("model", Text, nullable=False),
    Column("replica", Text, nullable=True),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("cost_micro_usd", BigInteger, nullable=False),
    Column("queue_s", Double, nullable=False),
    Column("ttft_s", Double, nullable=True),
    Column("e2e_s", Double, nullable=False),
    Column("started_at", Double, nullable=False),
    Column("ended_at", Double, nullable=False),
    Column("finish_reason", String(16), nullable=False),
    Column("usage_estimated", Boolean, nullable=False),
    Index(None, "tenant", "started_at"),
    Index(None, "started_at"),
)
