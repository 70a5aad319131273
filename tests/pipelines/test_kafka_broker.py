"""Our Kafka clients against a real Kafka-protocol broker (Tansu, see tests/support/broker.py).

Proves the two paths the stream relies on: an idempotent, acks=all producer keyed by user
(same user -> same partition, every event exactly once), and Bytewax's KafkaSource reading
a partitioned topic to its end without a consumer group.
"""

import json
import time
import uuid
from collections import Counter, defaultdict

import bytewax.operators as op
import pytest
from bytewax.connectors.kafka import KafkaError as KafkaSourceError
from bytewax.connectors.kafka import KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main
from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, Producer

from tests.support.broker import TansuBroker, read_topic

# Registers the session fixtures here too, so this module runs before tests/conftest.py
# lists the plugin; pytest loads a plugin module only once.
pytest_plugins = ["tests.support.broker"]

pytestmark = pytest.mark.kafka

PARTITIONS = 4
USERS = 40
PER_USER = 25


def _events() -> list[tuple[str, str]]:
    """(user_id, event_id) pairs, users interleaved like a live stream."""
    return [(f"user-{u}", f"ev-{u}-{i}") for i in range(PER_USER) for u in range(USERS)]


def _produce(broker: TansuBroker, topic: str) -> dict[str, int]:
    """Produce every event idempotently; return event_id -> partition from delivery reports."""
    delivered: dict[str, int] = {}
    errors: list[KafkaError] = []
    stats: list[dict] = []

    def on_delivery(err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            errors.append(err)
            return
        value = msg.value()
        assert isinstance(value, bytes)
        delivered[json.loads(value)["event_id"]] = msg.partition() or 0

    producer = Producer(
        broker.client_config(
            **{
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "statistics.interval.ms": 100,
                "stats_cb": lambda raw: stats.append(json.loads(raw)),
            }
        )
    )
    for user_id, event_id in _events():
        body = json.dumps({"event_id": event_id, "user_id": user_id}).encode()
        producer.produce(topic, key=user_id.encode(), value=body, on_delivery=on_delivery)
        producer.poll(0)
    assert producer.flush(20) == 0, "messages still queued after flush"
    # The idempotent producer must have been granted a producer id by the broker
    # (InitProducerId), otherwise librdkafka would not have sent anything.
    deadline = time.monotonic() + 5
    while not (stats and stats[-1]["eos"]["idemp_state"] == "Assigned"):
        assert time.monotonic() < deadline, f"no producer id: {stats[-1:]}"
        producer.poll(0.1)
    assert stats[-1]["eos"]["producer_id"] >= 0
    producer.close()
    assert errors == []
    return delivered


@pytest.fixture(scope="module")
def user_topic(kafka_broker: TansuBroker) -> tuple[str, dict[str, int]]:
    """A 4-partition topic filled with keyed events; (name, event_id -> partition)."""
    topic = f"events-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, PARTITIONS)
    return topic, _produce(kafka_broker, topic)


def test_idempotent_keyed_produce_arrives_once_per_partition(
    kafka_broker: TansuBroker, user_topic: tuple[str, dict[str, int]]
) -> None:
    topic, delivered = user_topic
    expected = {event_id for _, event_id in _events()}
    assert set(delivered) == expected

    records = read_topic(kafka_broker.bootstrap, topic)

    bodies = [json.loads(r.value or b"") for r in records]
    counts = Counter(b["event_id"] for b in bodies)
    assert set(counts) == expected
    assert max(counts.values()) == 1, "an event was stored twice"
    partitions_of_user: dict[str, set[int]] = defaultdict(set)
    for record, body in zip(records, bodies, strict=True):
        assert record.key == body["user_id"].encode()
        assert record.partition == delivered[body["event_id"]]
        partitions_of_user[body["user_id"]].add(record.partition)
    assert all(len(parts) == 1 for parts in partitions_of_user.values())
    # The key spreads users over the partitions (40 users cannot all hash to one).
    assert len({r.partition for r in records}) > 1
    # Per partition, offsets are dense from 0: nothing lost, nothing skipped.
    offsets: dict[int, list[int]] = defaultdict(list)
    for record in records:
        offsets[record.partition].append(record.offset)
    for part_offsets in offsets.values():
        assert sorted(part_offsets) == list(range(len(part_offsets)))
    # Each user's events keep their produce order within the partition.
    for user_id in partitions_of_user:
        seen = [b["event_id"] for b in bodies if b["user_id"] == user_id]
        assert seen == [f"ev-{user_id.removeprefix('user-')}-{i}" for i in range(PER_USER)]


def test_bytewax_kafka_source_reads_topic_to_end(
    kafka_bootstrap: str, user_topic: tuple[str, dict[str, int]]
) -> None:
    topic, delivered = user_topic
    out: list[tuple[str, str, int]] = []

    def unpack(msg: KafkaSourceMessage | KafkaSourceError) -> tuple[str, str, int]:
        # raise_on_errors=True (the default) stops the flow instead of emitting errors.
        assert isinstance(msg, KafkaSourceMessage), msg
        body = json.loads(msg.value or b"")
        return (msg.key or b"").decode(), body["event_id"], msg.partition or 0

    flow = Dataflow("kafka_source_smoke")
    # tail=False: each partition stops at its end, so run_main returns. KafkaSource
    # assigns partitions itself (no consumer-group join).
    source = KafkaSource(
        [kafka_bootstrap], [topic], tail=False, starting_offset=OFFSET_BEGINNING, batch_size=100
    )
    messages = op.input("in", flow, source)
    op.output("out", op.map("unpack", messages, unpack), TestingSink(out))

    run_main(flow)

    assert len(out) == len(delivered)
    assert {event_id: part for _, event_id, part in out} == delivered
    assert all(
        event_id.startswith(f"ev-{user.removeprefix('user-')}-") for user, event_id, _ in out
    )
