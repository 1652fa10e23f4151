"""Platform settings (pydantic-settings), built once at start-up and passed down; never read at import time."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the platform, with the documented defaults."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", populate_by_name=True)

    # --- infrastructure (unset → embedded servers under data_dir)
    nats_url: str | None = Field(default=None, validation_alias=AliasChoices("KNEO_NATS_URL"))
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("KNEO_DATABASE_URL", "KNEO_SERV_DATABASE_URL")
    )
    database_schema: str = Field(default="public", validation_alias=AliasChoices("KNEO_DATABASE_SCHEMA"))
    data_dir: Path = Field(default=Path(".kneo"), validation_alias=AliasChoices("KNEO_DATA_DIR"))
    embedded_nats_port: int = Field(default=4250, validation_alias=AliasChoices("KNEO_EMBEDDED_NATS_PORT"))
    embedded_pg_port: int = Field(default=5450, validation_alias=AliasChoices("KNEO_EMBEDDED_PG_PORT"))
    db_pool_size: int = Field(default=10, validation_alias=AliasChoices("KNEO_DB_POOL_SIZE"))
    stream_replicas: int = Field(default=1, ge=1, le=5, validation_alias=AliasChoices("KNEO_STREAM_REPLICAS"))
    nats_connect_timeout_seconds: float = Field(
        default=10.0, validation_alias=AliasChoices("KNEO_NATS_CONNECT_TIMEOUT_SECONDS")
    )
    # Names the JetStream streams/consumers so several platforms (e.g. tests) can share one NATS server.
    bus_prefix: str = Field(default="", validation_alias=AliasChoices("KNEO_BUS_PREFIX"))

    # --- bus and durability
    command_max_deliveries: int = Field(default=5, validation_alias=AliasChoices("KNEO_COMMAND_MAX_DELIVERIES"))
    command_retry_backoff_seconds: float = Field(
        default=0.5, validation_alias=AliasChoices("KNEO_COMMAND_RETRY_BACKOFF_SECONDS")
    )
    command_ack_wait_seconds: float = Field(
        default=30.0, validation_alias=AliasChoices("KNEO_COMMAND_ACK_WAIT_SECONDS")
    )
    shutdown_grace_seconds: float = Field(default=10.0, validation_alias=AliasChoices("KNEO_SHUTDOWN_GRACE_SECONDS"))
    consumer_batch: int = Field(default=64, validation_alias=AliasChoices("KNEO_CONSUMER_BATCH"))
    consumer_concurrency: int = Field(default=64, validation_alias=AliasChoices("KNEO_CONSUMER_CONCURRENCY"))
    relay_grace_seconds: float = Field(default=10.0, validation_alias=AliasChoices("KNEO_RELAY_GRACE_SECONDS"))
    relay_interval_seconds: float = Field(default=1.0, validation_alias=AliasChoices("KNEO_RELAY_INTERVAL_SECONDS"))
    reconcile_after_seconds: float = Field(default=30.0, validation_alias=AliasChoices("KNEO_RECONCILE_AFTER_SECONDS"))
    reconcile_interval_seconds: float = Field(
        default=5.0, validation_alias=AliasChoices("KNEO_RECONCILE_INTERVAL_SECONDS")
    )
    events_max_age_days: float = Field(default=7.0, validation_alias=AliasChoices("KNEO_EVENTS_MAX_AGE_DAYS"))
    output_max_age_seconds: float = Field(default=300.0, validation_alias=AliasChoices("KNEO_OUTPUT_MAX_AGE_SECONDS"))

    # --- gateway
    host: str = Field(default="127.0.0.1", validation_alias=AliasChoices("KNEO_HOST"))
    port: int = Field(default=8000, validation_alias=AliasChoices("KNEO_PORT"))
    rpc_timeout_seconds: float = Field(
        default=15.0, gt=0, validation_alias=AliasChoices("KNEO_SERV_RPC_TIMEOUT_SECONDS")
    )
    sync_wait_seconds: float = Field(default=30.0, validation_alias=AliasChoices("KNEO_SERV_SYNC_WAIT_SECONDS"))
    sse_heartbeat_seconds: float = Field(default=15.0, validation_alias=AliasChoices("KNEO_SERV_SSE_HEARTBEAT_SECONDS"))
    sse_client_buffer: int = Field(default=1000, validation_alias=AliasChoices("KNEO_SERV_SSE_CLIENT_BUFFER"))
    spec_root: Path | None = Field(default=None, validation_alias=AliasChoices("KNEO_SERV_SPEC_ROOT"))
    max_body_bytes: int = Field(default=1_048_576, validation_alias=AliasChoices("KNEO_SERV_MAX_BODY_BYTES"))
    max_input_chars: int = Field(default=20_000, validation_alias=AliasChoices("KNEO_SERV_MAX_INPUT_CHARS"))
    max_human_content_chars: int = Field(
        default=20_000, validation_alias=AliasChoices("KNEO_SERV_MAX_HUMAN_CONTENT_CHARS")
    )
    max_inline_spec_bytes: int = Field(
        default=262_144, validation_alias=AliasChoices("KNEO_SERV_MAX_INLINE_SPEC_BYTES")
    )
    max_overrides_bytes: int = Field(default=65_536, validation_alias=AliasChoices("KNEO_SERV_MAX_OVERRIDES_BYTES"))
    max_metadata_bytes: int = Field(default=32_768, validation_alias=AliasChoices("KNEO_SERV_MAX_METADATA_BYTES"))
    max_list_items: int = Field(default=100, validation_alias=AliasChoices("KNEO_SERV_MAX_LIST_ITEMS"))
    max_path_chars: int = Field(default=4096, validation_alias=AliasChoices("KNEO_SERV_MAX_PATH_CHARS"))
    request_logs: bool = Field(default=True, validation_alias=AliasChoices("KNEO_SERV_REQUEST_LOGS"))
    auth_enabled: bool = Field(default=False, validation_alias=AliasChoices("KNEO_SERV_AUTH_ENABLED"))
    api_keys: SecretStr = Field(default=SecretStr(""), validation_alias=AliasChoices("KNEO_SERV_API_KEYS"))
    admin_api_key: SecretStr | None = Field(default=None, validation_alias=AliasChoices("KNEO_SERV_ADMIN_API_KEY"))
    idempotency_window_seconds: float = Field(
        default=86_400.0, gt=0, validation_alias=AliasChoices("KNEO_SERV_IDEMPOTENCY_WINDOW_SECONDS")
    )
    rate_limit: str | None = Field(default=None, validation_alias=AliasChoices("KNEO_SERV_RATE_LIMIT"))
    rate_limits: str = Field(default="", validation_alias=AliasChoices("KNEO_SERV_RATE_LIMITS"))
    health_providers: str = Field(default="", validation_alias=AliasChoices("KNEO_SERV_HEALTH_PROVIDERS"))
    health_mcp_secrets: str = Field(default="", validation_alias=AliasChoices("KNEO_SERV_HEALTH_MCP_SECRETS"))
    log_level: str = Field(default="INFO", validation_alias=AliasChoices("KNEO_SERV_LOG_LEVEL"))

    # --- checkpoint views (the seed's checkpoint payload limits)
    checkpoint_compress_bytes: int = Field(
        default=65_536, validation_alias=AliasChoices("KNEO_SERV_CHECKPOINT_COMPRESS_BYTES")
    )
    checkpoint_max_bytes: int = Field(
        default=1_048_576, validation_alias=AliasChoices("KNEO_SERV_CHECKPOINT_MAX_BYTES")
    )
    checkpoint_preview_chars: int = Field(
        default=1200, validation_alias=AliasChoices("KNEO_SERV_CHECKPOINT_PREVIEW_CHARS")
    )
    checkpoint_max_list_items: int = Field(
        default=20, validation_alias=AliasChoices("KNEO_SERV_CHECKPOINT_MAX_LIST_ITEMS")
    )
    checkpoint_max_dict_items: int = Field(
        default=50, validation_alias=AliasChoices("KNEO_SERV_CHECKPOINT_MAX_DICT_ITEMS")
    )

    # --- human service
    human_timer_interval_seconds: float = Field(
        default=1.0, gt=0, validation_alias=AliasChoices("KNEO_HUMAN_TIMER_INTERVAL_SECONDS")
    )

    # --- audit service: a pass on every audited event it hears of, and at least this often
    audit_poll_interval_seconds: float = Field(
        default=1.0, gt=0, validation_alias=AliasChoices("KNEO_AUDIT_POLL_INTERVAL_SECONDS")
    )

    # --- webhooks (docs/webhooks.md)
    # None = follow the deployment: on for the embedded local platform (no server URLs set), off otherwise.
    webhooks_allow_private: bool | None = Field(
        default=None, validation_alias=AliasChoices("KNEO_WEBHOOKS_ALLOW_PRIVATE")
    )
    # base64 or hex of 32 bytes; several comma-separated: the first seals, all open (rotation). Unset: a key file
    # generated once under the data dir (<data_dir>/webhooks.key, mode 0600).
    webhooks_secret_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("KNEO_WEBHOOKS_SECRET_KEY")
    )
    webhooks_max_attempts: int = Field(
        default=10, ge=1, le=100, validation_alias=AliasChoices("KNEO_WEBHOOKS_MAX_ATTEMPTS")
    )
    webhooks_backoff_base_seconds: float = Field(
        default=5.0, gt=0, validation_alias=AliasChoices("KNEO_WEBHOOKS_BACKOFF_BASE_SECONDS")
    )
    webhooks_backoff_max_seconds: float = Field(
        default=3600.0, gt=0, validation_alias=AliasChoices("KNEO_WEBHOOKS_BACKOFF_MAX_SECONDS")
    )
    webhooks_timeout_seconds: float = Field(
        default=10.0, gt=0, le=300, validation_alias=AliasChoices("KNEO_WEBHOOKS_TIMEOUT_SECONDS")
    )
    webhooks_poll_interval_seconds: float = Field(
        default=1.0, gt=0, validation_alias=AliasChoices("KNEO_WEBHOOKS_POLL_INTERVAL_SECONDS")
    )
    webhooks_concurrency: int = Field(
        default=16, ge=1, le=256, validation_alias=AliasChoices("KNEO_WEBHOOKS_CONCURRENCY")
    )

    # --- Knap face: the smart cache of identical tool calls within a chat
    knap_cache_ttl_seconds: float = Field(
        default=600.0, ge=0, validation_alias=AliasChoices("KNEO_KNAP_CACHE_TTL_SECONDS")
    )
    # the model of Knap runs (the dummy provider unless configured), as a spec's model block
    knap_provider: str = Field(default="dummy", validation_alias=AliasChoices("KNEO_KNAP_PROVIDER"))
    knap_model: str = Field(default="dummy-knap", validation_alias=AliasChoices("KNEO_KNAP_MODEL"))
    knap_model_params: str = Field(default="{}", validation_alias=AliasChoices("KNEO_KNAP_MODEL_PARAMS"))  # JSON
    # the built-in connectors' data, on the runner's disk (relative paths: to the spec root)
    knap_gmail_mailbox: str = Field(
        default="examples/knap/mail.mbox", validation_alias=AliasChoices("KNEO_KNAP_GMAIL_MAILBOX")
    )
    knap_calendar_path: str = Field(
        default="examples/knap/calendar.ics", validation_alias=AliasChoices("KNEO_KNAP_CALENDAR_PATH")
    )
    # more connectors (tool_type -> tool entries / MCP servers), a YAML file
    knap_connectors_path: Path | None = Field(default=None, validation_alias=AliasChoices("KNEO_KNAP_CONNECTORS_PATH"))
    knap_max_messages: int = Field(default=100, ge=1, validation_alias=AliasChoices("KNEO_KNAP_MAX_MESSAGES"))
    knap_max_tool_types: int = Field(default=20, ge=1, validation_alias=AliasChoices("KNEO_KNAP_MAX_TOOL_TYPES"))

    # --- Jobs face (docs/jobs.md): sandboxes, retention, model names, artifact bounds
    sandbox_root: Path | None = Field(
        default=None, validation_alias=AliasChoices("KNEO_SANDBOX_ROOT")
    )  # None: <data_dir>/sandboxes (see sandbox_dir)
    sandbox_retention_days: float = Field(
        default=30.0, gt=0, validation_alias=AliasChoices("KNEO_SANDBOX_RETENTION_DAYS")
    )
    sandbox_sweep_interval_seconds: float = Field(
        default=300.0, gt=0, validation_alias=AliasChoices("KNEO_SANDBOX_SWEEP_INTERVAL_SECONDS")
    )
    # JSON object: job model name -> "provider:model" or {"provider", "name", "params"}; merged over the defaults
    jobs_model_map: str = Field(default="", validation_alias=AliasChoices("KNEO_JOBS_MODEL_MAP"))
    jobs_artifact_max_bytes: int = Field(
        default=1_048_576, gt=0, validation_alias=AliasChoices("KNEO_JOBS_ARTIFACT_MAX_BYTES")
    )
    jobs_artifacts_max_total_bytes: int = Field(
        default=8_388_608, gt=0, validation_alias=AliasChoices("KNEO_JOBS_ARTIFACTS_MAX_TOTAL_BYTES")
    )

    # --- runner
    function_packages: str = Field(default="examples", validation_alias=AliasChoices("KNEO_SERV_FUNCTION_PACKAGES"))
    step_timeout_seconds: float = Field(
        default=900.0, gt=0, validation_alias=AliasChoices("KNEO_SERV_STEP_TIMEOUT_SECONDS")
    )
    runner_name: str | None = Field(default=None, validation_alias=AliasChoices("KNEO_RUNNER_NAME"))
    provider_retries: int = Field(default=0, validation_alias=AliasChoices("KNEO_SERV_PROVIDER_RETRIES"))
    provider_retry_backoff_seconds: float = Field(
        default=0.25, validation_alias=AliasChoices("KNEO_SERV_PROVIDER_RETRY_BACKOFF_SECONDS")
    )
    provider_timeout_seconds: float | None = Field(
        default=None, validation_alias=AliasChoices("KNEO_SERV_PROVIDER_TIMEOUT_SECONDS")
    )

    # --- agent tools (services/runner/kneo_runner/tools.py; docs/tools.md)
    tool_timeout_seconds: float = Field(
        default=60.0, gt=0, validation_alias=AliasChoices("KNEO_SERV_TOOL_TIMEOUT_SECONDS")
    )
    mcp_retries: int = Field(default=0, ge=0, le=20, validation_alias=AliasChoices("KNEO_SERV_MCP_RETRIES"))
    mcp_retry_backoff_seconds: float = Field(
        default=0.25, ge=0, validation_alias=AliasChoices("KNEO_SERV_MCP_RETRY_BACKOFF_SECONDS")
    )
    mcp_timeout_seconds: float | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("KNEO_SERV_MCP_TIMEOUT_SECONDS")
    )
    require_provider_secrets: bool = Field(
        default=False, validation_alias=AliasChoices("KNEO_SERV_REQUIRE_PROVIDER_SECRETS")
    )
    tool_result_preview_chars: int = Field(
        default=1000, ge=0, validation_alias=AliasChoices("KNEO_SERV_TOOL_RESULT_PREVIEW_CHARS")
    )

    # --- workspaces (Jobs face, docs/workspaces.md): uploaded .tar.gz trees that jobs mount
    workspace_root: Path | None = Field(
        default=None, validation_alias=AliasChoices("KNEO_WORKSPACE_ROOT")
    )  # None: <data_dir>/workspaces
    workspace_max_upload_bytes: int = Field(
        default=104_857_600, gt=0, validation_alias=AliasChoices("KNEO_WORKSPACE_MAX_UPLOAD_BYTES")
    )
    workspace_max_bytes: int = Field(
        default=1_073_741_824, gt=0, validation_alias=AliasChoices("KNEO_WORKSPACE_MAX_BYTES")
    )
    workspace_max_files: int = Field(default=10_000, gt=0, validation_alias=AliasChoices("KNEO_WORKSPACE_MAX_FILES"))
    workspace_max_ratio: float = Field(default=200.0, gt=1, validation_alias=AliasChoices("KNEO_WORKSPACE_MAX_RATIO"))

    @field_validator("max_list_items")
    @classmethod
    def _cap_list_items(cls, v: int) -> int:
        if not 1 <= v <= 1000:
            raise ValueError("KNEO_SERV_MAX_LIST_ITEMS must be between 1 and 1000 (the seed's cap)")
        return v

    @field_validator("jobs_model_map")
    @classmethod
    def _jobs_model_map(cls, v: str) -> str:
        if v.strip():
            import json

            try:
                parsed = json.loads(v)
            except ValueError as exc:
                raise ValueError(f"KNEO_JOBS_MODEL_MAP is not JSON: {exc}") from None
            if not isinstance(parsed, dict) or not all(isinstance(m, str | dict) for m in parsed.values()):
                raise ValueError('KNEO_JOBS_MODEL_MAP must map names to "provider:model" or {"provider", "name"}')
        return v

    @property
    def sandbox_dir(self) -> Path:
        """Where job sandboxes live: ``KNEO_SANDBOX_ROOT``, else ``<KNEO_DATA_DIR>/sandboxes`` (absolute)."""
        return (self.sandbox_root or self.data_dir / "sandboxes").expanduser().resolve()

    @property
    def embedded(self) -> bool:
        """True when neither server URL is set: kneo starts its own."""
        return self.nats_url is None and self.database_url is None

    @model_validator(mode="after")
    def _webhooks_private_default(self) -> Settings:
        # Decided when the settings are built, i.e. before the embedded servers' URLs are filled in: the local
        # embedded platform may deliver to loopback/private receivers, a deployment with server URLs may not.
        if self.webhooks_allow_private is None:
            self.webhooks_allow_private = self.embedded
        return self

    @field_validator("webhooks_secret_key")
    @classmethod
    def _webhook_keys(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and v.get_secret_value().strip():
            from kneo_events.sealing import parse_keys

            parse_keys(v.get_secret_value())  # a malformed key is a start-up error, not a failed delivery later
        return v
