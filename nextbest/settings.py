"""The one `Settings` object: `NEXTBEST_*` environment variables and `.env`.

Built once by the entry point and passed into factories; nothing here reads the
environment or touches disk at import time.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEVELOPMENT_PSEUDONYMIZATION_KEY = "nextbest-local-development-key"
"""Public, so fine for a laptop only: `serving.run` refuses to serve it off loopback."""
KEY_FILE = "pseudonymization_key"


class Settings(BaseSettings):
    """Where data lives and how components reach each other.

    Defaults give the embedded single-machine layout of docs/architecture.md#data-home under `home`;
    scale-out swaps in PostgreSQL (`online_url`), Kafka (`kafka_bootstrap`) and
    object storage (`delta_uri`, `lance_uri`, `models_uri` with `storage_options`;
    docs/scale-out.md).
    """

    model_config = SettingsConfigDict(
        env_prefix="NEXTBEST_", env_file=".env", extra="ignore", frozen=True
    )

    home: Path = Field(default=Path(".nextbest"), description="Data home.")
    spec: Path = Field(default=Path("nextbest.yaml"), description="Declarative spec file.")

    online_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the online store; SQLite under home if unset."
    )
    # Object storage (docs/scale-out.md): Delta, LanceDB and model artifacts may live in a
    # bucket; storage.objectstore spells `storage_options` for each library.
    delta_uri: str | None = Field(default=None, description="Delta root; home/delta if unset.")
    lance_uri: str | None = Field(default=None, description="LanceDB URI; home/lance if unset.")
    models_uri: str | None = Field(
        default=None, description="Model artifacts root; `models` beside the Delta root if unset."
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="One JSON object of object_store options (endpoint, access_key_id,"
        " secret_access_key, region, allow_http, ...) for Delta, LanceDB and model artifacts.",
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _option_strings(cls, value: Any) -> Any:
        """JSON `true`/numbers as the strings every object-store client takes."""
        if not isinstance(value, dict):
            return value
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}

    kafka_bootstrap: str | None = Field(
        default=None, description="Kafka brokers; the embedded event log is used if unset."
    )
    kafka_topic: str = "nextbest-events"
    partitions: int = Field(default=4, ge=1, le=256, description="Event-log partitions.")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Several API processes on one port (`nextbest api --workers N`): they share the
    # event log (shared writers), rate limits, the consent gate and key revocations
    # through files under `<home>/run/` (serving.run explains which state lives where).
    api_workers: int = Field(
        default=1, ge=1, le=64, description="API server processes on one port (one data home)."
    )
    dagster_port: int = 3000
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    api_key: SecretStr | None = Field(
        default=None, description="Key that client commands (replay, simulate) send to the API."
    )
    pseudonymization_key: SecretStr = Field(
        default=SecretStr(DEVELOPMENT_PSEUDONYMIZATION_KEY),
        description=(
            "Keyed hash for PII properties. Unset: read from `<home>/pseudonymization_key` "
            "(written by `nextbest init`), else a public development constant."
        ),
    )

    # Limits at the door (nextbest.ingest.validation.Limits): what the API and importer accept.
    max_future_s: float = Field(
        default=300.0, ge=0, description="Event/feedback ts at most this far past the clock."
    )
    min_event_ts: datetime = Field(
        default=datetime(1970, 1, 1, tzinfo=UTC), description="Earliest accepted ts."
    )
    max_id_length: int = Field(
        default=200, ge=8, le=240, description="Ids leave room for system prefixes (<256)."
    )
    max_abs_number: float = Field(
        default=1e12, gt=0, description="Bound on |value| and numeric properties/context."
    )
    max_nesting: int = Field(
        default=8, ge=1, le=64, description="Nesting depth of an event's properties/context."
    )
    max_array_length: int = Field(
        default=1000, ge=1, description="Items in one array of properties/context."
    )
    max_body_depth: int = Field(
        default=32, ge=4, le=256, description="Nesting of a whole request body, checked raw."
    )
    max_body_array: int = Field(
        default=10_000, ge=1, description="Items in one array of a request body, checked raw."
    )
    rate_limit_per_s: float | None = Field(
        default=5000.0, gt=0, description="Requests per second per API key (per IP without keys)."
    )
    rate_limit_burst: float | None = Field(
        default=None, ge=1, description="Bucket size; one second's worth if unset."
    )
    auth_failures_per_min: float = Field(
        default=30.0, gt=0, description="Failed authentications per client address per minute."
    )

    automation: bool = Field(
        default=True,
        description="Dagster schedules and the retrain sensor start RUNNING; off: STOPPED.",
    )

    stream_max_ahead_s: float = Field(
        default=300.0,
        ge=0,
        description="Events dated more than this past the stream clock become dead letters.",
    )
    stream_heartbeat_s: float = Field(
        default=2.0, gt=0, description="How often the stream writes its status row."
    )
    stream_threads: int = Field(
        default=1,
        ge=1,
        description="Native threads the stream's Arrow, Delta and LanceDB pools may use"
        " (their default, one per core, competes with the API on a small machine).",
    )
    stream_nice: int = Field(
        default=0,
        ge=0,
        le=19,
        description="Scheduling niceness the stream worker adds to itself (0: as started).",
    )
    stream_stale_s: float = Field(
        default=30.0,
        gt=0,
        description="/ready reports the stream down when events are pending and it has not"
        " made progress (or sent a heartbeat) for this long.",
    )

    # Observability (nextbest.logs, serving.requestlog, pipelines.metrics).
    log_format: Literal["json", "console"] | None = Field(
        default=None, description="Log lines as JSON or for a terminal; unset: console on a TTY."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO", description="Lowest level logged (any case)."
    )
    access_log: bool = Field(
        default=False, description="One log line per API request (method, path, status, ms)."
    )
    stream_metrics_host: str = Field(
        default="127.0.0.1", description="Address the stream's Prometheus endpoint binds."
    )
    stream_metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the stream's Prometheus endpoint (process i of a cluster: port+i);"
        " 0: a free port, recorded under <home>/run/ for `nextbest status`.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _key_from_home(cls, data: Any) -> Any:
        """No key in the environment: the one `nextbest init` wrote into the data home."""
        if not isinstance(data, dict) or data.get("pseudonymization_key"):
            return data
        home = Path(data.get("home") or ".nextbest").expanduser()
        path = home / KEY_FILE
        try:
            key = path.read_text().strip() if path.is_file() else ""
        except OSError:
            key = ""
        return {**data, "pseudonymization_key": key} if key else data

    @property
    def default_pseudonymization_key(self) -> bool:
        """True while the public development key is in use (refused off loopback)."""
        return self.pseudonymization_key.get_secret_value() == DEVELOPMENT_PSEUDONYMIZATION_KEY

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::") else self.api_host
        return f"http://{host}:{self.api_port}"

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def delta_root(self) -> str:
        return self.delta_uri or str(self.home_dir / "delta")

    @property
    def lance_root(self) -> str:
        return self.lance_uri or str(self.home_dir / "lance")

    @property
    def models_root(self) -> str:
        """`models_uri`, else `models` beside the Delta root (`<home>/models` by default)."""
        if self.models_uri:
            return self.models_uri.rstrip("/")
        root = self.delta_root.rstrip("/")
        parent, _, _ = root.rpartition("/")
        return f"{root}/models" if not parent or parent.endswith(":/") else f"{parent}/models"

    @property
    def online_database_url(self) -> str:
        return self.online_url or f"sqlite:///{self.home_dir / 'online.db'}"

    @property
    def eventlog_dir(self) -> Path:
        return self.home_dir / "eventlog"

    @property
    def run_dir(self) -> Path:
        """State the API processes of this home share while running (serving.run)."""
        return self.home_dir / "run"

    @property
    def recovery_dir(self) -> Path:
        return self.home_dir / "recovery"

    @property
    def dagster_home(self) -> Path:
        return self.home_dir / "dagster"
