"""The same flow with Kafka as the source, against the Tansu broker fixture."""

import uuid

from bytewax.testing import run_main
from confluent_kafka import Producer

from nextbest.settings import Settings
from nextbest.spec.loader import load_spec
from pipelines.flow import build_flow
from pipelines.sources import KafkaEventSource
from storage.delta.store import DeltaStore
from tests.support.broker import TansuBroker
from tests.support.stream_helpers import (
    delta_events,
    demo_events,
    encode,
    online_mismatches,
    write_catalog,
)


def test_flow_reads_a_kafka_topic_into_every_store(
    kafka_broker: TansuBroker, settings: Settings
) -> None:
    spec = load_spec(settings.spec)
    cfg, events = demo_events(400, seed=41)
    items = write_catalog(settings, spec, cfg, vectors=False)
    topic = f"nextbest-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, 3)
    producer = Producer(kafka_broker.client_config(**{"enable.idempotence": True, "acks": "all"}))
    for event in events:
        key, payload = encode(event)
        producer.produce(topic, key=key.encode(), value=payload)
        producer.poll(0)
    producer.produce(topic, key=b"u-bad", value=b"\xff not json")
    assert producer.flush(20) == 0

    kafka = settings.model_copy(
        update={"kafka_bootstrap": kafka_broker.bootstrap, "kafka_topic": topic}
    )
    source = KafkaEventSource.from_settings(kafka, tail=False)
    assert len(source.list_parts()) == 3
    run_main(build_flow(kafka, spec, source=source))

    stored, table = delta_events(settings)
    ids = table.column("event_id").to_pylist()
    assert len(ids) == len(events) == len(set(ids))
    assert set(table.column("source_partition").to_pylist()) == {0, 1, 2}
    assert DeltaStore.from_settings(settings).count("dead_letters") == 1
    assert online_mismatches(settings, spec, stored, items) == []

    # Reading the topic again from the start changes nothing (idempotent per partition).
    run_main(build_flow(kafka, spec, source=KafkaEventSource.from_settings(kafka, tail=False)))
    assert delta_events(settings)[1].num_rows == len(events)
