"""What a trainer does with the PS's removals (``Trainer._sync_lifecycle``) and while idle,
in process over a ``LocalClient``: an item removed and then brought back by a new
interaction keeps its place in users' recent items; a removed user's session context goes;
the users' histories stay within what the user table can hold."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ps.ids import Keyed, keyed
from ps.local import LocalClient
from ps.shard import PushId
from serving.config import load_config
from workers.events import make_events
from workers.step import Histories
from workers.trainer import Trainer


def _trainer(tables: dict) -> tuple[Trainer, LocalClient]:
    cfg = load_config(None, {"stream": {"num_events": 10}, "ps": {"num_shards": 1, "tables": tables},
                             "trainer": {"lifecycle_sync_s": 0.001, "idle_expire_s": 0.001}})
    client = LocalClient(cfg.ps)
    return Trainer(0, cfg, client=client), client


def _push(client: LocalClient, table: str, ids: list, seq: int) -> None:
    client.push_async({table: (ids, np.zeros((len(ids), client.dims[table]), np.float32))}, PushId("test", seq))


def _live(client: LocalClient, table: str, ids: list) -> list[bool]:
    return client.pull_many({table: ids})[table][1].tolist()


def test_an_item_back_by_a_new_interaction_stays_in_recent_items_after_the_sync():
    # Before, the sync forgot every tombstoned item, even one a user had just interacted
    # with again: /rank then ranked that just-seen item back to them.
    tr, client = _trainer({"item": {"max_rows": 2, "eviction": "lru"}})
    _push(client, "item", ["x"], 1)
    _push(client, "item", ["y"], 2)
    _push(client, "item", ["z"], 3)  # the cap is 2: "x" goes
    _push(client, "item", ["x"], 4)  # a new interaction brings it back; "y" goes
    assert _live(client, "item", ["x", "y", "z"]) == [True, False, True]
    u, items = keyed(["u2", "u2"]).keys, keyed(["x", "y"]).keys
    client.shard.record_recent(u, items, np.asarray([7, 8]))
    tr._sync_lifecycle()
    assert client.shard.recent_items(u[:1])[0].tolist() == keyed(["x"]).keys.tolist()
    assert tr._removed_since == [client.shard.version]


def test_a_removed_users_session_context_goes_with_their_row():
    tr, client = _trainer({"user": {"max_rows": 1, "eviction": "lru"}})
    _push(client, "user", ["a"], 1)
    tr.histories.remember(keyed(["a", "b"]).keys, keyed(["i1", "i2"]).keys)
    _push(client, "user", ["b"], 2)  # the cap is 1: "a" goes
    tr._sync_lifecycle()
    assert tr.histories.of(int(keyed(["a"]).keys[0])) == ()
    assert tr.histories.of(int(keyed(["b"]).keys[0])) == (int(keyed(["i2"]).keys[0]),)


def test_histories_keep_the_most_recently_active_users_up_to_the_cap():
    h = Histories(width=2, max_users=3)
    h.remember(np.asarray([1, 2, 3, 1], np.uint64), np.asarray([10, 20, 30, 11], np.uint64))
    h.remember(np.asarray([4], np.uint64), np.asarray([40], np.uint64))  # 2 is the least recently active
    assert sorted(h.users().tolist()) == [1, 3, 4] and h.of(1) == (10, 11)
    h.forget_users(np.asarray([3, 99], np.uint64))
    assert sorted(h.users().tolist()) == [1, 4]
    users, items = h.capture()
    again = Histories(width=2, max_users=3)
    again.load(users, items)
    assert again.users().tolist() == h.users().tolist() and again.of(1) == (10, 11)


def test_the_trainers_histories_hold_no_more_users_than_the_user_table_can():
    tr, _ = _trainer({"user": {"max_rows": 5}})
    tr.histories.remember(np.arange(1, 101, dtype=np.uint64), np.arange(101, 201, dtype=np.uint64))
    assert len(tr.histories) == 5  # max_rows per shard x 1 shard


def test_an_idle_trainer_runs_the_shards_expiry():
    # Expiry ran only with a push, so an idle service kept expired IDs forever.
    tr, client = _trainer({"user": {"ttl_s": 60.0}})
    _push(client, "user", ["a"], 1)
    client.shard.tables["user"].touched_at[:] -= 120.0  # its last interaction two minutes ago
    tr._expire_idle()
    assert _live(client, "user", ["a"]) == [False]


def test_items_the_ps_gave_no_row_leave_the_negative_catalogue():
    # With admission, one-off items stayed in the catalogue for good: 99.5% of negatives
    # were items without a row (noise vectors whose gradients were then dropped).
    cfg = load_config(None, {"stream": {"num_events": 3000, "synthetic": {"num_items": 20_000, "session_mean": 1}},
                             "ps": {"num_shards": 1, "tables": {"item": {"admission": {"min_count": 2}}}},
                             "trainer": {"lifecycle_sync_s": 0.001}})
    client = LocalClient(cfg.ps)
    tr = Trainer(0, cfg, client=client)
    tr.run()
    tr._sync_lifecycle()
    keys = tr.catalogue.keys().copy()
    assert len(keys) > 50
    assert client.present("item", Keyed(keys)).all()


def test_a_restarted_trainer_checks_its_replayed_catalogue_too(tmp_path):
    # Rebuilding the catalogue from the stream and the saved state brought back every item
    # without a row (815 of 1,058 in a review's run), and nothing checked them again.
    cfg = load_config(None, {"stream": {"num_events": 3000, "synthetic": {"num_items": 20_000, "session_mean": 1}},
                             "ps": {"num_shards": 1, "tables": {"item": {"admission": {"min_count": 2}}}},
                             "trainer": {"lifecycle_sync_s": 0.001, "snapshot_every_batches": 3}})
    client = LocalClient(cfg.ps)
    Trainer(0, cfg, client=client, state_dir=tmp_path).run()
    again = Trainer(0, cfg, client=client, state_dir=tmp_path)
    assert len(again.catalogue) > 50
    again._sync_lifecycle()
    assert client.present("item", Keyed(again.catalogue.keys().copy())).all()


def test_a_user_back_before_the_sync_keeps_the_history_they_started_again():
    tr, client = _trainer({"user": {"max_rows": 1, "eviction": "lru"}})
    _push(client, "user", ["a"], 1)
    _push(client, "user", ["b"], 2)  # the cap is 1: "a" goes
    _push(client, "user", ["a"], 3)  # "a" is back (and "b" goes)
    a = int(keyed(["a"]).keys[0])
    tr.histories.remember(np.asarray([a], np.uint64), keyed(["i9"]).keys)
    tr._sync_lifecycle()
    assert tr.histories.of(a) == (int(keyed(["i9"]).keys[0]),)



def _evict_x(client: LocalClient) -> int:
    """Push items x, y, z into an item table capped at 2 rows (x goes), then move the PS's
    version past x's tombstone; returns x's key."""
    for seq, item in enumerate(["x", "y", "z", "z"], 1):
        _push(client, "item", [item], seq)
    assert _live(client, "item", ["x", "y", "z"]) == [False, True, True]
    return int(keyed(["x"]).keys[0])


def test_an_item_back_in_a_batch_not_yet_pushed_stays_in_the_catalogue():
    # A batch read ahead (prepared: the catalogue and histories already hold its items) is
    # pushed after the sync that runs before it. The sync dropped an item evicted earlier and
    # back in that batch, since the shard had no row for it yet: it was never sampled as a
    # negative again until its next event, and the histories lost the interaction.
    tr, client = _trainer({"item": {"max_rows": 2, "eviction": "lru"}})
    x = _evict_x(client)
    u1 = int(keyed(["u1"]).keys[0])
    batch = tr._prepare(0, make_events([0, 1], ["u1", "u1"], ["x", "z"], [1.7e9, 1.7e9 + 1], [1.0, 1.0]), 2)
    assert x in tr.catalogue.keys().tolist() and x in tr.histories.of(u1)
    tr._sync_lifecycle((None, batch))
    assert x in tr.catalogue.keys().tolist() and x in tr.histories.of(u1)
    # Its push gives "x" a row again: the next sync checks it and keeps it.
    tr._commit(batch, tr._train(batch, tr._pull(batch)))
    assert _live(client, "item", ["x"]) == [True]
    time.sleep(0.01)  # past lifecycle_sync_s
    tr._sync_lifecycle()
    assert x in tr.catalogue.keys().tolist() and x in tr.histories.of(u1)


def test_an_item_kept_for_an_unpushed_batch_is_removed_in_full_if_it_gets_no_row():
    # Its tombstone is consumed by the sync that keeps it, so the next sync must check it
    # itself: here the batch is never pushed, and "x" must then leave the catalogue, every
    # history (u0 saw it before its eviction) and the shards' recent items.
    tr, client = _trainer({"item": {"max_rows": 2, "eviction": "lru"}})
    x = _evict_x(client)
    u0, u1 = (int(k) for k in keyed(["u0", "u1"]).keys)
    tr.histories.remember(np.asarray([u0], np.uint64), np.asarray([x], np.uint64))
    client.shard.record_recent(np.asarray([u0], np.uint64), np.asarray([x], np.uint64), np.asarray([7]))
    batch = tr._prepare(0, make_events([0], ["u1"], ["x"], [1.7e9], [1.0]), 1)
    tr._sync_lifecycle((batch,))
    assert x in tr.catalogue.keys().tolist() and x in tr.histories.of(u0) and x in tr.histories.of(u1)
    time.sleep(0.01)  # past lifecycle_sync_s
    tr._sync_lifecycle()
    assert x not in tr.catalogue.keys().tolist()
    assert x not in tr.histories.of(u0) and x not in tr.histories.of(u1)
    assert client.shard.recent_items(np.asarray([u0], np.uint64))[0].tolist() == []


@pytest.mark.parametrize("staleness", [0, 1])
def test_every_sync_in_a_run_is_given_the_batches_not_yet_committed(staleness, monkeypatch):
    # With read-ahead (prefetch, staleness 1) one or two batches are prepared and not yet
    # committed when the loop's sync runs; each must be among the batches it keeps.
    cfg = load_config(None, {"stream": {"num_events": 2000}, "ps": {"num_shards": 1, "tables": {"item": {"max_rows": 300}}},
                             "trainer": {"lifecycle_sync_s": 1e-6, "batch_size": 128, "staleness": staleness}})
    tr = Trainer(0, cfg, client=LocalClient(cfg.ps))
    open_batches: dict[int, object] = {}
    syncs: list[tuple[int, bool]] = []  # (batches open, all of them given)
    prepare, commit, sync = tr._prepare, tr._commit, tr._sync_lifecycle

    def _prepare(*args):
        batch = prepare(*args)
        open_batches[id(batch)] = batch
        return batch

    def _commit(batch, refs):
        open_batches.pop(id(batch), None)
        return commit(batch, refs)

    def _sync(unpushed=()):
        given = {id(b) for b in unpushed if b is not None}
        syncs.append((len(open_batches), set(open_batches) <= given))
        return sync(unpushed)

    monkeypatch.setattr(tr, "_prepare", _prepare)
    monkeypatch.setattr(tr, "_commit", _commit)
    monkeypatch.setattr(tr, "_sync_lifecycle", _sync)
    tr.run()
    assert len(syncs) > 5 and all(ok for _, ok in syncs), syncs
    assert max(n for n, _ in syncs) >= 1 + staleness  # read-ahead did leave batches open


def test_histories_of_users_the_user_table_never_admits_do_not_pile_up(monkeypatch):
    # Admission without max_rows leaves Histories uncapped, and the sync forgot only users
    # with a tombstone: every one-off user the user table never admitted kept their history
    # in the trainer (and its local-state snapshots) for good.
    cfg = load_config(None, {"stream": {"num_events": 10},
                             "ps": {"num_shards": 1, "recent_without_row_s": 60.0,
                                    "tables": {"user": {"admission": {"min_count": 2}}}},
                             "trainer": {"lifecycle_sync_s": 1.0}})
    client = LocalClient(cfg.ps)
    tr = Trainer(0, cfg, client=client)
    clock = [time.monotonic()]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])  # the sync's clock, stepped per cycle
    per_cycle, cycles, offset = 20, 30, 0
    regular = int(keyed(["regular"]).keys[0])
    for c in range(cycles):
        users = ["regular"] + [f"once-{c}-{j}" for j in range(per_cycle)]  # one-off users: never admitted
        n = len(users)
        tr.learn(make_events(np.arange(offset, offset + n), users, [f"i{j % 7}" for j in range(n)],
                             np.full(n, 1.7e9), np.ones(n)), offset + n)
        offset += n
        clock[0] += 61.0
        tr._sync_lifecycle()
        assert len(tr.histories) <= 2 * per_cycle + 1, (c, len(tr.histories))
    assert _live(client, "user", ["regular"]) == [True]
    assert len(tr.histories.of(regular)) > 0  # an admitted user keeps their session context
