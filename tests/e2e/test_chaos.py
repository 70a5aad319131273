"""The crash harness at CI size: SIGKILL the stream worker and the API (real processes)
while events are posted, then nothing acknowledged is lost or duplicated and the
online features equal a batch recomputation from Delta bronze.

The same run then proves the check can fail: a replay appended without the
transaction-version guard must be reported as exactly those duplicates.
"""

import pytest

from benchmarks.chaos import ChaosConfig, ChaosResult, run_chaos
from benchmarks.chaos_check import check_bronze

CONFIG = ChaosConfig(
    events=6000,
    stream_kills=4,
    api_kills=2,
    seed=11,
    batch_size=200,
    rate=600.0,
    no_idempotency=True,
    injected_rows=120,
    timeout_s=240.0,
)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> ChaosResult:
    return run_chaos(tmp_path_factory.mktemp("chaos"), CONFIG)


def test_kills_lose_and_duplicate_nothing(chaos: ChaosResult) -> None:
    assert len(chaos.kills_of("stream")) == CONFIG.stream_kills
    assert len(chaos.kills_of("api")) == CONFIG.api_kills
    assert all(k.live for k in chaos.kills)  # every kill landed while events arrived
    assert chaos.replayed == CONFIG.events
    assert len(chaos.acknowledged) == CONFIG.events
    check = chaos.check
    assert check is not None
    assert check.duplicates == {}
    assert check.losses == frozenset()
    assert check.extras == frozenset()
    assert check.rows == CONFIG.events
    assert chaos.mismatches == []


def test_unguarded_replay_is_reported_as_duplicates(chaos: ChaosResult) -> None:
    assert chaos.injected_check is not None
    injected = set(chaos.injected)
    assert len(injected) == len(chaos.injected) == CONFIG.injected_rows
    assert chaos.injected_check.duplicates == {i: 2 for i in injected}
    assert chaos.injected_check.losses == frozenset()
    assert not chaos.injected_check.ok


def test_check_bronze_counts_losses_duplicates_and_extras() -> None:
    check = check_bronze(["a", "b", "c"], ["a", "a", "b", "x"])
    assert check.duplicates == {"a": 2}
    assert check.losses == frozenset({"c"})
    assert check.extras == frozenset({"x"})
    assert not check.ok
    assert check_bronze(["a"], ["a"]).ok


def test_chaos_figures_are_printable(chaos: ChaosResult) -> None:
    text = "\n".join(chaos.lines())
    assert "duplicates found: 0" in text
    assert "losses found: 0" in text
    assert f"events replayed: {CONFIG.events}" in text
