"""Named, ordered schema migrations, recorded in `audit_migrations` and applied when a store opens.

Each migration is frozen once released: never edit one, append a new one. They are plain SQL
(not `create_all`) so that a database written by any earlier version upgrades the same way.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    name: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_create_audit_logs",
        (
            """
            CREATE TABLE audit_logs (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                request_id VARCHAR NOT NULL,
                timestamp VARCHAR NOT NULL,
                model VARCHAR,
                backend_type VARCHAR NOT NULL DEFAULT 'local',
                endpoint VARCHAR NOT NULL,
                status VARCHAR NOT NULL,
                http_status INTEGER,
                duration_ms FLOAT NOT NULL,
                time_to_first_token_ms FLOAT,
                prompt_tokens INTEGER NOT NULL DEFAULT 0,
                completion_tokens INTEGER NOT NULL DEFAULT 0,
                total_tokens INTEGER NOT NULL DEFAULT 0,
                error_type VARCHAR
            )
            """,
        ),
    ),
    Migration(
        "0002_audit_logs_indexes",
        (
            "CREATE INDEX ix_audit_logs_timestamp ON audit_logs (timestamp)",
            "CREATE INDEX ix_audit_logs_model ON audit_logs (model, timestamp)",
            "CREATE INDEX ix_audit_logs_backend_type ON audit_logs (backend_type, timestamp)",
            "CREATE INDEX ix_audit_logs_status ON audit_logs (status, timestamp)",
            "CREATE INDEX ix_audit_logs_request_id ON audit_logs (request_id)",
        ),
    ),
    Migration(
        "0003_audit_logs_api_key",
        (
            # The NAME of the API key that made the request (never the key or its hash); NULL
            # when no key was configured or none matched. Older rows keep NULL.
            "ALTER TABLE audit_logs ADD COLUMN api_key VARCHAR",
            "CREATE INDEX ix_audit_logs_api_key ON audit_logs (api_key, timestamp)",
        ),
    ),
    Migration(
        "0004_audit_rollup",
        (
            # One row per closed UTC day and (model, endpoint, status, backend, key): what
            # `audit stats` needs of that day's requests, so a month is ~30 x groups rows instead
            # of every request. `durations` holds every request's duration, in whole
            # microseconds, sorted (little-endian int64s): percentiles stay exact.
            # A cache the daemon's writer fills (see rollup.py); writing or deleting requests
            # drops their days' rows here, and a day without rows here is read from audit_logs,
            # so the rollup is never needed for a right answer. (Triggers would keep it right
            # by themselves but made every insert three times slower.)
            """
            CREATE TABLE audit_rollup (
                day VARCHAR NOT NULL,
                model VARCHAR,
                endpoint VARCHAR NOT NULL,
                status VARCHAR NOT NULL,
                backend_type VARCHAR NOT NULL,
                api_key VARCHAR,
                requests INTEGER NOT NULL,
                ttft_count INTEGER NOT NULL,
                ttft_ms FLOAT,
                prompt_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                producing_ms FLOAT,
                durations BLOB NOT NULL
            )
            """,
            "CREATE INDEX ix_audit_rollup_day ON audit_rollup (day)",
        ),
    ),
    Migration(
        "0005_audit_logs_generation_facts",
        (
            # What a generation did, as counts and flags only (never the text, the tools or the
            # schema): tokens restored from the prompt cache, thinking tokens, tools offered and
            # calls made, structured output. Older rows keep NULL (unknown).
            "ALTER TABLE audit_logs ADD COLUMN cached_tokens INTEGER",
            "ALTER TABLE audit_logs ADD COLUMN reasoning_tokens INTEGER",
            "ALTER TABLE audit_logs ADD COLUMN tools_offered BOOLEAN",
            "ALTER TABLE audit_logs ADD COLUMN tool_calls INTEGER",
            "ALTER TABLE audit_logs ADD COLUMN constrained BOOLEAN",
        ),
    ),
    Migration(
        "0006_audit_logs_backend",
        (
            # Routing: the backend that served a request, by name, and the token counts the
            # upstream reported. Every older row was served by the local engine.
            "ALTER TABLE audit_logs ADD COLUMN backend VARCHAR NOT NULL DEFAULT 'local'",
            "ALTER TABLE audit_logs ADD COLUMN upstream_prompt_tokens INTEGER",
            "ALTER TABLE audit_logs ADD COLUMN upstream_completion_tokens INTEGER",
            "CREATE INDEX ix_audit_logs_backend ON audit_logs (backend, timestamp)",
            # `audit stats --by backend` groups by name: the rollup is per backend too (the
            # writer rebuilds it from the requests).
            "ALTER TABLE audit_rollup ADD COLUMN backend VARCHAR NOT NULL DEFAULT 'local'",
            "DELETE FROM audit_rollup",
        ),
    ),
    Migration(
        "0007_audit_minutes",
        (
            # The dashboard's figures per closed UTC minute (see minutes.py): one row per minute and
            # (model, key, error type) of the API requests, their durations and times to first
            # token as comma-separated whole microseconds, so a day's charts read ~1,440 x groups
            # rows instead of every request. A cache the daemon's writer fills for the last day;
            # `audit_minutes_done` says which minutes it holds, with the count and last id of all
            # their rows when rolled up: a minute whose rows changed since is read from audit_logs.
            """
            CREATE TABLE audit_minutes (
                minute VARCHAR NOT NULL,
                model VARCHAR,
                api_key VARCHAR,
                error_type VARCHAR,
                requests INTEGER NOT NULL,
                errors INTEGER NOT NULL,
                timeouts INTEGER NOT NULL,
                cancelled INTEGER NOT NULL,
                prompt_tokens INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                producing_ms FLOAT,
                durations VARCHAR NOT NULL,
                ttfts VARCHAR
            )
            """,
            "CREATE INDEX ix_audit_minutes_minute ON audit_minutes (minute)",
            """
            CREATE TABLE audit_minutes_done (
                minute VARCHAR PRIMARY KEY,
                rows INTEGER NOT NULL,
                last_id INTEGER NOT NULL
            ) WITHOUT ROWID
            """,
        ),
    ),
)

MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS audit_migrations (
    name VARCHAR PRIMARY KEY,
    applied_at VARCHAR NOT NULL
)
"""
