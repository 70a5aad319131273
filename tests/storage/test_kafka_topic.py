"""`nextbest init` with Kafka: the topic gets the configured partitions, a second init is a
no-op, and a topic with another partition count is a clear error (never changed)."""

import uuid
from pathlib import Path

import pytest

from launcher.cli import main
from storage.kafka_topic import TopicMismatchError, ensure_topic
from tests.support.broker import TansuBroker
from tests.support.common import ROOT


def _topic() -> str:
    return f"init-{uuid.uuid4().hex[:8]}"


def test_ensure_topic_creates_then_accepts_the_same_topic(kafka_broker: TansuBroker) -> None:
    topic = _topic()
    first = ensure_topic(kafka_broker.bootstrap, topic, 3)
    assert (first.partitions, first.created) == (3, True)
    again = ensure_topic(kafka_broker.bootstrap, topic, 3)
    assert (again.partitions, again.created) == (3, False)


def test_ensure_topic_reports_another_partition_count(kafka_broker: TansuBroker) -> None:
    topic = _topic()
    kafka_broker.create_topic(topic, 2)
    with pytest.raises(TopicMismatchError, match="has 2 partitions but NEXTBEST_PARTITIONS is 5"):
        ensure_topic(kafka_broker.bootstrap, topic, 5)


def test_init_creates_the_topic_and_says_so(
    kafka_broker: TansuBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    topic = _topic()
    monkeypatch.setenv("NEXTBEST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NEXTBEST_SPEC", str(ROOT / "nextbest.yaml"))
    monkeypatch.delenv("NEXTBEST_ONLINE_URL", raising=False)
    monkeypatch.setenv("NEXTBEST_KAFKA_BOOTSTRAP", kafka_broker.bootstrap)
    monkeypatch.setenv("NEXTBEST_KAFKA_TOPIC", topic)
    monkeypatch.setenv("NEXTBEST_PARTITIONS", "3")
    assert main(["init"]) == 0
    assert f"topic {topic} (3 partitions, created)" in capsys.readouterr().out
    assert main(["init"]) == 0
    assert f"topic {topic} (3 partitions, exists)" in capsys.readouterr().out

    monkeypatch.setenv("NEXTBEST_PARTITIONS", "4")
    assert main(["init"]) == 1
    err = capsys.readouterr().err
    assert "has 3 partitions but NEXTBEST_PARTITIONS is 4" in err and "Traceback" not in err
