"""The `/docs` page as HTML, rendered from the app's own OpenAPI document.

Every operation with its parameters, request body and responses as tables of fields
(type, required, constraints, description) plus the examples from serving/examples.py
as JSON blocks; component schemas once at the end, linked from the types that use
them. No script and no external resource: it reads the same offline as online.
"""

import html
import json
from collections.abc import Mapping
from typing import Any

METHODS = ("get", "post", "put", "patch", "delete")
CONSTRAINTS = (
    ("minLength", "min length"),
    ("maxLength", "max length"),
    ("minimum", "≥"),
    ("maximum", "≤"),
    ("minItems", "min items"),
    ("maxItems", "max items"),
    ("pattern", "pattern"),
    ("format", "format"),
)
STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;padding:1.5rem 2rem;max-width:64rem;
color:#1d2430;line-height:1.45}
h1{margin-bottom:.2rem}h2{margin-top:2.4rem;border-top:2px solid #d8dee8;padding-top:1rem}
h3{margin:1.2rem 0 .4rem;font-size:1rem}h4{margin:.8rem 0 .3rem;font-size:.95rem}
table{border-collapse:collapse;width:100%;margin:.3rem 0 .6rem;font-size:.92rem}
td,th{border-bottom:1px solid #e3e7ee;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f5f7fa}code{background:#f1f3f6;padding:0 .25rem;border-radius:3px}
pre{background:#f6f8fa;border:1px solid #e3e7ee;border-radius:4px;padding:.6rem .8rem;
overflow-x:auto;font-size:.85rem;margin:.3rem 0 .8rem}
.m{display:inline-block;min-width:4rem;text-align:center;border-radius:3px;color:#fff;
padding:0 .4rem;font-family:monospace;font-weight:bold;margin-right:.4rem}
.get{background:#2f7d32}.post{background:#1f5fa8}.delete{background:#b3261e}
.put,.patch{background:#8a5a00}.req{color:#b3261e;font-weight:bold}.muted{color:#5b6472}
nav li{margin:.15rem 0}details{margin:.3rem 0}summary{cursor:pointer}
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _code(value: object) -> str:
    return f"<code>{_e(value)}</code>"


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def type_of(schema: Mapping[str, Any]) -> str:
    """A schema's type as short HTML: `string`, `array of <ActionOut>`, `integer | null`."""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"<a href='#schema-{_e(name)}'>{_e(name)}</a>"
    for key in ("allOf", "oneOf", "anyOf"):
        if key in schema:
            parts = [type_of(s) for s in schema[key]]
            return (" & " if key == "allOf" else " | ").join(parts)
    if "enum" in schema:
        return "one of " + ", ".join(_code(json.dumps(v)) for v in schema["enum"])
    if "const" in schema:
        return _code(json.dumps(schema["const"]))
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_e(k) for k in kind)
    if kind == "array":
        return "array of " + type_of(schema.get("items") or {})
    if kind == "object" and isinstance(schema.get("additionalProperties"), Mapping):
        return "object of " + type_of(schema["additionalProperties"])
    return _e(kind or "any")


def _plain(value: object) -> object:
    """`100` for the `100.0` msgspec writes as an integer's bound."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _constraints(schema: Mapping[str, Any]) -> str:
    out = [f"{label} {_code(_plain(schema[key]))}" for key, label in CONSTRAINTS if key in schema]
    if "default" in schema:
        out.append(f"default {_code(json.dumps(schema['default']))}")
    return ", ".join(out)


def _description(schema: Mapping[str, Any]) -> str:
    text = schema.get("description") or ""
    return f"<p class='muted'>{_e(text)}</p>" if text else ""


def fields_table(schema: Mapping[str, Any]) -> str:
    """The properties of an object schema: field, type, required, constraints, meaning."""
    props: Mapping[str, Any] = schema.get("properties") or {}
    if not props:
        return f"<p>Type: {type_of(schema)}</p>"
    required = set(schema.get("required") or [])
    rows = "".join(
        "<tr>"
        f"<td>{_code(name)}</td><td>{type_of(prop)}</td>"
        f"<td>{'<span class=req>required</span>' if name in required else 'optional'}</td>"
        f"<td>{_constraints(prop)}</td><td>{_e(prop.get('description') or '')}</td>"
        "</tr>"
        for name, prop in props.items()
    )
    return (
        "<table><tr><th>field</th><th>type</th><th></th><th>constraints</th>"
        f"<th>description</th></tr>{rows}</table>"
    )


def _resolve(schema: Mapping[str, Any], components: Mapping[str, Any]) -> Mapping[str, Any]:
    """A body schema itself (`$ref` or a one-element `allOf` of one), for its fields."""
    if len(schema.get("allOf") or []) == 1:
        schema = {**schema["allOf"][0], **{k: v for k, v in schema.items() if k != "allOf"}}
    if "$ref" in schema:
        return components.get(_ref_name(schema["$ref"]), {})
    return schema


def _examples(media: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(summary, value) of a media type's examples, wherever Litestar put them."""
    found: list[tuple[str, Any]] = []
    for name, example in (media.get("examples") or {}).items():
        if isinstance(example, Mapping) and "value" in example:
            found.append((str(example.get("summary") or name), example["value"]))
    if "example" in media:
        found.append(("Example", media["example"]))
    if not found:
        listed = (media.get("schema") or {}).get("examples")
        if isinstance(listed, list):
            found = [(f"{n} of {len(listed)}", v) for n, v in enumerate(listed, 1)]
    return found


def _example_blocks(examples: list[tuple[str, Any]]) -> str:
    out = []
    for summary, value in examples:
        text = value if isinstance(value, str) else json.dumps(value, indent=2)
        out.append(f"<h4>Example: {_e(summary)}</h4><pre>{_e(text)}</pre>")
    return "".join(out)


def _content(content: Mapping[str, Any], components: Mapping[str, Any]) -> str:
    out = []
    for media_type, media in content.items():
        schema = media.get("schema") or {}
        out.append(f"<p>Content type {_code(media_type)}, schema {type_of(schema)}</p>")
        out.append(fields_table(_resolve(schema, components)))
        out.append(_example_blocks(_examples(media)))
    return "".join(out)


def _parameters(params: list[Mapping[str, Any]]) -> str:
    if not params:
        return ""
    rows = "".join(
        "<tr>"
        f"<td>{_code(p.get('name'))}</td><td>{_e(p.get('in'))}</td>"
        f"<td>{type_of(p.get('schema') or {})}</td>"
        f"<td>{'<span class=req>required</span>' if p.get('required') else 'optional'}</td>"
        f"<td>{_e(p.get('description') or '')}</td>"
        "</tr>"
        for p in params
    )
    return (
        "<h3>Parameters</h3><table><tr><th>name</th><th>in</th><th>type</th><th></th>"
        f"<th>description</th></tr>{rows}</table>"
    )


def _responses(responses: Mapping[str, Any], components: Mapping[str, Any]) -> str:
    out = ["<h3>Responses</h3>"]
    for status, response in sorted(responses.items()):
        head = f"<b>{_e(status)}</b> {_e(response.get('description') or '')}"
        body = _content(response.get("content") or {}, components)
        if status.startswith("2"):
            out.append(f"<h4>{head}</h4>{body}")
        else:  # errors share one shape: folded, still readable without a script
            out.append(f"<details><summary>{head}</summary>{body}</details>")
    return "".join(out)


def _operation(path: str, method: str, op: Mapping[str, Any], doc: Mapping[str, Any]) -> str:
    components = (doc.get("components") or {}).get("schemas") or {}
    anchor = op.get("operationId") or f"{method}-{path}"
    secured = op.get("security", doc.get("security"))
    auth = "<p>Send the header <code>X-API-Key</code>.</p>" if secured else "<p>No key needed.</p>"
    parts = [
        f"<h2 id='{_e(anchor)}'><span class='m {method}'>{method.upper()}</span>{_code(path)}</h2>",
        f"<p>Operation {_code(op.get('operationId') or '')}: "
        f"<b>{_e(op.get('summary') or '')}</b></p>",
        _description(op),
        auth,
        _parameters(op.get("parameters") or []),
    ]
    body = op.get("requestBody")
    if body:
        required = " (required)" if body.get("required") else ""
        parts.append(f"<h3>Request body{required}</h3>")
        parts.append(_content(body.get("content") or {}, components))
    parts.append(_responses(op.get("responses") or {}, components))
    return f"<section>{''.join(parts)}</section>"


def render(doc: Mapping[str, Any]) -> str:
    """The whole page from an OpenAPI document (as `OpenAPI.to_schema()` gives it)."""
    info = doc.get("info") or {}
    title = _e(info.get("title") or "API")
    ops = [
        (path, method, item[method])
        for path, item in sorted((doc.get("paths") or {}).items())
        for method in METHODS
        if isinstance(item.get(method), Mapping)
    ]
    nav = "".join(
        f"<li><a href='#{_e(op.get('operationId') or f'{m}-{p}')}'>"
        f"<span class='m {m}'>{m.upper()}</span>{_e(p)}</a> {_e(op.get('summary') or '')}</li>"
        for p, m, op in ops
    )
    schemas = (doc.get("components") or {}).get("schemas") or {}
    schema_html = "".join(
        f"<h3 id='schema-{_e(name)}'>{_e(name)}</h3>{_description(s)}{fields_table(s)}"
        for name, s in sorted(schemas.items())
    )
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{title} API</title><style>{STYLE}</style></head><body>"
        f"<h1>{title} API</h1><p class='muted'>version {_e(info.get('version') or '')}</p>"
        f"<p>{_e(info.get('description') or '')}</p>"
        "<p>Authenticate with the header <code>X-API-Key</code> (create a key with "
        "<code>nextbest keys create --scope ingest,decide,admin</code>). The same document "
        "as OpenAPI JSON: <a href='/schema/openapi.json'>/schema/openapi.json</a>.</p>"
        f"<nav><h3>Operations</h3><ul>{nav}</ul></nav>"
        + "".join(_operation(p, m, op, doc) for p, m, op in ops)
        + f"<h2 id='schemas'>Schemas</h2>{schema_html}</body></html>"
    )
