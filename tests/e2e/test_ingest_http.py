"""Issue 3's end-to-end check with real processes and no faults: 1,000 events posted over
HTTP reach every store; Delta bronze holds exactly those 1,000 ids, once each, and every
user's online features equal a batch recomputation from bronze."""

from benchmarks.chaos import ChaosConfig, run_chaos

CONFIG = ChaosConfig(events=1000, stream_kills=0, api_kills=0, seed=3, batch_size=100, rate=500.0)


def test_thousand_events_over_http_reach_every_store(tmp_path) -> None:
    result = run_chaos(tmp_path, CONFIG)
    assert result.kills == []
    assert len(result.acknowledged) == result.replayed == 1000
    check = result.check
    assert check is not None
    assert check.rows == 1000 and check.ok
    assert check.duplicates == {} and check.losses == frozenset() and check.extras == frozenset()
    assert result.mismatches == []
