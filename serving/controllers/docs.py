"""A docs page rendered on the server from the app's own OpenAPI schema.

Litestar's Swagger/Redoc pages load their JavaScript from a CDN, which an offline
install cannot reach; this page needs nothing but the API itself, so `nextbest up`
always has readable docs: every route's request and response fields and examples
(serving/docs_html.py). The machine-readable schema stays at `/schema/openapi.json`.
"""

from litestar import MediaType, Request, get

from serving.docs_html import render


@get("/docs", media_type=MediaType.HTML, include_in_schema=False, sync_to_thread=False)
def docs_page(request: Request) -> str:
    """Rendered once per app: the schema does not change while it runs."""
    state = request.app.state
    page = state.get("docs_html")
    if page is None:
        page = render(request.app.openapi_schema.to_schema())
        state["docs_html"] = page
    return page
