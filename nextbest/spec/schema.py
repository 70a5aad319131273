"""The spec's JSON Schema, generated from the pydantic models, for editors.

`nextbest schema` prints it; `schema/nextbest.schema.json` is the committed copy that
`nextbest.yaml` names on its first line (`# yaml-language-server: $schema=...`), so an
editor with a YAML language server completes keys and flags typos as you type. The
loader stays the authority: cross-section checks (an unknown event in a feature, a
policy naming a missing action) are beyond a JSON Schema.
"""

import json
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from nextbest.spec.models import Duration, Spec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_FILE = "schema/nextbest.schema.json"
"""Where the committed copy lives, relative to the repository root."""
TITLE = "nextbest spec (nextbest.yaml)"
DESCRIPTION = (
    "Declare once what a nextbest deployment knows and does: entities, event types, "
    "features, actions, policies, the model, schedules and privacy. `nextbest validate` "
    "checks a file fully (including references between sections)."
)


class _SpecSchema(GenerateJsonSchema):
    def encode_default(self, dft: Any) -> Any:
        """Durations are strings as written ('7d'), also inside tuples of defaults."""
        if isinstance(dft, Duration):
            return str(dft)
        if isinstance(dft, tuple | list):
            return [self.encode_default(d) for d in dft]
        return super().encode_default(dft)


def _closed_names(node: Any) -> None:
    """A map keyed by names (`events`, `features`, ...) takes no key outside the name
    pattern: pydantic emits `patternProperties` only, which lets `View-Page` pass."""
    if isinstance(node, dict):
        if "patternProperties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed_names(value)
    elif isinstance(node, list):
        for value in node:
            _closed_names(value)


def spec_json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file as the loader accepts it (validation mode)."""
    body = Spec.model_json_schema(mode="validation", schema_generator=_SpecSchema)
    _closed_names(body)
    return {
        "$schema": SCHEMA_DIALECT,
        **body,
        "title": TITLE,
        "description": DESCRIPTION,
    }


def spec_json_schema_text() -> str:
    """Stable text (sorted keys, trailing newline) so the committed copy diffs cleanly."""
    return json.dumps(spec_json_schema(), indent=2, sort_keys=True) + "\n"
