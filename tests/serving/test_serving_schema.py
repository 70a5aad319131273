"""Schemathesis over every operation of the OpenAPI schema, against a live server:
no 5xx, responses match their documented schema, status codes and content types."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from nextbest.settings import Settings
from serving.app import create_app
from serving.keys import create_key
from tests.serving.test_serving_world import build_world, start_server, stop_server, stream_state

ROOT = Path(__file__).resolve().parents[2]


def _settings(home: Path) -> Settings:
    return Settings(home=home, spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]


# The schema comes from the app object itself (create_app does no I/O), so it is known
# at collection time. `schemathesis.pytest.from_fixture` would be the lazy way, but it
# reads `item._nodeid`, which pytest 9 removed (same breakage as
# ionelmc/pytest-benchmark#321).
schema = schemathesis.openapi.from_dict(
    create_app(_settings(ROOT / ".nextbest-unused")).openapi_schema.to_schema()
)


@dataclass
class Target:
    url: str
    key: str


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    s = _settings(tmp_path_factory.mktemp("schema") / "home")
    world = build_world(s)
    stream_state(world.store, "u1", [(i, "view") for i in world.category_items("hiking")[:3]])
    key = create_key(world.store, ["admin"])
    live = start_server(create_app(s))
    yield Target(live.url, key)
    stop_server(live)
    world.store.dispose()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=True,
)
def test_api_conforms_to_its_schema(case: schemathesis.Case, target: Target) -> None:
    case.call_and_validate(
        base_url=target.url,
        headers={"X-API-Key": target.key},
        checks=[
            checks.not_a_server_error,
            checks.response_schema_conformance,
            checks.status_code_conformance,
            checks.content_type_conformance,
        ],
    )


def test_docs_page_lists_every_operation_without_a_key(tmp_path) -> None:
    """The offline docs page is rendered on the server from the OpenAPI schema."""
    from litestar.testing import TestClient

    from nextbest.settings import Settings
    from serving.app import create_app
    from tests.support.common import ROOT

    settings = Settings(home=tmp_path / "home", spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    with TestClient(app=create_app(settings)) as client:
        page = client.get("/docs")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        ops = [
            op.operation_id
            for item in client.app.openapi_schema.paths.values()  # type: ignore[union-attr]
            for op in (item.get, item.post, item.put, item.delete)
            if op is not None
        ]
        assert len(ops) >= 9
        for operation_id in ops:
            assert f"<code>{operation_id}</code>" in page.text


def test_docs_page_shows_every_body_schema_and_example(tmp_path) -> None:
    """Each operation's request and response fields, and its examples as JSON, on one
    offline page: no script, nothing loaded from elsewhere."""
    import html
    import json
    import re

    from litestar.testing import TestClient

    from nextbest.settings import Settings
    from serving.app import create_app
    from tests.support.common import ROOT

    settings = Settings(home=tmp_path / "home", spec=ROOT / "nextbest.yaml", _env_file=None)  # type: ignore[call-arg]
    with TestClient(app=create_app(settings)) as client:
        page = client.get("/docs").text
        doc = client.get("/schema/openapi.json").json()
    assert "<script" not in page and not re.search(r"(src|href)=['\"]https?:", page)
    schemas = doc["components"]["schemas"]
    bodies = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict) or "operationId" not in op:
                continue
            start = page.index(f"id='{op['operationId']}'")
            end = page.find("<section>", start)
            section = page[start : end if end > 0 else None]
            assert html.escape(path) in section and method.upper() in section
            media = [
                m
                for part in [op.get("requestBody") or {}, *op["responses"].values()]
                for m in (part.get("content") or {}).values()
            ]
            for m in media:
                ref = json.dumps(m.get("schema", {}))
                for name in re.findall(r"#/components/schemas/(\w+)", ref)[:1]:
                    bodies += 1
                    for field in schemas[name].get("properties", {}):
                        assert f"<code>{field}</code>" in section, (op["operationId"], field)
                examples = [e["value"] for e in (m.get("examples") or {}).values()]
                examples += m.get("schema", {}).get("examples", []) if not examples else []
                for value in examples:
                    text = value if isinstance(value, str) else json.dumps(value, indent=2)
                    assert html.escape(text) in section, op["operationId"]
    assert bodies >= 10
    decide = page[page.index("id='decide'") :]
    assert "Request body (required)" in decide and "Example: 1 of 3" in decide
    assert html.escape('"title": "Blender 600 W"') in decide  # the answer shows titles
    assert "id='schema-ActionOut'" in page and "The item&#x27;s catalogue attributes" in page
