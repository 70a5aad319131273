"""Create the Kafka events topic with the configured partitions (`nextbest init`).

Why here and not on first use: a producer auto-creating the topic would pick the broker's
default partition count, and the stream cluster's parallelism is bounded by partitions,
so the count must be the one in `Settings.partitions`. Idempotent: an existing topic
with that count is fine; a different count is reported, never silently changed (Kafka
can only add partitions, and adding them moves users' keys to other partitions).
"""

import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic


class TopicMismatchError(RuntimeError):
    """The topic exists with another partition count than the settings ask for."""


@dataclass(frozen=True)
class TopicState:
    """What `ensure_topic` found or did."""

    topic: str
    partitions: int
    created: bool


def _partition_count(admin: AdminClient, topic: str, timeout: float) -> int | None:
    # List every topic: a metadata request naming the topic makes brokers with topic
    # auto-creation on (Tansu does it) create it with their default partition count.
    meta = admin.list_topics(timeout=timeout).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        return None
    return len(meta.partitions)


def ensure_topic(
    bootstrap: str,
    topic: str,
    partitions: int,
    *,
    replication_factor: int = 1,
    timeout: float = 10.0,
) -> TopicState:
    """Create `topic` with `partitions` unless it exists; raise if it exists with another count.

    Returns once the broker's metadata lists every partition, so the API and the stream
    started right after see the whole topic.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    existing = _partition_count(admin, topic, timeout)
    created = False
    if existing is None:
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        try:
            futures[topic].result(timeout=timeout)
            created = True
        except KafkaException as exc:  # another `init` created it meanwhile: compare below
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout
    while True:
        count = _partition_count(admin, topic, timeout)
        if count is not None and (count == partitions or not created):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic!r} not visible with {partitions} partitions")
        time.sleep(0.05)  # metadata propagation has no event to wait on
    if count != partitions:
        raise TopicMismatchError(
            f"Kafka topic {topic!r} on {bootstrap} has {count} partitions but"
            f" NEXTBEST_PARTITIONS is {partitions}; set NEXTBEST_PARTITIONS={count} or use"
            " another NEXTBEST_KAFKA_TOPIC (Kafka cannot shrink a topic, and growing it"
            " moves users to other partitions)"
        )
    return TopicState(topic=topic, partitions=count, created=created)
