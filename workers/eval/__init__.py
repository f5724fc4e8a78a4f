"""Prequential (test-then-train) evaluation of update strategies, behind ``freshet eval``:

- :mod:`workers.eval.protocol`: the protocol and its metrics (recall@k, NDCG, staleness,
  windowed recall, recovery after a shift);
- :mod:`workers.eval.strategies`: incremental (the real PS and trainer), popularity,
  frozen, full retrain, fine-tune and ALS;
- :mod:`workers.eval.report`: ``report.json``, ``report.md`` and the plots;
- :mod:`workers.eval.compare`: :func:`run_eval`, every strategy on one stream, then the report.

It lives in ``workers`` because it drives the trainer's own code and the ``/rank`` ranker.
"""

from workers.eval.compare import run_eval
from workers.eval.protocol import EvalResult, prequential
from workers.eval.strategies import STRATEGIES, make_strategy

__all__ = ["STRATEGIES", "EvalResult", "make_strategy", "prequential", "run_eval"]
