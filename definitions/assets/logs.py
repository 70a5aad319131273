"""The API's decision and feedback logs (Delta `decisions`, `feedback`): written by the
serving process, not by Dagster, so they are external assets here. Declaring them
gives the `policy` group its upstream edges in the lineage view: the offer models and
the off-policy evaluation read exactly these two tables. The `observe_external_tables`
sensor reports their Delta versions and row counts as observations."""

import dagster as dg

from definitions.metadata import delta_definition
from storage.delta.schemas import DECISIONS_SCHEMA, FEEDBACK_SCHEMA

decision_log = dg.AssetSpec(
    "decision_log",
    group_name="policy",
    kinds={"deltalake"},
    description="Every /v1/decide answer with its logged propensities (Delta `decisions`), "
    "appended by the API's decision-log writer.",
    metadata={
        **delta_definition("decisions", DECISIONS_SCHEMA),
        "written_by": "serving (POST /v1/decide)",
    },
)

feedback_log = dg.AssetSpec(
    "feedback_log",
    group_name="policy",
    kinds={"deltalake"},
    description="Outcomes of decisions (impression, click, conversion, dismiss; Delta "
    "`feedback`), appended by the API.",
    metadata={
        **delta_definition("feedback", FEEDBACK_SCHEMA),
        "written_by": "serving (POST /v1/feedback)",
    },
)

LOG_ASSETS = [decision_log, feedback_log]
