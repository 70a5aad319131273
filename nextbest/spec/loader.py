"""Load a spec file and report every problem at once, each with file, line, path and fix.

YAML is composed into nodes so each value keeps its line, and duplicate keys (which
PyYAML would silently overwrite) become errors. Sections are validated one by one so a
broken section does not hide the problems of the others; cross-section references are
then checked on whatever validated.
"""

import difflib
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Annotated, Any, get_args, get_origin

import yaml
from pydantic import BaseModel, Tag, TypeAdapter, ValidationError

from nextbest.spec import checks as spec_checks
from nextbest.spec.models import Spec

KeyPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(Exception):
    """Raised with every problem found; `str()` lists them one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def load_spec(path: str | FsPath) -> Spec:
    path = FsPath(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError([Problem(str(path), 0, "", f"cannot read spec: {exc.strerror}")]) from exc
    spec, problems = parse_spec(text, filename=str(path))
    if problems or spec is None:
        raise SpecError(problems)
    return spec


def parse_spec(text: str, *, filename: str = "<spec>") -> tuple[Spec | None, list[Problem]]:
    lines: dict[KeyPath, int] = {}
    problems: list[Problem] = []
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        return None, [Problem(filename, line, "", f"not valid YAML: {exc.problem}")]
    if node is None or not isinstance(node, yaml.MappingNode):
        return None, [Problem(filename, 1, "", "the spec must be a mapping of sections")]
    data = _to_python(node, (), lines, problems, filename, yaml.SafeLoader(""))

    def at(path: KeyPath) -> int:
        for cut in range(len(path), -1, -1):
            if path[:cut] in lines:
                return lines[path[:cut]]
        return 1

    def add(path: KeyPath, message: str) -> None:
        problems.append(Problem(filename, at(path), _dotted(path), message))

    values: dict[str, Any] = {}
    fields = Spec.model_fields
    for key in data:
        if key not in fields:
            add((key,), f"unknown section {key!r}{_suggest(str(key), fields)}")
    for name, field in fields.items():
        if name not in data:
            if field.is_required():
                add((), f"required section {name!r} is missing")
            continue
        adapter: TypeAdapter[Any] = TypeAdapter(field.annotation)  # type: ignore[arg-type]
        try:
            values[name] = adapter.validate_python(data[name])
        except ValidationError as exc:
            for err in exc.errors():
                loc = _clean_loc(name, err["loc"])
                add((name, *loc), _explain(err, field.annotation))
            if name in _NAMED_SECTIONS and isinstance(data[name], dict):
                values[name] = _valid_entries(adapter, data[name])

    for path, message in _cross_checks(values):
        add(path, message)
    if problems:
        problems.sort(key=lambda p: (p.line, p.path))
        return None, problems
    return Spec.model_validate(values), []


_NAMED_SECTIONS = {"events", "features", "actions", "policies"}


def _valid_entries(adapter: TypeAdapter[Any], raw: dict[Any, Any]) -> spec_checks.Section:
    """The entries of a named section that validate alone, so their references still
    get checked while a sibling entry is broken."""
    valid: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            valid.update(adapter.validate_python({key: value}))
        except ValidationError:
            continue
    return spec_checks.Section(valid, unchecked=[str(k) for k in raw])


def _cross_checks(v: dict[str, Any]) -> list[tuple[KeyPath, str]]:
    out: list[tuple[KeyPath, str]] = []
    events, features, entities = v.get("events"), v.get("features"), v.get("entities")
    actions = v.get("actions")
    if events is not None:
        out += spec_checks.check_events(events)
    if features is not None:
        out += spec_checks.check_features(features, events, entities)
        out += spec_checks.check_singletons(features)
    if actions is not None:
        out += spec_checks.check_actions(actions, features, events, entities)
    if v.get("policies") is not None:
        out += spec_checks.check_policies(v["policies"], actions, features, entities)
    if v.get("privacy") is not None and v["privacy"].consent is not None:
        out += spec_checks.check_privacy(v["privacy"].consent, events)
    return out


def _to_python(
    node: yaml.Node,
    path: KeyPath,
    lines: dict[KeyPath, int],
    problems: list[Problem],
    fn: str,
    scalars: yaml.SafeLoader,
) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = scalars.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in out:
                problems.append(
                    Problem(
                        fn,
                        line,
                        _dotted((*path, key)),
                        f"duplicate name {key!r} (first declared at line {first[key]}); "
                        "names must be unique, rename or merge one of them",
                    )
                )
                continue
            first[key] = line
            lines[(*path, key)] = line
            out[key] = _to_python(value_node, (*path, key), lines, problems, fn, scalars)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [
            _to_python(n, (*path, i), lines, problems, fn, scalars)
            for i, n in enumerate(node.value)
        ]
    return scalars.construct_object(node)


_FEATURE_TAGS = {"window", "last_n", "session_vector"}


def _clean_loc(section: str, loc: tuple[Any, ...]) -> KeyPath:
    """Drop pydantic's union-tag element so the path matches the YAML document."""
    parts = list(loc)
    if section == "features" and len(parts) >= 3 and parts[1] in _FEATURE_TAGS:
        del parts[1]
    return tuple(
        p for p in parts if not (isinstance(p, str) and (p.startswith("function-") or p == "[key]"))
    )


def _fields_at(annotation: Any, loc: tuple[Any, ...]) -> set[str]:
    """The keys allowed at `loc` (pydantic's raw loc, union tags included)."""
    current = annotation
    for part in (*loc, None):
        while get_origin(current) is Annotated:
            current = get_args(current)[0]
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part is None:
                return set(current.model_fields)
            field = current.model_fields.get(str(part))
            if field is None:
                return set()
            current = field.annotation
        elif get_origin(current) in (dict, list):
            current = get_args(current)[-1]
        elif get_args(current):  # a union: follow the member whose tag is `part`
            members = {_tag(a): a for a in get_args(current)}
            if part not in members:
                return set()
            current = members[part]
            continue
        else:
            return set()
    return set()


def _tag(member: Any) -> Any:
    for meta in getattr(member, "__metadata__", ()):
        if isinstance(meta, Tag):
            return meta.tag
    return member


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _explain(err: Any, annotation: Any) -> str:
    kind, loc, given = err["type"], err["loc"], err.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1])
        allowed = sorted(_fields_at(annotation, loc[:-1]))
        listing = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        hint = _suggest(key, allowed) or listing
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return f"required key {loc[-1]!r} is missing"
    if kind == "literal_error":
        return f"{given!r} is not allowed; expected one of {err['ctx']['expected']}"
    if kind == "union_tag_invalid":
        return f"unknown kind {given!r}; expected one of {err['ctx']['expected_tags']}"
    if kind == "string_pattern_mismatch":
        return (
            f"{given!r} is not a valid name here; use lower snake_case "
            "(a-z, 0-9, _) starting with a letter"
        )
    if kind == "value_error":
        return str(err["ctx"]["error"])
    return f"{err['msg']} (got {given!r})"


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
