"""The one `Settings` object: `NEXTBEST_*` environment variables and `.env`.

Built once by the entry point and passed into factories; nothing here reads the
environment or touches disk at import time.
"""

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where data lives and how components reach each other.

    Defaults give the embedded single-machine layout of DESIGN.md under `home`;
    scale-out swaps in PostgreSQL (`online_url`), Kafka (`kafka_bootstrap`) and
    object storage (`delta_uri`, `lance_uri` with `storage_options`).
    """

    model_config = SettingsConfigDict(
        env_prefix="NEXTBEST_", env_file=".env", extra="ignore", frozen=True
    )

    home: Path = Field(default=Path(".nextbest"), description="Data home.")
    spec: Path = Field(default=Path("nextbest.yaml"), description="Declarative spec file.")

    online_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the online store; SQLite under home if unset."
    )
    delta_uri: str | None = Field(default=None, description="Delta root; home/delta if unset.")
    lance_uri: str | None = Field(default=None, description="LanceDB URI; home/lance if unset.")
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="Object-store options passed to deltalake and LanceDB."
    )

    kafka_bootstrap: str | None = Field(
        default=None, description="Kafka brokers; the embedded event log is used if unset."
    )
    kafka_topic: str = "nextbest-events"
    partitions: int = Field(default=4, ge=1, le=256, description="Event-log partitions.")

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    dagster_port: int = 3000
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    api_key: SecretStr | None = Field(
        default=None, description="Key that client commands (replay, simulate) send to the API."
    )
    pseudonymization_key: SecretStr = Field(
        default=SecretStr("nextbest-local-development-key"),
        description="Keyed hash for PII properties; set a real secret in production.",
    )

    stream_max_ahead_s: float = Field(
        default=300.0,
        ge=0,
        description="Events dated more than this past the stream clock become dead letters.",
    )
    stream_heartbeat_s: float = Field(
        default=2.0, gt=0, description="How often the stream writes its status row."
    )
    stream_stale_s: float = Field(
        default=30.0,
        gt=0,
        description="/ready reports the stream down when events are pending and it has not"
        " made progress (or sent a heartbeat) for this long.",
    )

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
    def online_database_url(self) -> str:
        return self.online_url or f"sqlite:///{self.home_dir / 'online.db'}"

    @property
    def eventlog_dir(self) -> Path:
        return self.home_dir / "eventlog"

    @property
    def recovery_dir(self) -> Path:
        return self.home_dir / "recovery"

    @property
    def dagster_home(self) -> Path:
        return self.home_dir / "dagster"
