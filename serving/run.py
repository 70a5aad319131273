"""`run_api(settings)`: the API under uvicorn, for `nextbest api` / `nextbest up`.

The default pseudonymization key is a public constant: anyone could reverse the hashed
PII of a server using it. So the API refuses to listen on a non-loopback address with
it, and warns on loopback.
"""

import ipaddress
import logging

import uvicorn

from nextbest.logs import configure_logging
from nextbest.settings import KEY_FILE, Settings
from serving.app import create_app

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def check_exposure(settings: Settings) -> None:
    """SystemExit when a non-loopback API would use the public development key."""
    if not settings.default_pseudonymization_key:
        return
    where = settings.home_dir / KEY_FILE
    how = (
        "set NEXTBEST_PSEUDONYMIZATION_KEY to a long random secret (e.g. "
        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`) or write one to "
        f"{where} (`nextbest init` does); keep it: changing it changes every hashed value"
    )
    if not is_loopback(settings.api_host):
        raise SystemExit(
            f"refusing to serve on {settings.api_host!r} with the default development "
            f"pseudonymization key, which is public: {how}"
        )
    log.warning("the API uses the default development pseudonymization key: %s", how)


def run_api(settings: Settings, *, require_keys: bool = True, log_level: str | None = None) -> None:
    """Serve on `settings.api_host:settings.api_port` until interrupted.

    One process on purpose: the embedded event log has a single writer, and the model
    lives in this process's memory.
    """
    configure_logging(settings, "api")
    check_exposure(settings)
    app = create_app(settings, require_keys=require_keys)
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level=log_level or settings.log_level.lower(),
        access_log=False,  # ours, opt-in: NEXTBEST_ACCESS_LOG (serving.requestlog)
        log_config=None,  # uvicorn's loggers propagate to our renderer (nextbest.logs)
        loop="uvloop",
        http="httptools",
        lifespan="on",
    )
