"""A worker's share of the proxy listener accepts one connection per reactor turn."""

from __future__ import annotations

from equalizer.proxy.site import accept_in_turn


class GreedyPort:
    """Twisted's ``Port.doRead`` loop, reduced to its bookkeeping: it accepts up to
    ``numberAccepts`` waiting connections and grows the limit when the loop ran full."""

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        self.numberAccepts = 100
        self.turns: list[int] = []

    def doRead(self) -> None:
        accepted = min(self.numberAccepts, self.waiting)
        self.waiting -= accepted
        self.turns.append(accepted)
        if accepted == self.numberAccepts:
            self.numberAccepts += 20


def test_a_burst_is_taken_one_connection_per_turn():
    port = GreedyPort(waiting=64)
    accept_in_turn(port)
    for _ in range(3):
        port.doRead()
    assert port.turns == [1, 1, 1]
    assert port.waiting == 61


def test_without_it_the_first_turn_takes_the_whole_burst():
    port = GreedyPort(waiting=64)
    port.doRead()
    assert port.turns == [64]
