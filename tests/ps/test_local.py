"""``LocalClient``: the in-process PS holds what the deployment's shards hold in all."""

from __future__ import annotations

import numpy as np

from ps.local import LocalClient
from ps.shard import PushId
from serving.config import load_config


def test_one_local_shard_holds_max_rows_times_num_shards():
    # max_rows is per shard: the twin held a deployment's cap on one shard's worth of rows,
    # so with a cap it trained on fewer rows than the PS it stands in for.
    cfg = load_config(None, {"ps": {"num_shards": 3, "tables": {"item": {"max_rows": 5}}}})
    client = LocalClient(cfg.ps)
    ids = list(range(40))
    client.push_async({"item": (ids, np.zeros((40, client.dims["item"]), np.float32))}, PushId("t", 0))
    assert int(client.pull_many({"item": ids})["item"][1].sum()) == 15
    assert cfg.ps.tables["item"].max_rows == 5  # the caller's config is left as it was
