"""The stream's lag on Kafka: end offsets come from the brokers' high watermarks
(`pipelines.metrics.log_ends`), read by a consumer that joins no group."""

import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from nextbest.settings import Settings
from pipelines.metrics import log_ends
from tests.support.broker import TansuBroker

pytest_plugins = ["tests.support.broker"]
pytestmark = pytest.mark.kafka


def test_kafka_end_offsets_are_the_high_watermarks(
    kafka_broker: TansuBroker, tmp_path: Path
) -> None:
    topic = f"metrics-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, partitions=3)
    producer = Producer(kafka_broker.client_config(**{"acks": "all"}))
    # One record a batch: Tansu (not Kafka) reports a partition's high watermark as its
    # last batch's base offset + 1, so a multi-record batch would read short here.
    for partition, n in ((0, 4), (2, 7)):
        for i in range(n):
            producer.produce(topic, value=b"{}", key=f"k{i}".encode(), partition=partition)
            assert producer.flush(20) == 0
    settings = Settings(
        home=tmp_path / "home",
        kafka_bootstrap=kafka_broker.bootstrap,
        kafka_topic=topic,
        _env_file=None,  # type: ignore[call-arg]
    )
    ends = log_ends(settings)
    assert ends() == {0: 4, 1: 0, 2: 7}
    producer.produce(topic, value=b"{}", partition=1)
    producer.flush(20)
    assert ends() == {0: 4, 1: 1, 2: 7}  # read again at every scrape, never cached
