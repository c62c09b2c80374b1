"""The machine's windows against the simplest model of them: a list of outcomes.

The count window is a ring of bytes filled on first use; whatever mix of
single outcomes and batches of successes it sees, it must hold exactly the
last ``size`` outcomes, in order, with totals that match them.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from breakerd.actor._windows import CountWindow, TimeWindow

OUTCOME = st.tuples(st.booleans(), st.booleans())
STEP = st.one_of(
    OUTCOME.map(lambda outcome: ("add", outcome)),
    st.integers(1, 40).map(lambda count: ("successes", count)),
)


@settings(max_examples=300)
@given(size=st.integers(1, 12), steps=st.lists(STEP, max_size=60))
def test_a_count_window_holds_the_last_size_outcomes(
    size: int, steps: list[tuple[str, object]]
) -> None:
    window = CountWindow(size)
    model: list[int] = []
    for kind, arg in steps:
        if kind == "add":
            assert isinstance(arg, tuple)
            failed, slow = arg
            window.add(failed, slow, 0.0)
            model.append(int(failed) | (int(slow) << 1))
        else:
            assert isinstance(arg, int)
            window.add_successes(arg, 0.0)
            model.extend([0] * arg)
        model = model[-size:]
        assert window.outcomes() == bytes(model)
        assert window.total == len(model)
        assert window.failures == sum(item & 1 for item in model)
        assert window.slow == sum(item >> 1 for item in model)
    restored = CountWindow(size)
    restored.restore(window.export())
    assert restored.outcomes() == window.outcomes()
    assert (restored.total, restored.failures, restored.slow) == (
        window.total,
        window.failures,
        window.slow,
    )


def test_an_unused_window_holds_no_buffer() -> None:
    count, time = CountWindow(100), TimeWindow(60.0)
    assert count.outcomes() == b""
    assert count.export() == {"items": ""}
    assert time.export() == {"buckets": []}
    time.expire(1_000.0)
    assert time.successes_safe(lambda failures, slow, total: True)
    # The shared empty placeholder is never written to.
    time.add(True, False, 5.0)
    assert TimeWindow(60.0).export() == {"buckets": []}
    assert time.export() == {"buckets": [[5, 1, 1, 0]]}
