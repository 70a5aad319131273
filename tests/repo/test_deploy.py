"""deploy/ cannot rot: compose.yaml runs the processes `nextbest up --profile scale`
runs (same commands, same environment variable names; values are the compose file's
own), and the Dockerfile's image provides the programs those commands name.

No Docker here: the files are parsed and compared with `launcher.profiles`, the one
function both `up --profile scale` and this test build the service list with."""

import json
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from launcher.profiles import COMPOSE, Service, scale_services, scale_setup
from nextbest.settings import Settings
from tests.support.common import ROOT

DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def profile(tmp: Path) -> list[Service]:
    """The scale profile with compose's hosts and ports (values do not matter here)."""
    settings = Settings(
        home=tmp,
        spec=ROOT / "nextbest.yaml",
        kafka_bootstrap="kafka:9092",
        online_url="postgresql+psycopg://u@db/nextbest",
        delta_uri="s3://b/delta",
        _env_file=None,  # type: ignore[call-arg]
    )
    return [*scale_setup(settings), *scale_services(settings, COMPOSE)]


def image_entrypoint(dockerfile: str) -> list[str]:
    found = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", dockerfile, re.M)
    assert len(found) == 1, "the Dockerfile has one ENTRYPOINT, in exec form"
    return json.loads(found[0])


def nextbest_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compose services running the nextbest image (the ones built from the Dockerfile)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
    }


def drift(compose: dict[str, Any], entrypoint: list[str], expected: list[Service]) -> list[str]:
    """Every difference between compose's nextbest services and the profile's."""
    services, wanted = nextbest_services(compose), {s.name: s for s in expected}
    problems = [f"{n}: only in compose" for n in services.keys() - wanted.keys()]
    problems += [f"{n}: only in the profile" for n in wanted.keys() - services.keys()]
    for name in services.keys() & wanted.keys():
        service = services[name]
        command = [*service.get("entrypoint", entrypoint), *service.get("command", [])]
        if command != wanted[name].command:
            problems.append(f"{name}: runs {command}, the profile {wanted[name].command}")
        names, env = set(service.get("environment") or {}), set(wanted[name].env)
        if names != env:
            problems.append(f"{name}: environment differs by {sorted(names ^ env)}")
    return problems


def test_compose_runs_exactly_the_profile_services(
    compose: dict[str, Any], dockerfile: str, tmp_path: Path
) -> None:
    assert drift(compose, image_entrypoint(dockerfile), profile(tmp_path)) == []


def test_drift_is_caught_both_ways(compose: dict[str, Any], tmp_path: Path) -> None:
    """A variable or service added on one side only, or a changed flag, is reported."""
    expected = profile(tmp_path)
    api = next(s for s in expected if s.name == "api")
    more_env = [*expected, replace(api, name="api", env={**api.env, "NEXTBEST_NEW": "1"})]
    more_env.remove(api)
    assert drift(compose, ["nextbest"], more_env) == [
        "api: environment differs by ['NEXTBEST_NEW']"
    ]
    extra = [*expected, Service("stream-2", ["nextbest", "stream", "-i", "2"], api.env)]
    assert drift(compose, ["nextbest"], extra) == ["stream-2: only in the profile"]
    flag = [replace(s, command=[*s.command, "--x"]) if s is api else s for s in expected]
    assert [p.split(":")[0] for p in drift(compose, ["nextbest"], flag)] == ["api"]


def test_compose_environment_values_are_usable(compose: dict[str, Any]) -> None:
    """Values compose chose: parseable storage options, the servers it defines."""
    env = nextbest_services(compose)["api"]["environment"]
    options = json.loads(env["NEXTBEST_STORAGE_OPTIONS"])
    assert options["endpoint"].startswith("http://s3:")
    assert env["NEXTBEST_KAFKA_BOOTSTRAP"].split(":")[0] in compose["services"]
    assert "@postgres:" in env["NEXTBEST_ONLINE_URL"]
    assert {"kafka", "postgres", "s3"} <= set(compose["services"])
    dagster = nextbest_services(compose)["dagster-daemon"]["environment"]
    assert dagster["NEXTBEST_DAGSTER_PG_URL"].startswith("postgresql+psycopg2://")


def test_the_image_provides_every_program_the_services_run(dockerfile: str, tmp_path: Path) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert image_entrypoint(dockerfile) == ["nextbest"]
    assert pyproject["project"]["scripts"]["nextbest"] == "launcher.cli:main"
    assert re.search(r"^RUN uv sync --frozen --no-editable$", dockerfile, re.M)
    # every package of the wheel, and the spec NEXTBEST_SPEC names, are copied in
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copied = set(re.findall(r"^COPY (\S+) \./", dockerfile, re.M))
    assert set(packages) | {"nextbest.yaml"} <= copied
    spec = re.search(r"NEXTBEST_SPEC=(\S+)", dockerfile)
    assert spec is not None and spec.group(1) == "/app/nextbest.yaml"
    # Dagster's programs come with the pinned dagster packages
    dependencies = " ".join(pyproject["project"]["dependencies"])
    programs = {s.command[0] for s in profile(tmp_path)}
    assert programs == {"nextbest", "dagster", "dagster-webserver", "dagster-daemon"}
    assert "dagster==" in dependencies and "dagster-webserver==" in dependencies
    assert "dagster-postgres==" in dependencies
    # the image's Dagster instance: PostgreSQL, written where DAGSTER_HOME points
    home = re.search(r"DAGSTER_HOME=(\S+)", dockerfile)
    assert home is not None and home.group(1) == COMPOSE.dagster_home
    written = "write_dagster_files(Settings(home='/tmp/nextbest-build'), COMPOSE)"
    assert written in dockerfile  # the dagster.yaml and workspace.yaml the commands name
