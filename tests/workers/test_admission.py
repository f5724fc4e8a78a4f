import collections

import numpy as np

from ps.local import LocalClient
from serving.config import load_config
from workers.streams import open_source
from workers.trainer import Trainer


def test_admission_counts_each_batch_with_an_interaction_once_whatever_the_passes():
    # One-off users and items must cost no row: with 3 passes every pass's push used to
    # count, so min_count 2 and 3 admitted every ID on its first interaction.
    n, size = 3000, 256
    cfg = load_config(None, {
        "stream": {"num_events": n, "synthetic": {"num_users": 100_000, "num_items": 20_000, "session_mean": 1}},
        "trainer": {"passes": 3, "batch_size": size},
        "model": {"context_table": None},
        "ps": {"tables": {"user": {"admission": {"min_count": 2}}, "item": {"admission": {"min_count": 3}}}},
    })
    client = LocalClient(cfg.ps)
    Trainer(0, cfg, client=client).run()
    raw = open_source(cfg.stream).read(0, n)
    users, items = raw.column("user_id").to_numpy(), raw.column("item_id").to_numpy()
    weights = raw.column("weight").to_numpy()
    batches = {"user": collections.defaultdict(set), "item": collections.defaultdict(set)}
    for i in np.flatnonzero(weights > 0):
        batches["user"][users[i]].add(i // size)
        batches["item"][items[i]].add(i // size)
    for table, need in (("user", 2), ("item", 3)):
        ids = list(batches[table])
        seen = np.asarray([len(batches[table][x]) for x in ids])
        found = client.pull_many({table: ids})[table][1]
        assert (seen < need).sum() > 100 and (seen >= need).sum() > 0  # the stream tests both sides
        np.testing.assert_array_equal(found, seen >= need, err_msg=table)
