"""Exactly-once at the door (a real log on real files, no Ray): idempotency keys and event
IDs, the dedup window's count and age bounds, and the window surviving a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from ps.ids import id_keys
from tests.conftest import FakeClock
from tests.workers.test_ingest_log import SyncLog, span
from workers import ingest_log
from workers.config import IngestConfig


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock(1_000_000.0)
    monkeypatch.setattr(ingest_log, "time", clock)
    return clock


def _cfg(tmp_path: Path, **kw) -> IngestConfig:
    return IngestConfig(dir=str(tmp_path), **{"fsync": False, **kw})


def _uri_cfg(tmp_path: Path, **kw) -> IngestConfig:
    return IngestConfig(dir=(tmp_path / "store").as_uri(), state_dir=str(tmp_path / "state"), **{"fsync": False, **kw})


def _post(log: SyncLog, users, *, key=None, ids=None, types=None):
    n = len(users)
    return log.append(users, list(range(n)), [1.0] * n, [1.0] * n, types, ids, key)


def test_a_retried_key_returns_the_original_result_and_appends_nothing(tmp_path):
    log = SyncLog(_cfg(tmp_path))
    first = _post(log, ["a", "b"], key="req-1")
    assert span(first) == (0, 1)
    before = log.stats()
    assert _post(log, ["a", "b"], key="req-1") == first
    after = log.stats()
    assert (after["events_accepted"], after["appends"]) == (before["events_accepted"], before["appends"]) == (2, 1)
    assert after["duplicates"] == before["duplicates"] + 2
    assert span(_post(log, ["a", "b"], key="req-2")) == (2, 3)
    assert span(_post(log, ["a", "b"])) == (4, 5)  # no key: appended every time
    assert log.read(0, 10).column("user_id").to_pylist() == ["a", "b"] * 3


@pytest.mark.parametrize(
    "events",
    [dict(users=["x", "y", "z"]), dict(users=["b", "a"]), dict(users=["a", "b"], ids=["e1", None]),
     dict(users=["a", "b"], types=["click", None]), dict(users=["a", "b"], weights=[1.0, 2.0]),
     dict(users=["a", "b"], timestamps=[None, 5.0])],
    ids=["others", "order", "event-id", "event-type", "weight", "timestamp"],
)
def test_a_key_reused_for_other_events_is_refused_and_appends_nothing(tmp_path, events):
    # Answering the first request's reply would acknowledge events that were never written.
    log = SyncLog(_cfg(tmp_path))
    first = log.append(["a", "b"], [0, 1], [None, None], [1.0, 1.0], None, None, "req-1")
    before = log.stats()
    users = events["users"]
    n = len(users)
    with pytest.raises(ingest_log.IdempotencyKeyReused, match="Idempotency-Key: 'req-1' was used for other events"):
        log.append(users, list(range(n)), events.get("timestamps", [None] * n), events.get("weights", [1.0] * n),
                   events.get("types"), events.get("ids"), "req-1")
    after = log.stats()
    assert (after["events_accepted"], after["appends"], after["duplicates"]) == (
        before["events_accepted"], before["appends"], before["duplicates"])
    # The real retry (timestamps None again: the server's time, not part of the request) still gets its reply.
    assert log.append(["a", "b"], [0, 1], [None, None], [1.0, 1.0], None, None, "req-1") == first


def test_a_key_reused_in_another_partition_is_refused(tmp_path):
    # The key's first request went to one partition; other events under it, for a user of
    # another partition, are refused too (that partition never saw the key).
    users = [f"u{i}" for i in range(20)]
    where = [int(k % 2) for k in id_keys(users)]
    a, b = users[where.index(0)], users[where.index(1)]
    log = SyncLog(_cfg(tmp_path, partitions=2))
    _post(log, [a], key="k")
    with pytest.raises(ingest_log.IdempotencyKeyReused):
        _post(log, [b], key="k")
    with pytest.raises(ingest_log.IdempotencyKeyReused):
        _post(log, [a, b], key="k")
    assert log.stats()["end_offsets"] == [1, 0]


async def _together(*appends):
    import asyncio

    return await asyncio.gather(*appends, return_exceptions=True)


@pytest.mark.parametrize("uri", [False, True], ids=["local", "uri"])
def test_two_requests_with_one_key_at_once_append_one_and_refuse_the_other_whole(tmp_path, uri):
    # A writes partition by partition; B, under A's key with other events, lands in between.
    # Found by review: A was refused half-way, its first part written, and its retry refused
    # for good. The key is claimed while an append is in flight, so one of them is refused
    # before it writes anything.
    users = [f"u{i}" for i in range(40)]
    where = [int(k % 2) for k in id_keys(users)]
    p0, p1 = [u for u, w in zip(users, where) if w == 0], [u for u, w in zip(users, where) if w == 1]
    log = SyncLog((_uri_cfg if uri else _cfg)(tmp_path, partitions=2))
    a = log.log.append([p0[0], p1[0]], [1, 2], [1.0, 1.0], [1.0, 1.0], None, None, "K")
    b = log.log.append([p1[1]], [3], [1.0], [1.0], None, None, "K")
    ra, rb = log.run(_together(a, b))
    assert isinstance(rb, ingest_log.IdempotencyKeyReused), (ra, rb)
    assert ra.accepted == 2 and log.stats()["end_offsets"] == [1, 1]
    assert [log.read(0, 9, p).column("user_id").to_pylist() for p in (0, 1)] == [[p0[0]], [p1[0]]]
    assert log.append([p0[0], p1[0]], [1, 2], [1.0, 1.0], [1.0, 1.0], None, None, "K") == ra  # A's retry
    # Identical requests at once: one appends, the other waits for it and gets its reply.
    c = [log.log.append([p0[2], p1[2]], [4, 5], [1.0, 1.0], [1.0, 1.0], None, None, "L") for _ in range(2)]
    rc = log.run(_together(*c))
    assert rc[0] == rc[1] and rc[0].accepted == 2 and log.stats()["end_offsets"] == [2, 2]
    assert log.log._in_flight == {}


def test_keys_from_a_log_written_without_fingerprints_still_retry(tmp_path, monkeypatch):
    # A log from before fingerprints: its keys' retries are recognised by the key alone, as then.
    cfg = _cfg(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(ingest_log, "_fingerprint", lambda ev, timestamps: None)
        first = _post(SyncLog(cfg), ["a", "b"], key="old")
    again = SyncLog(cfg)
    assert _post(again, ["x"], key="old") == first
    assert again.stats()["events_accepted"] == 2


def test_event_ids_already_in_the_window_are_not_appended_again(tmp_path):
    log = SyncLog(_cfg(tmp_path))
    r1 = _post(log, ["a", "b", "c"], ids=["e1", None, "e2"], types=["view", "click", None])
    assert (r1.accepted, r1.duplicates, r1.offset) == (3, 0, 2)
    # e1 is stored (offset 0); None is always new; e3 twice in one request: the first is kept.
    r2 = _post(log, ["a", "b", "c", "d"], ids=["e1", None, "e3", "e3"])
    assert (r2.accepted, r2.duplicates, r2.offsets) == (2, 2, {0: 4})
    b = log.read(0, 10).to_pydict()
    assert b["event_id"] == ["e1", None, "e2", None, "e3"]
    assert b["event_type"] == ["view", "click", None, None, None]
    assert b["offset"] == [0, 1, 2, 3, 4]
    # All duplicates: nothing appended; the reply names the stored events' offsets.
    r3 = _post(log, ["a", "c"], ids=["e1", "e2"])
    assert (r3.accepted, r3.duplicates, r3.offsets) == (0, 2, {0: 2})
    assert log.stats()["events_accepted"] == 5
    assert log.stats()["duplicates"] == 4


def test_event_ids_are_deduplicated_within_their_partition(tmp_path):
    users = [f"u{i}" for i in range(20)]
    where = [int(k % 2) for k in id_keys(users)]
    a, b = users[where.index(0)], users[where.index(1)]
    log = SyncLog(_cfg(tmp_path, partitions=2))
    _post(log, [a], ids=["e"])
    # The same producer event is the same user, so the same partition; another user's
    # event in another partition with that ID is another event.
    assert _post(log, [a], ids=["e"]).duplicates == 1
    assert (_post(log, [b], ids=["e"]).accepted, log.stats()["end_offsets"]) == (1, [1, 1])


def test_the_window_is_bounded_by_count(tmp_path):
    log = SyncLog(_cfg(tmp_path, dedup_max_keys=3))
    results = [_post(log, ["u"], key=f"k{i}") for i in range(4)]
    assert log.stats()["dedup_keys"] == 3
    assert _post(log, ["u"], key="k3") == results[3]
    assert span(_post(log, ["u"], key="k0")) == (4, 4)  # forgotten: appended again
    assert log.stats()["dedup_keys"] == 3


def test_the_window_is_bounded_by_age(tmp_path, clock):
    log = SyncLog(_cfg(tmp_path, dedup_max_age_s=60))
    first = _post(log, ["u"], key="k", ids=["e"])
    clock.now += 59
    assert _post(log, ["u"], key="k", ids=["e"]) == first
    assert _post(log, ["u"], ids=["e"]).duplicates == 1
    clock.now += 2
    assert span(_post(log, ["u"], key="k")) == (1, 1)
    assert _post(log, ["u"], ids=["e"]).accepted == 1
    assert log.stats()["events_accepted"] == 3


@pytest.mark.parametrize("uri", [False, True], ids=["local", "uri"])
def test_the_window_survives_a_restart(tmp_path, clock, uri):
    cfg = (_uri_cfg if uri else _cfg)(tmp_path, dedup_max_age_s=3600)
    log = SyncLog(cfg)
    r1 = _post(log, ["a", "b"], key="k1", ids=["e1", "e2"])
    r2 = _post(log, ["c", "d"], key="k2", ids=["e2", "e3"])  # e2 is a duplicate
    assert (r2.accepted, r2.duplicates, r2.offset) == (1, 1, 2)
    keys = log.stats()["dedup_keys"]
    assert keys == 5  # k1, k2, e1, e2, e3

    again = SyncLog(cfg)
    assert again.stats()["dedup_keys"] == keys
    assert _post(again, ["a", "b"], key="k1", ids=["e1", "e2"]) == r1
    assert _post(again, ["c", "d"], key="k2", ids=["e2", "e3"]) == r2
    with pytest.raises(ingest_log.IdempotencyKeyReused):  # the fingerprint came back with the key
        _post(again, ["x"], key="k2")
    assert _post(again, ["x", "y"], ids=["e3", "e4"]).offsets == {0: 3}
    assert again.stats()["events_accepted"] == 4

    clock.now += 3601  # older than the window: a restart does not bring them back
    assert SyncLog(cfg).stats()["dedup_keys"] == 0


@pytest.mark.parametrize("restart", [False, True])
def test_a_retry_names_the_offsets_its_events_were_appended_at(tmp_path, restart):
    # /events records the posted positives in the users' recent items by these offsets: a retry
    # after that failed (a 503 once the events were durable) answered 200 and recorded nothing,
    # as every offset came back -1.
    cfg = _cfg(tmp_path)
    log = SyncLog(cfg)
    _post(log, ["z"], ids=["e0"])  # offset 0
    plain = _post(log, ["a", "b"], key="k1")  # offsets 1, 2
    mixed = _post(log, ["c", "d", "e", "f", "g"], key="k2", ids=["e0", "e5", None, "e5", "e7"])
    assert plain.event_offsets == [1, 2]
    # e0 is the log's (offset 0), e5's repeat is its first event's, the rest go at 3, 4, 5.
    assert mixed.event_offsets == [0, 3, 4, 3, 5]
    if restart:
        log = SyncLog(cfg)  # the dedup window comes back from the segments
    again = _post(log, ["a", "b"], key="k1")
    assert again == plain and again.event_offsets == [1, 2]
    again = _post(log, ["c", "d", "e", "f", "g"], key="k2", ids=["e0", "e5", None, "e5", "e7"])
    assert again == mixed and again.event_offsets == [0, 3, 4, 3, 5]
    assert _post(log, ["h"], ids=["e7"]).event_offsets == [5]  # a repost of an event the log has
    assert log.stats()["events_accepted"] == 6


def test_a_retry_names_no_offsets_once_the_window_forgot_its_event_ids(tmp_path):
    # Which events the first call kept is then unknown: none is named rather than a wrong one.
    log = SyncLog(_cfg(tmp_path, dedup_max_keys=3))
    first = _post(log, ["a", "b"], key="k1", ids=["e1", None])
    assert first.event_offsets == [0, 1]
    _post(log, ["c", "d"], ids=["e9", "e10"])  # the window holds 3 entries: e1, the oldest, goes
    assert "e:e1" not in log.log._parts[0].window and "k:k1" in log.log._parts[0].window
    again = _post(log, ["a", "b"], key="k1", ids=["e1", None])
    assert again == first and again.event_offsets == [-1, -1]


def test_a_restart_keeps_the_newest_entries_up_to_the_count(tmp_path):
    cfg = _cfg(tmp_path, dedup_max_keys=2)
    log = SyncLog(cfg)
    results = [_post(log, ["u"], key=f"k{i}") for i in range(3)]
    again = SyncLog(cfg)
    assert again.stats()["dedup_keys"] == 2
    assert _post(again, ["u"], key="k2") == results[2]
    assert _post(again, ["u"], key="k1") == results[1]
    assert span(_post(again, ["u"], key="k0")) == (3, 3)


def test_bad_idempotency_keys_are_refused(tmp_path):
    log = SyncLog(_cfg(tmp_path))
    for key in ["", "k" * 256, 5]:
        with pytest.raises(ValueError, match="idempotency_key"):
            _post(log, ["u"], key=key)
    assert log.stats()["events_accepted"] == 0
