"""A docs page rendered on the server from the OpenAPI schema.

Litestar's Swagger/Redoc pages load their JavaScript from a CDN, which an offline
install cannot reach; this page needs nothing but the API itself, so `nextbest up`
always has readable docs. The machine-readable schema stays at `/schema/openapi.json`.
"""

import html

from litestar import MediaType, Request, get

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2rem;max-width:60rem}"
    "table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;"
    "padding:.4rem;text-align:left;vertical-align:top}code{background:#f4f4f4;padding:0 .2rem}"
)


@get("/docs", media_type=MediaType.HTML, include_in_schema=False, sync_to_thread=False)
def docs_page(request: Request) -> str:
    schema = request.app.openapi_schema
    rows = []
    for path, item in sorted((schema.paths or {}).items()):
        for method in ("get", "post", "put", "patch", "delete"):
            op = getattr(item, method, None)
            if op is None:
                continue
            rows.append(
                "<tr>"
                f"<td><code>{method.upper()}</code></td>"
                f"<td><code>{html.escape(path)}</code></td>"
                f"<td><code>{html.escape(op.operation_id or '')}</code></td>"
                f"<td>{html.escape(op.summary or '')}</td>"
                "</tr>"
            )
    title = html.escape(schema.info.title)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title>"
        f"<style>{_STYLE}</style></head><body><h1>{title} API</h1>"
        f"<p>{html.escape(schema.info.description or '')}</p>"
        "<p>Send <code>X-API-Key</code> (create one with <code>nextbest keys create</code>). "
        "OpenAPI: <a href='/schema/openapi.json'>/schema/openapi.json</a>, "
        "<a href='/schema/swagger'>Swagger UI</a> (needs internet for its scripts).</p>"
        "<table><tr><th>method</th><th>path</th><th>operation</th><th>summary</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
