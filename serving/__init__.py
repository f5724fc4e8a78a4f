"""Freshet's Ray Serve ranking application and the ``freshet`` command line.

``build_app`` and ``run_app`` are imported on first use, so the command line starts
without loading Ray Serve.
"""

__all__ = ["build_app", "run_app"]


def __getattr__(name: str):
    if name in __all__:
        from serving import app

        return getattr(app, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
