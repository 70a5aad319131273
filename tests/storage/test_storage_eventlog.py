"""The embedded durable event log on a real directory, with real processes and SIGKILL."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nextbest.settings import Settings
from storage.eventlog.log import EventLog, EventLogError, WriterLockedError, partition_for
from tests.support.eventlog_writer import payload_for

WRITER_SCRIPT = Path(__file__).parents[1] / "support" / "eventlog_writer.py"


def _segments(path: Path, partition: int) -> list[Path]:
    return sorted((path / f"p{partition:04d}").glob("*.log"))


def _read_all(log: EventLog, partition: int) -> list[tuple[int, str, bytes]]:
    out: list[tuple[int, str, bytes]] = []
    offset = 0
    while batch := log.read(partition, offset, max_records=97):
        out += batch
        offset = batch[-1][0] + 1
    return out


def _await(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_round_trip_and_reopen(settings: Settings) -> None:
    records = [(f"user-{i % 7}", f"payload-{i}".encode() * (i % 5)) for i in range(60)]
    with EventLog.from_settings(settings, mode="writer") as log:
        acks = log.append(records[:25]) + log.append(records[25:])
        assert log.append([]) == []
    assert settings.eventlog_dir.is_dir()
    expected: dict[int, list[tuple[int, str, bytes]]] = {}
    for (key, payload), (p, o) in zip(records, acks, strict=True):
        assert p == partition_for(key, settings.partitions)
        expected.setdefault(p, []).append((o, key, payload))
    for mode in ("reader", "writer"):
        with EventLog.from_settings(settings, mode=mode) as log:
            for p in range(settings.partitions):
                got = _read_all(log, p)
                assert got == expected.get(p, [])
                assert [o for o, _, _ in got] == list(range(len(got)))  # contiguous from 0
            assert log.end_offsets() == {
                p: len(expected.get(p, [])) for p in range(settings.partitions)
            }
            assert log.start_offsets() == dict.fromkeys(range(settings.partitions), 0)
    with EventLog.from_settings(settings, mode="writer") as log:  # offsets continue
        (p, o) = log.append([("user-0", b"more")])[0]
        assert o == len(expected[p])


def test_partitioning_is_stable_across_processes() -> None:
    keys = [f"user-{i}" for i in range(300)] + ["", "ünïcode", "anon:42"]
    here = [partition_for(k, 8) for k in keys]
    code = (
        "import json, sys; from storage.eventlog.log import partition_for; "
        "print(json.dumps([partition_for(k, 8) for k in json.loads(sys.argv[1])]))"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(keys)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        assert json.loads(out.stdout) == here
    assert len(set(here)) == 8  # every partition used
    # Pinned: changing the hash would silently re-partition existing logs.
    assert [partition_for(k, 4) for k in ("user-1", "user-2", "alice")] == [0, 0, 1]


def test_read_from_arbitrary_offsets(tmp_path: Path) -> None:
    with EventLog.open(tmp_path, partitions=1, mode="writer", segment_bytes=700) as log:
        log.append([("k", f"r{i}".encode()) for i in range(400)])
        rng = random.Random(7)
        for _ in range(200):
            start, n = rng.randrange(0, 420), rng.randrange(1, 60)
            got = log.read(0, start, max_records=n)
            want = [(o, "k", f"r{o}".encode()) for o in range(start, min(start + n, 400))]
            assert got == want
        assert log.read(0, 400) == []
        assert len(_segments(tmp_path, 0)) > 5


def test_segment_roll_and_trim(tmp_path: Path) -> None:
    with EventLog.open(tmp_path, partitions=1, mode="writer", segment_bytes=500) as log:
        for i in range(120):
            log.append([("k", b"x" * 40 + str(i).encode())])
        files = _segments(tmp_path, 0)
        bases = [int(f.stem) for f in files]
        assert len(bases) > 5 and bases[0] == 0
        for f, base in zip(files, bases, strict=True):
            assert f.stat().st_size <= 500
            assert log.read(0, base, max_records=1)[0][0] == base  # named by base offset
        cut = bases[3] + 1  # inside the fourth segment: only the first three go
        assert log.trim(0, cut) == 3
        assert [int(f.stem) for f in _segments(tmp_path, 0)] == bases[3:]
        assert log.start_offsets() == {0: bases[3]}
        assert log.read(0, 0, max_records=1)[0][0] == bases[3]  # below start: from start
        assert log.trim(0, 10**9) == len(bases) - 4  # everything but the active segment
        assert [int(f.stem) for f in _segments(tmp_path, 0)] == [bases[-1]]
        assert log.append([("k", b"after trim")]) == [(0, 120)]
        assert log.read(0, 120) == [(120, "k", b"after trim")]


def test_single_writer_lock(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path, partitions=2, mode="writer")
    with pytest.raises(WriterLockedError, match=str(os.getpid())):
        EventLog.open(tmp_path, partitions=2, mode="writer")
    code = (
        "import sys; from storage.eventlog.log import EventLog, WriterLockedError\n"
        "try: EventLog.open(sys.argv[1], partitions=2, mode='writer')\n"
        "except WriterLockedError as e: print('rejected:', e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True)
    assert proc.returncode == 3, proc.stderr
    with EventLog.open(tmp_path, partitions=2, mode="reader") as reader:  # no writer lock
        log.append([("a", b"1")])
        assert sum(reader.end_offsets().values()) == 1
        with pytest.raises(EventLogError):
            reader.append([("a", b"2")])
    with pytest.raises(EventLogError, match="fixed at creation"):
        EventLog.open(tmp_path, partitions=3, mode="reader")
    log.close()
    with EventLog.open(tmp_path, partitions=2, mode="writer") as again:
        assert sum(again.end_offsets().values()) == 1


READER_CODE = """
import sys, time
from storage.eventlog.log import EventLog
log = EventLog.open(sys.argv[1], partitions=3, mode="reader")
want, seen, pos = int(sys.argv[2]), [], {p: 0 for p in range(3)}
print("ready", flush=True)
deadline = time.monotonic() + 30
while len(seen) < want and time.monotonic() < deadline:
    for p in range(3):
        for o, k, v in log.read(p, pos[p], max_records=7):
            seen.append(f"{p} {o} {k} {v.decode()}")
            pos[p] = o + 1
    time.sleep(0.005)
print("\\n".join(seen), flush=True)
"""


def test_reader_in_another_process_sees_appends(tmp_path: Path) -> None:
    n = 150
    proc = subprocess.Popen(
        [sys.executable, "-c", READER_CODE, str(tmp_path), str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"  # the reader opened an empty log first
    expected = set()
    with EventLog.open(tmp_path, partitions=3, mode="writer", segment_bytes=1024) as log:
        for start in range(0, n, 10):
            records = [(f"u{i}", f"event-{i}".encode()) for i in range(start, start + 10)]
            for (p, o), (k, v) in zip(log.append(records), records, strict=True):
                expected.add(f"{p} {o} {k} {v.decode()}")
    out, _ = proc.communicate(timeout=60)
    assert set(out.split("\n")) - {""} == expected


def _corrupt_tails(path: Path) -> dict[int, int]:
    """Damage each partition's last record a different way; return intact counts."""
    intact = {}
    with EventLog.open(path, partitions=3, mode="reader") as reader:
        ends = reader.end_offsets()
    seg = {p: _segments(path, p)[-1] for p in range(3)}
    with open(seg[0], "ab") as f:  # garbage after the last complete record
        f.write(os.urandom(5) + b"\x00" * 40 + os.urandom(100))
    intact[0] = ends[0]
    data = seg[1].read_bytes()  # last record cut in half
    last_len = len(data) - _offset_of_last(seg[1])
    seg[1].write_bytes(data[: len(data) - last_len // 2])
    intact[1] = ends[1] - 1
    data = bytearray(seg[2].read_bytes())  # last record's payload flipped: CRC fails
    data[-1] ^= 0xFF
    seg[2].write_bytes(bytes(data))
    intact[2] = ends[2] - 1
    return intact


def _offset_of_last(segment: Path) -> int:
    from storage.eventlog.segments import Scan

    fd = os.open(segment, os.O_RDONLY)
    try:
        positions = [0]
        scan = Scan(fd, 0, after=-1)
        for _ in scan:
            positions.append(scan.pos)
        return positions[-2]
    finally:
        os.close(fd)


def test_torn_tail_ignored_by_readers_and_cut_by_writer(tmp_path: Path) -> None:
    with EventLog.open(tmp_path, partitions=3, mode="writer") as log:
        records = [(f"user-{i}", f"payload-{i}".encode() * 3) for i in range(90)]
        acks = log.append(records)
    assert all(any(p == q for q, _ in acks) for p in range(3))
    intact = _corrupt_tails(tmp_path)
    expected = {(p, o): r for (p, o), r in zip(acks, records, strict=True) if o < intact[p]}
    with EventLog.open(tmp_path, partitions=3, mode="reader") as reader:
        assert reader.end_offsets() == intact
        got = {(p, o): (k, v) for p in range(3) for o, k, v in _read_all(reader, p)}
        assert got == expected
    sizes_before = {p: _segments(tmp_path, p)[-1].stat().st_size for p in range(3)}
    with EventLog.open(tmp_path, partitions=3, mode="writer") as log:
        assert log.end_offsets() == intact
        for p in range(3):
            assert _segments(tmp_path, p)[-1].stat().st_size < sizes_before[p]  # cut
        new = log.append(records[:30])
        assert sorted({o for p, o in new if p == 0})[0] == intact[0]
        for p in range(3):
            assert [o for o, _, _ in _read_all(log, p)] == list(range(log.end_offsets()[p]))
        got = {(p, o): (k, v) for p in range(3) for o, k, v in _read_all(log, p)}
        assert all(got[po] == r for po, r in expected.items())


def test_rewrite_without_erases_and_keeps_offsets(tmp_path: Path) -> None:
    log = EventLog.open(tmp_path, partitions=2, mode="writer", segment_bytes=400)
    reader = EventLog.open(tmp_path, partitions=2, mode="reader")
    secret = b"SECRET-ALICE-4f1c"
    records = [
        ("alice" if i % 3 == 0 else f"bob-{i % 5}", secret if i % 3 == 0 else b"ok")
        for i in range(80)
    ]
    records.append(("alice", secret))  # make alice's record the newest in its partition
    acks = log.append(records)
    before = {p: _read_all(reader, p) for p in range(2)}
    tail = reader.read(alice_p := acks[-1][0], 0, max_records=12)  # a tailing reader mid-way
    ends = log.end_offsets()
    assert log.rewrite_without(lambda key, payload: key == "alice") == 28
    kept = {p: [r for r in before[p] if r[1] != "alice"] for p in range(2)}
    rest = [r for r in kept[alice_p] if r[0] > tail[-1][0]]
    assert reader.read(alice_p, tail[-1][0] + 1) == rest  # its cached position was replaced
    for view in (log, reader):
        assert {p: _read_all(view, p) for p in range(2)} == kept  # offsets unchanged
    for f in tmp_path.rglob("*"):
        assert not f.is_file() or secret not in f.read_bytes(), f
    assert log.end_offsets() == ends  # erasing the newest record frees no offset
    assert reader.end_offsets() == ends  # ... as derived from the files alone
    assert log.append([("alice", b"new")]) == [(alice_p, ends[alice_p])]
    log.close()
    with EventLog.open(tmp_path, partitions=2, mode="writer") as again:
        assert again.end_offsets()[alice_p] == ends[alice_p] + 1
        assert again.read(alice_p, ends[alice_p]) == [(ends[alice_p], "alice", b"new")]
    with pytest.raises(EventLogError):
        reader.rewrite_without(lambda key, payload: True)
    reader.close()


def test_group_commit_shares_fsyncs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers arriving during an fsync are committed together by the next leader."""
    threads = 12
    log = EventLog.open(tmp_path, partitions=2, mode="writer")
    real, calls = os.fdatasync, []

    def spying_fdatasync(fd: int) -> None:
        if not calls:  # hold the first group's fsync until every other caller queued
            _await(lambda: len(log._queue) == threads - 1, "callers to queue")
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spying_fdatasync)
    results: dict[int, list[tuple[int, int]]] = {}

    def call(i: int) -> None:
        results[i] = log.append([(f"user-{i}-{j}", f"{i}-{j}".encode()) for j in range(5)])

    workers = [threading.Thread(target=call, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    monkeypatch.undo()
    assert len(calls) <= 2 * 2  # two groups, at most one fdatasync per partition each
    acked = sorted(po for r in results.values() for po in r)
    for p in range(2):
        offsets = [o for q, o in acked if q == p]
        assert offsets == list(range(len(offsets)))
    for i, res in results.items():
        for j, (p, o) in enumerate(res):
            assert log.read(p, o, max_records=1) == [(o, f"user-{i}-{j}", f"{i}-{j}".encode())]
    log.close()


def test_acknowledged_records_survive_sigkill(tmp_path: Path) -> None:
    rng = random.Random()
    acked: dict[tuple[int, int], str] = {}
    for rnd in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER_SCRIPT), str(tmp_path), "3", "4", "16384", f"r{rnd}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        lines, target = [], rng.randint(300, 1500)
        while len(lines) < target:
            line = proc.stdout.readline()
            assert line, f"writer exited early: {proc.stderr.read().decode()}"
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
        lines += proc.stdout.read().splitlines(keepends=True)  # acks flushed before death
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        for line in lines:
            if line.endswith(b"\n"):
                p, o, pid = line.decode().split()
                assert (int(p), int(o)) not in acked, "offset acknowledged twice"
                acked[int(p), int(o)] = pid
        with EventLog.open(tmp_path, partitions=3, mode="writer", segment_bytes=16384) as log:
            ends = log.end_offsets()
            for p in range(3):
                records = _read_all(log, p)
                assert [o for o, _, _ in records] == list(range(ends[p]))  # contiguous
                by_offset = {o: v for o, _, v in records}
                for (q, o), pid in acked.items():
                    if q == p:
                        assert by_offset.get(o) == payload_for(pid), (p, o, pid)
    assert len(acked) >= 4 * 300
    assert sum(len(_segments(tmp_path, p)) for p in range(3)) > 3  # crashes spanned rolls


# ---- damaged records, health, erasure while ingesting --------------------------------


def _record_positions(segment: Path) -> list[int]:
    """Byte position of each record in an intact segment (header: crc, body_len, ...)."""
    data, pos, out = segment.read_bytes(), 0, []
    while pos < len(data):
        out.append(pos)
        pos += 18 + int.from_bytes(data[pos + 4 : pos + 8], "little")
    return out


def _flip(segment: Path, at: int) -> None:
    data = bytearray(segment.read_bytes())
    data[at] ^= 0x10
    segment.write_bytes(bytes(data))


def test_a_flipped_bit_in_the_active_segment_loses_only_that_record(tmp_path: Path) -> None:
    """Before: the writer cut the segment at the damaged record (every acknowledged
    record after it lost) and readers stopped there. Now it is skipped and quarantined."""
    records = [("k", f"payload-{i}".encode()) for i in range(50)]
    with EventLog.open(tmp_path, partitions=1, mode="writer") as log:
        log.append(records)
    segment = _segments(tmp_path, 0)[-1]
    _flip(segment, _record_positions(segment)[10] + 25)  # inside record 10's payload
    expected = [(o, "k", v) for o, (_, v) in enumerate(records) if o != 10]
    with EventLog.open(tmp_path, partitions=1, mode="reader") as reader:
        assert _read_all(reader, 0) == expected
        assert reader.end_offsets() == {0: 50}
    with EventLog.open(tmp_path, partitions=1, mode="writer") as log:
        assert log.end_offsets() == {0: 50}  # nothing cut
        assert _read_all(log, 0) == expected
        assert log.append([("k", b"next")]) == [(0, 50)]
    [bad] = (tmp_path / "quarantine").glob("*.bad")
    assert bad.name.startswith("p0000-") and "after9" in bad.name
    assert bad.read_bytes().endswith(b"kpayloat-10")  # the record's raw bytes, bit flipped


def test_a_damaged_sealed_segment_is_skipped_not_fatal(tmp_path: Path) -> None:
    """Before: reading a sealed segment with a bad record raised CorruptLogError on every
    read (the stream crash-looped). Now the damaged bytes are skipped and quarantined,
    including a smashed length field, and reading goes on with the next good record."""
    records = [("k", f"payload-{i:03d}".encode() * 4) for i in range(120)]
    with EventLog.open(tmp_path, partitions=1, mode="writer", segment_bytes=1000) as log:
        log.append(records)
    segments = _segments(tmp_path, 0)
    assert len(segments) > 3
    sealed = segments[1]
    positions = _record_positions(sealed)
    data = bytearray(sealed.read_bytes())
    data[positions[2] + 4 : positions[2] + 8] = b"\xff\xff\xff\x7f"  # absurd body length
    sealed.write_bytes(bytes(data))
    base = int(sealed.stem)
    lost = base + 2
    expected = [(o, "k", v) for o, (_, v) in enumerate(records) if o != lost]
    with EventLog.open(tmp_path, partitions=1, mode="reader") as reader:
        assert _read_all(reader, 0) == expected
    with EventLog.open(tmp_path, partitions=1, mode="writer") as log:
        assert _read_all(log, 0) == expected
        # An erasure pass rewrites the damaged segment clean (the bytes stay quarantined).
        log.rewrite_without(lambda key, payload: payload.startswith(b"payload-119"))
        assert _read_all(log, 0) == expected[:-1]
    assert len(list((tmp_path / "quarantine").glob("*.bad"))) == 1


def test_unwritable_log_is_reported(tmp_path: Path) -> None:
    """A write that fails (here: the file size limit, as ENOSPC would) fail-stops the
    writer; `unwritable` says why, for /ready. Too little free disk is reported too."""
    import resource

    log = EventLog.open(tmp_path, partitions=1, mode="writer")
    assert log.unwritable() is None and log.writable()
    assert "disk full" in (log.unwritable(min_free_bytes=1 << 62) or "")
    log.append([("k", b"x" * 100)])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(EventLogError):
            log.append([("k", b"y" * 5000)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    reason = log.unwritable()
    assert reason is not None and "earlier write failed" in reason and "too large" in reason
    assert not log.writable()
    log.close()
    assert log.unwritable() == "closed"


def _p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[int(len(ordered) * 0.99) - 1]


def test_appends_keep_their_latency_while_an_erasure_rewrites_a_large_log(
    tmp_path: Path,
) -> None:
    """Before: `rewrite_without` held the writer for the whole rewrite, so an append
    waited for all of it. Now sealed segments are rewritten off the lock; appends wait
    at most for one segment roll. A loop of erase requests is coalesced into passes."""
    log = EventLog.open(tmp_path, partitions=2, mode="writer", segment_bytes=1 << 20)
    payload = json.dumps({"type": "view", "user_id": "someone", "pad": "x" * 400}).encode()
    for _ in range(100):  # ~45 MB over both partitions: a rewrite takes a while
        log.append([(f"user-{i}", payload) for i in range(1000)])
    log.append([("victim", b'{"user_id": "victim"}')])

    def victim(key: str, payload: bytes) -> bool:
        return json.loads(payload).get("user_id") == "victim"

    t0 = time.perf_counter()
    assert log.rewrite_without(lambda k, p: victim(k, p) and k == "nobody") == 0
    solo_s = time.perf_counter() - t0  # one pass over the log, nothing else running

    def append_latencies(stop: threading.Event, out: list[float]) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            log.append([("live", b'{"type": "view"}')])
            out.append(time.perf_counter() - t)
            time.sleep(0.001)  # a steady client, not one that hogs the GIL

    baseline: list[float] = []
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    append_latencies(stop, baseline)

    during: list[float] = []
    stop = threading.Event()
    appender = threading.Thread(target=append_latencies, args=(stop, during))
    appender.start()
    try:
        t0 = time.perf_counter()
        assert log.rewrite_without(victim) == 1
        rewrite_s = time.perf_counter() - t0
    finally:
        stop.set()
        appender.join()
    print(
        f"rewrite {solo_s:.2f}s alone, {rewrite_s:.2f}s while appending; "
        f"append p99 {_p99(baseline) * 1e3:.2f} ms before, "
        f"{_p99(during) * 1e3:.2f} ms during ({len(during)} appends), "
        f"longest {max(during) * 1e3:.1f} ms"
    )
    assert len(during) >= 10, "appends starved during the erasure"
    # The longest wait, not p99: one appender blocked for the whole rewrite is 1 sample.
    assert max(during) < max(0.2, solo_s / 2), (max(during), solo_s)

    # A loop of erase requests from 8 threads: coalesced, appends keep going.
    passes = log.rewrite_passes
    during.clear()
    stop = threading.Event()
    appender = threading.Thread(target=append_latencies, args=(stop, during))
    appender.start()
    erasers = [
        threading.Thread(target=log.rewrite_without, args=(lambda k, p, n=n: k == f"gone-{n}",))
        for n in range(8)
    ]
    try:
        for t in erasers:
            t.start()
        for t in erasers:
            t.join()
    finally:
        stop.set()
        appender.join()
    assert log.rewrite_passes - passes <= 3  # 8 requests: 1 running + 1 queued (+1 late)
    assert len(during) >= 10, "appends starved during the erase loop"
    for f in tmp_path.rglob("*.log"):
        assert b"victim" not in f.read_bytes()
    log.close()
