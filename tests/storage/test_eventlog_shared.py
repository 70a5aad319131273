"""Several writers on one embedded log (`shared=True`, one per API worker process).

flock locks belong to open file descriptions, so two handles in one process contend
exactly as two processes do; the last test uses real processes anyway.
"""

import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from storage.eventlog.log import EventLog, WriterLockedError, partition_for
from tests.support.common import ROOT
from tests.support.eventlog_writer import payload_for

WRITER_SCRIPT = ROOT / "tests" / "support" / "eventlog_writer.py"


def _all(log: EventLog) -> dict[int, list[tuple[int, str, bytes]]]:
    out: dict[int, list[tuple[int, str, bytes]]] = {}
    for p in range(log.partitions):
        offset, rows = 0, []
        while batch := log.read(p, offset, max_records=500):
            rows.extend(batch)
            offset = batch[-1][0] + 1
        out[p] = rows
    return out


def _append_many(log: EventLog, tag: str, n: int) -> list[tuple[int, int]]:
    acks: list[tuple[int, int]] = []
    for i in range(0, n, 5):
        acks += log.append([(f"user-{(i + j) % 7}", f"{tag}-{i + j}".encode()) for j in range(5)])
    return acks


def test_two_shared_writers_keep_offsets_dense_and_keyed_routing(tmp_path: Path) -> None:
    a = EventLog.open(tmp_path, partitions=3, mode="writer", shared=True, segment_bytes=2000)
    b = EventLog.open(tmp_path, partitions=3, mode="writer", shared=True, segment_bytes=2000)
    acks: dict[str, list[tuple[int, int]]] = {}

    def run(log: EventLog, tag: str) -> None:
        acks[tag] = _append_many(log, tag, 400)

    threads = [threading.Thread(target=run, args=(log, t)) for log, t in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    b.close()
    with EventLog.open(tmp_path, partitions=3, mode="reader") as reader:
        rows = _all(reader)
    payloads = [v for recs in rows.values() for _, _, v in recs]
    assert sorted(payloads) == sorted(f"{t}-{i}".encode() for t in "ab" for i in range(400))
    for p, recs in rows.items():
        offsets = [o for o, _, _ in recs]
        assert offsets == list(range(len(recs)))  # dense, in order, none reused
        assert all(partition_for(k, 3) == p for _, k, _ in recs)  # same routing as one writer
    acked = {ack for tag_acks in acks.values() for ack in tag_acks}
    assert len(acked) == 800  # every append got its own (partition, offset)


def test_lone_and_shared_writers_exclude_each_other(tmp_path: Path) -> None:
    shared = EventLog.open(tmp_path, partitions=2, mode="writer", shared=True)
    with pytest.raises(WriterLockedError, match="shared writers"):
        EventLog.open(tmp_path, partitions=2, mode="writer")
    shared.close()
    lone = EventLog.open(tmp_path, partitions=2, mode="writer")
    with pytest.raises(WriterLockedError, match="lone writer"):
        EventLog.open(tmp_path, partitions=2, mode="writer", shared=True)
    lone.close()


def test_erasure_by_one_writer_covers_what_the_other_appended(tmp_path: Path) -> None:
    a = EventLog.open(tmp_path, partitions=2, mode="writer", shared=True)
    b = EventLog.open(tmp_path, partitions=2, mode="writer", shared=True)
    a.append([("gone", b"a1"), ("kept", b"a2")])
    b.append([("gone", b"b1"), ("kept", b"b2")])  # b's records sit in a's active segment
    assert a.rewrite_without(lambda key, _payload: key == "gone") == 2
    b.append([("gone", b"b3"), ("kept", b"b4")])  # b follows a's seal into the new segment
    a.append([("kept", b"a5")])
    a.close()
    b.close()
    with EventLog.open(tmp_path, partitions=2, mode="reader") as reader:
        rows = _all(reader)
    values = sorted(v for recs in rows.values() for _, _, v in recs)
    assert values == [b"a2", b"a5", b"b2", b"b3", b"b4"]
    for recs in rows.values():
        offsets = [o for o, _, _ in recs]
        assert offsets == sorted(set(offsets))


_WRITER = """
import sys
from storage.eventlog.log import EventLog
log = EventLog.open(sys.argv[1], partitions=2, mode="writer", shared=True, segment_bytes=4000)
for i in range(0, 300, 3):
    log.append([(f"u{(i + j) % 5}", f"{sys.argv[2]}-{i + j}".encode()) for j in range(3)])
log.close()
"""


def test_writer_processes_append_concurrently(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag], cwd=ROOT)
        for tag in ("x", "y", "z")
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    with EventLog.open(tmp_path, partitions=2, mode="reader") as reader:
        rows = _all(reader)
    values = sorted(v for recs in rows.values() for _, _, v in recs)
    assert values == sorted(f"{t}-{i}".encode() for t in "xyz" for i in range(300))
    for recs in rows.values():
        assert [o for o, _, _ in recs] == list(range(len(recs)))


def _acks(proc: subprocess.Popen[bytes], at_least: int) -> list[bytes]:
    assert proc.stdout is not None
    lines: list[bytes] = []
    while len(lines) < at_least:
        line = proc.stdout.readline()
        assert line, "writer exited early"
        lines.append(line)
    return lines


def test_a_writer_killed_mid_append_loses_no_acked_record_of_either(tmp_path: Path) -> None:
    """Two shared writers append to the same partitions; one is SIGKILLed (possibly in
    the middle of a write, holding a partition's lock) while the other keeps going: the
    survivor cuts the torn tail and continues, and every acknowledged record of both is
    there with its payload, offsets dense."""
    rng = random.Random(5)
    acked: dict[tuple[int, int], str] = {}
    argv = [sys.executable, str(WRITER_SCRIPT), str(tmp_path), "2", "3", "16384"]
    for rnd in range(3):
        procs = [
            subprocess.Popen([*argv, f"r{rnd}{w}", "shared"], stdout=subprocess.PIPE, cwd=ROOT)
            for w in "ab"
        ]
        lines = {p.pid: _acks(p, rng.randint(200, 600)) for p in procs}
        procs[0].send_signal(signal.SIGKILL)
        lines[procs[1].pid] += _acks(procs[1], 300)  # the survivor writes on past the kill
        procs[1].send_signal(signal.SIGKILL)
        for p in procs:
            assert p.stdout is not None
            lines[p.pid] += p.stdout.read().splitlines(keepends=True)
            p.wait()
            p.stdout.close()
        for line in (line for ls in lines.values() for line in ls if line.endswith(b"\n")):
            part, offset, pid = line.decode().split()
            assert (int(part), int(offset)) not in acked, "offset acknowledged twice"
            acked[int(part), int(offset)] = pid
    with EventLog.open(tmp_path, partitions=2, mode="reader") as reader:
        rows = _all(reader)
    for p, records in rows.items():
        by_offset = {o: v for o, _, v in records}
        assert sorted(by_offset) == list(range(len(records)))
        for (q, o), pid in acked.items():
            if q == p:
                assert by_offset.get(o) == payload_for(pid), (p, o, pid)
    assert len(acked) >= 3 * 500
