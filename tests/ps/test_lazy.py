"""``ps.lazy``: a module imported by the first attribute read, once, whichever thread reads first
(what Serve replicas and the CLI then import without torch: ``tests/test_public_api.py``)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from ps.lazy import LazyModule


@pytest.fixture
def slow_module(tmp_path, monkeypatch):
    """A module ``freshet_slow_mod`` whose import takes 0.3 s and counts its runs in a file."""
    runs = tmp_path / "runs"
    (tmp_path / "freshet_slow_mod.py").write_text(
        "import time\n"
        f"with open({str(runs)!r}, 'a') as f:\n"
        "    f.write('x')\n"
        "time.sleep(0.3)\n"
        "VALUE = 42\n"
        "def double(x):\n"
        "    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield runs
    sys.modules.pop("freshet_slow_mod", None)


def test_the_module_is_imported_by_the_first_attribute_read_and_only_once(slow_module):
    lazy = LazyModule("freshet_slow_mod")
    assert "freshet_slow_mod" not in sys.modules and not slow_module.exists()
    assert lazy.VALUE == 42 and lazy.double(4) == 8
    assert lazy.module() is sys.modules["freshet_slow_mod"]
    assert slow_module.read_text() == "x"


def test_threads_reading_while_the_import_runs_wait_for_it(slow_module):
    # A lazy loader that swaps the module in before it has run (importlib.util.LazyLoader on
    # Python 3.11) gives the other threads an AttributeError here.
    lazy = LazyModule("freshet_slow_mod")
    got: list = []
    start = threading.Barrier(8)

    def read() -> None:
        start.wait()
        try:
            got.append(lazy.double(21))
        except Exception as e:  # noqa: BLE001 - recorded for the assertion
            got.append(e)

    threads = [threading.Thread(target=read) for _ in range(8)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == [42] * 8, got
    assert slow_module.read_text() == "x" and time.monotonic() - t0 >= 0.3


def test_a_module_that_is_not_installed_fails_at_the_first_read_naming_it():
    lazy = LazyModule("freshet_no_such_module")
    assert "freshet_no_such_module" in repr(lazy)
    with pytest.raises(ModuleNotFoundError, match="freshet_no_such_module"):
        lazy.anything


def test_dunder_probes_do_not_import():
    # copy, pickle and inspect look for __deepcopy__, __reduce_ex__ and the like on any object.
    lazy = LazyModule("freshet_no_such_module")
    assert not hasattr(lazy, "__wrapped__")
    with pytest.raises(AttributeError):
        lazy.__deepcopy__  # noqa: B018

