"""`run_api(settings)`: the API under uvicorn, for `nextbest api` / `nextbest up`."""

import uvicorn

from nextbest.settings import Settings
from serving.app import create_app


def run_api(settings: Settings, *, require_keys: bool = True, log_level: str = "info") -> None:
    """Serve on `settings.api_host:settings.api_port` until interrupted.

    One process on purpose: the embedded event log has a single writer, and the model
    lives in this process's memory.
    """
    app = create_app(settings, require_keys=require_keys)
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level=log_level,
        access_log=False,
        loop="uvloop",
        http="httptools",
        lifespan="on",
    )
