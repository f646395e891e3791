"""`is_quiet_filter`: the protocol check the response path makes per exchange, kept per
class, gives what `isinstance(f, QuietFilter)` gives."""

from __future__ import annotations

from extproc.policy import QuietFilter, is_quiet_filter


class Plain:
    """A stream filter without the pre-check."""

    oldest_held = None

    def process(self, events, end):
        return events


class Quiet(Plain):
    def take(self, text: str) -> bool:
        return True


class HalfQuiet(Plain):
    def quiet(self, text: str) -> bool:  # no `take`: not a QuietFilter
        return True


def test_it_answers_as_isinstance_does_every_time():
    for f in (Plain(), Quiet(), HalfQuiet(), Quiet(), Plain()):
        assert is_quiet_filter(f) is isinstance(f, QuietFilter)
    assert [is_quiet_filter(f) for f in (Plain(), Quiet(), HalfQuiet())] == [False, True, False]
