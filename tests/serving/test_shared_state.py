"""What API worker processes share through files in the home, unit by unit: the token
buckets, the key-revocation epoch, the consent gate's counter and erasure job claims.
Two handles on one file stand for two processes (flock belongs to the open file)."""

from pathlib import Path

import pytest
from litestar.exceptions import NotAuthorizedException

from nextbest.settings import Settings
from serving.consent import ConsentGate
from serving.erasure_feed import SLOTS, ErasureFeed
from serving.joblock import claim
from serving.keys import EPOCH_FILE, KeyVerifier, announce_revocation, create_key
from serving.ratelimit import SharedTokenBuckets, TokenBuckets, buckets_for
from storage.online.store import OnlineStore


def test_two_handles_draw_from_one_bucket(tmp_path: Path) -> None:
    a = SharedTokenBuckets(tmp_path / "b.bin", rate=1.0, burst=3)
    b = SharedTokenBuckets(tmp_path / "b.bin", rate=1.0, burst=3)
    assert [a.take("k", now=100.0), b.take("k", now=100.0), a.take("k", now=100.0)] == [0, 0, 0]
    assert b.take("k", now=100.0) == pytest.approx(1.0)  # empty for both
    assert a.wait("k", now=100.5) == pytest.approx(0.5)
    assert b.take("k", now=101.0) == 0.0  # refilled at the shared rate
    assert a.take("other", now=101.0) == 0.0  # another client has its own bucket
    assert b.take("k", now=50.0) == 0.0  # the clock went back (a reboot): a full bucket
    a.close()
    b.close()


def test_a_full_table_hands_the_idlest_client_a_new_bucket(tmp_path: Path) -> None:
    table = SharedTokenBuckets(tmp_path / "b.bin", rate=1.0, burst=1, slots=4)
    for n in range(4):
        assert table.take(f"c{n}", now=float(n)) == 0.0
    assert table.take("new", now=10.0) == 0.0  # replaced the idlest (c0)
    assert table.take("c3", now=3.5) > 0  # the others keep their (empty) buckets
    table.close()


def test_buckets_are_shared_only_with_several_workers(tmp_path: Path) -> None:
    assert isinstance(buckets_for(tmp_path, "r", 1.0, 1.0, workers=1), TokenBuckets)
    shared = buckets_for(tmp_path, "r", 1.0, 1.0, workers=2)
    assert isinstance(shared, SharedTokenBuckets)
    assert (tmp_path / "ratelimit-r.bin").exists()
    shared.close()


def test_an_announced_revocation_empties_every_key_cache(settings: Settings) -> None:
    store = OnlineStore.from_settings(settings)
    key = create_key(store, ["decide"])
    epoch = settings.run_dir / EPOCH_FILE
    verifiers = [KeyVerifier(store, ttl_s=3600, epoch=epoch) for _ in range(2)]
    for v in verifiers:
        assert v.scopes(key) == ("decide",) and v.cached(key)
    assert store.revoke_api_key(key.split("_")[1])
    assert all(v.scopes(key) for v in verifiers)  # cached for an hour: still accepted
    announce_revocation(settings.run_dir)
    for v in verifiers:
        assert not v.cached(key)
        with pytest.raises(NotAuthorizedException):
            v.scopes(key)
    store.dispose()


def test_the_consent_gate_tells_decisions_what_others_recorded(tmp_path: Path) -> None:
    mine, theirs = ConsentGate(tmp_path / "gate"), ConsentGate(tmp_path / "gate")
    with mine.hold():
        mine.recorded()
    assert not mine.others_recorded()  # its own answers are in its cache
    assert theirs.others_recorded() and not theirs.others_recorded()  # once per change
    assert mine.generation() == theirs.generation() == 1
    alone = ConsentGate(None)  # one API process: no file, nothing to learn
    with alone.hold():
        alone.recorded()
    assert alone.generation() == 0 and not alone.others_recorded()


def test_an_erasure_job_has_one_owner_until_it_lets_go(tmp_path: Path) -> None:
    first = claim(tmp_path, "job1")
    assert first is not None
    assert claim(tmp_path, "job1") is None  # a sibling's resume skips it
    assert claim(tmp_path, "job2") is not None
    first.release()
    assert claim(tmp_path, "job1") is not None  # its owner died or finished


def test_erasure_news_reaches_the_other_workers_encrypted_then_wiped(tmp_path: Path) -> None:
    path = tmp_path / "erasures.feed"
    mine, theirs = ErasureFeed(path, b"k" * 32), ErasureFeed(path, b"k" * 32)
    seqs = mine.announce(["user-secret-1", "anon:visitor-7"])
    assert mine.news() == []  # it forgot them itself
    assert b"user-secret-1" not in path.read_bytes()  # the final scan must not find it
    assert theirs.news() == ["user-secret-1", "anon:visitor-7"]
    assert theirs.news() == []  # once
    late = ErasureFeed(path, b"k" * 32)  # a worker started after the announcement
    mine.wipe(seqs)
    assert late.news() == [] and set(path.read_bytes()[8:]) == {0}
    for n in range(SLOTS + 3):  # more than the ring holds: the oldest are gone
        mine.announce([f"u{n}"])
    assert theirs.news() == [f"u{n}" for n in range(3, SLOTS + 3)]
    assert ErasureFeed(None, b"k").announce(["x"]) == []  # one process: nothing to tell
