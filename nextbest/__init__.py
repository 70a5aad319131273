"""nextbest: declarative real-time personalization.

`from nextbest import Client, AsyncClient` imports the HTTP client on first use only,
so importing the core (spec, features, decide...) stays free of httpx.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nextbest.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "AsyncClient"):
        from nextbest import client

        return getattr(client, name)
    if name == "__version__":
        from importlib.metadata import version

        return version("nextbest")
    raise AttributeError(f"module 'nextbest' has no attribute {name!r}")
