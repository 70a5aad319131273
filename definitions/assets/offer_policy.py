"""The served offer policy: a trained uplift candidate goes live only through the OPE gate.

`offer_uplift` writes a candidate, `policy_evaluation` values it off-policy against the
current policy, and this asset applies `NextbestResource.ope_gate` to that verdict: a
passing candidate becomes `<home>/models/uplift.json` (which the API reloads), a
failing one leaves the served policy as it was. Every decision lands in
`uplift_registry.json`, so which version is served, and why, stays visible.
"""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from definitions.assets.offer_uplift import UPLIFT_CANDIDATE, UPLIFT_POINTER
from definitions.assets.policy_evaluation import NOT_ESTIMATED, OPE_REPORT, policy_evaluation
from definitions.batch.artifacts import read_json_file, write_json_file
from definitions.resources import NextbestResource, OpeGate
from storage.artifacts import ArtifactStore

REGISTRY = "uplift_registry.json"
HISTORY = 50
"""Decisions kept in the registry's history (the served entry is always kept)."""


def gate_decision(gate: OpeGate, verdict: str) -> tuple[bool, str]:
    """(promote, why) for a candidate's verdict against the current offer policy. Only
    an estimate can pass `better` or `not_worse`: a candidate `not estimated` (too few
    or too little of the held-out decisions) or `not evaluated` (no report on it) is
    served by gate `off` alone."""
    if gate == "off":
        return True, f"gate off: served without requiring an estimate (verdict {verdict})"
    if verdict == "better":
        return True, "better than the current policy: DR difference interval above 0"
    if gate == "not_worse" and verdict == "unclear":
        return True, "not worse than the current policy: DR difference interval contains 0"
    why = {
        "worse": "worse than the current policy: DR difference interval below 0",
        "unclear": "not shown better than the current policy: DR difference interval contains 0",
        NOT_ESTIMATED: "not estimated: too few of the held-out decisions to value it",
    }.get(verdict, f"no usable evaluation ({verdict})")
    return False, f"{why}; gate {gate} keeps the served policy"


def read_registry(models_dir: ArtifactStore | Path) -> dict[str, Any]:
    """`{"served": entry | None, "history": [entry, ...]}`, oldest decision first."""
    return read_json_file(models_dir / REGISTRY) or {"served": None, "history": []}


def _evaluation(
    models_dir: ArtifactStore | Path, version: str, served: str | None
) -> dict[str, Any] | None:
    """The gate section of `ope.json` if it evaluated this candidate against the policy
    served now (a stale report, e.g. before a newer promotion, does not count)."""
    report = read_json_file(models_dir / OPE_REPORT) or {}
    gate = report.get("gate")
    if not isinstance(gate, dict) or gate.get("candidate") != version:
        return None
    return gate if gate.get("served") == served else None


def _history_table(history: list[dict[str, Any]]) -> str:
    lines = ["| decided | version | status | vs | verdict | reason |", "|---|---|---|---|---|---|"]
    for e in reversed(history[-10:]):
        lines.append(
            f"| {e['decided_at'][:19]} | {e['version']} | {e['status']} | {e['compared_with']}"
            f" | {e['verdict']} | {e['reason']} |"
        )
    return "\n".join(lines)


@dg.asset(deps=[policy_evaluation], group_name="policy", kinds={"json"})
def offer_policy(context: dg.AssetExecutionContext, nextbest: NextbestResource):
    """The offer policy the API serves (`<home>/models/uplift.json`). The uplift
    candidate `offer_uplift` trained is promoted only when `policy_evaluation`'s verdict
    against the current policy passes the `ope_gate` of the resource: `better` (default;
    the interval of the paired doubly robust difference from the current policy on the
    same held-out decisions lies above 0; current is the served model, or while none is
    served the logged policy with exploration off), `not_worse` (it does not lie below
    0), or `off`. A candidate `not estimated` (too few rows, or coverage below
    `ope_min_coverage`) passes gate `off` only. A rejected candidate leaves the served
    policy unchanged; metadata and `uplift_registry.json` record the verdict, the
    estimates and why."""
    models = nextbest.models_dir()
    candidate = read_json_file(models / UPLIFT_CANDIDATE)
    served = read_json_file(models / UPLIFT_POINTER)
    served_version = str(served["version"]) if served else None
    registry = read_registry(models)
    base: dict[str, Any] = {"gate": nextbest.ope_gate, "previous_version": served_version or ""}
    if candidate is None or candidate["version"] == served_version:
        status = "no candidate trained yet" if candidate is None else "candidate already served"
        return dg.MaterializeResult(
            metadata={**base, "status": status, "served_version": served_version or ""}
        )
    version = str(candidate["version"])
    gate = _evaluation(models, version, served_version)
    verdict = gate["verdict"] if gate is not None else "not evaluated"
    promote, reason = gate_decision(nextbest.ope_gate, verdict)
    if gate is not None and gate.get("note"):
        reason = f"{reason} ({gate['note']})"
    now = datetime.now(UTC).isoformat()
    entry: dict[str, Any] = {
        "version": version,
        "artifact_path": candidate["artifact_path"],
        "decided_at": now,
        "status": "promoted" if promote else "rejected",
        "gate": nextbest.ope_gate,
        "compared_with": (
            f"served {served_version}" if served_version else "logged policy, exploration off"
        ),
        "verdict": verdict,
        "reason": reason,
        "previous_version": served_version,
        "evaluation": gate,
    }
    if promote:
        write_json_file(
            models / UPLIFT_POINTER,
            {**candidate, "promoted_at": now, "gate": nextbest.ope_gate, "verdict": verdict},
        )
        registry["served"] = entry
    registry["history"] = [*registry["history"], entry][-HISTORY:]
    write_json_file(models / REGISTRY, registry)
    context.log.info(f"offer policy {version}: {entry['status']} ({reason})")
    now_served = version if promote else served_version
    metadata: dict[str, Any] = {
        **base,
        "status": entry["status"],
        "promoted": promote,
        "reason": reason,
        "verdict": verdict,
        "compared_with": entry["compared_with"],
        "candidate_version": version,
        "served_version": now_served or "",
        "history": dg.MetadataValue.md(_history_table(registry["history"])),
    }
    if gate is not None:
        metadata["rows"] = int(gate.get("rows", 0))
        metadata["coverage"] = dg.MetadataValue.float(float(gate.get("coverage", 0.0)))
        numbers = {
            **{f"candidate_dr_{k}": v for k, v in gate.get("candidate_dr", {}).items()},
            "current_value": gate.get("current_value"),
            "logged_value": gate.get("logged_value"),
            **{
                f"difference_{k}": gate.get("difference", {}).get(k)
                for k in ("value", "low", "high")
            },
        }
        for key, value in numbers.items():
            if value is not None:
                metadata[key] = dg.MetadataValue.float(float(value))
    version_tag = dg.DataVersion(now_served) if now_served else None
    return dg.MaterializeResult(metadata=metadata, data_version=version_tag)
