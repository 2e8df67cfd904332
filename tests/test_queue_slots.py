"""SessionQueue with several slots and the affinity promotion: pure, driven by a fake clock."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clock_support import FakeClock  # noqa: E402
from remote_lab import SessionQueue  # noqa: E402

A, B, C = "a" * 64, "b" * 64, "c" * 64  # fingerprints of three topologies


@pytest.fixture
def clock():
    return FakeClock()


def queue(clock, slots=1, **kw):
    ids = iter("s%02d" % i for i in range(100))
    overtakes = []
    q = SessionQueue(600, 300, 100, clock, new_id=lambda: next(ids), slots=slots,
                     on_overtake=lambda s, ahead, f: overtakes.append(
                         (s.id, [x.id for x in ahead], f)), **kw)
    q.overtakes = overtakes
    return q


def join(q, fingerprint=None):
    return q.create({"fingerprint": fingerprint} if fingerprint else None)[0]


def test_several_sessions_are_active_at_once_each_in_its_own_slot(clock):
    q = queue(clock, slots=3)
    a, b, c, d, e = (join(q) for _ in range(5))
    assert [q.state(s, touch=False) for s in (a, b, c, d, e)] == [
        ("active", 0), ("active", 0), ("active", 0), ("waiting", 1), ("waiting", 2)]
    assert q.active_ids() == {1: a, 2: b, 3: c} and q.active_id() == a  # the oldest
    assert [q.slot_of(s) for s in (a, b, c, d, e)] == [1, 2, 3, None, None]
    q.remove(b)  # slot 2 frees: the first waiting session gets it
    assert q.slot_of(d) == 2 and q.state(e, touch=False) == ("waiting", 1)
    q.remove(a)
    assert q.slot_of(e) == 1 and q.active_id() == c  # c became active before d and e
    assert [s["slot"] for s in q.snapshot()] == [3, 2, 1]
    assert [s["position"] for s in q.snapshot()] == [0, 0, 0]


def test_silent_sessions_expire_in_every_slot(clock):
    q = queue(clock, slots=2)
    a, b, c = join(q), join(q), join(q)
    clock.advance(200)
    q.touch(a)
    q.touch(c)
    clock.advance(150)
    assert q.expire() == [(b, True)]  # b active and silent 350 s > 300
    assert q.slot_of(c) == 2


def test_a_warm_lab_goes_to_the_earliest_waiter_that_declared_it(clock):
    q = queue(clock, slots=1)
    holder = join(q, A)
    q.set_warm(1, A)  # its lab runs A and would be kept warm
    wants_b, wants_c, wants_a, wants_a2 = join(q, B), join(q, C), join(q, A), join(q, A)
    q.remove(holder)
    assert q.slot_of(wants_a) == 1  # ahead of B and C
    assert q.overtakes == [(wants_a, [wants_b, wants_c], A)]
    assert q.state(wants_b, touch=False) == ("waiting", 1)
    assert q.state(wants_a2, touch=False) == ("waiting", 3)


def test_nobody_is_overtaken_more_than_max_overtake_times(clock):
    q = queue(clock, slots=1, max_overtake=2)
    q.set_warm(1, A)
    first = join(q, A)
    wants_b = join(q, B)
    for _ in range(4):  # four more sessions want the warm lab A, one after the other
        join(q, A)
    got = []
    for _ in range(3):
        holder = q.active_ids()[1]
        q.remove(holder)
        got.append(q.active_ids()[1])
    assert got[2] == wants_b  # overtaken twice, then its turn: A's third taker waits
    assert [len(ahead) for _, ahead, _ in q.overtakes] == [1, 1]
    assert first not in q.active_ids().values()


def test_max_overtake_0_is_strict_fifo(clock):
    q = queue(clock, slots=1, max_overtake=0)
    holder = join(q, A)
    q.set_warm(1, A)
    wants_b, wants_a = join(q, B), join(q, A)
    q.remove(holder)
    assert q.slot_of(wants_b) == 1 and q.overtakes == []
    assert q.state(wants_a, touch=False) == ("waiting", 1)


def test_the_default_bound_is_twice_the_slots(clock):
    assert queue(clock, slots=3).max_overtake == 6
    assert queue(clock).max_overtake == 2


def test_a_session_that_waited_half_the_waiting_timeout_is_not_overtaken(clock):
    q = queue(clock, slots=1)
    holder = join(q, A)
    q.set_warm(1, A)
    wants_b = join(q, B)
    clock.advance(301)  # waited longer than 600 / 2
    q.touch(holder)
    q.touch(wants_b)
    wants_a = join(q, A)
    q.remove(holder)
    assert q.slot_of(wants_b) == 1 and q.overtakes == []
    assert q.state(wants_a, touch=False) == ("waiting", 1)


def test_a_free_slot_is_chosen_for_the_warm_lab_its_session_declared(clock):
    q = queue(clock, slots=3)
    q.set_warm(2, B)  # slot 2 keeps B warm, slot 3 keeps C warm, slot 1 has no lab
    q.set_warm(3, C)
    assert q.slot_of(join(q, C)) == 3
    assert q.slot_of(join(q)) == 1  # no declaration: the slot without a warm lab
    assert q.slot_of(join(q, A)) == 2  # only slot 2 is left


def test_an_active_session_takes_over_a_free_slots_warm_lab(clock):
    q = queue(clock, slots=2)
    q.set_warm(2, B)
    a = join(q)
    assert q.slot_of(a) == 1
    assert q.take_warm_slot(a, A) is None  # nobody keeps A warm
    assert q.take_warm_slot(a, B) == 2 and q.slot_of(a) == 2
    assert q.slot_of(join(q)) == 1  # slot 1 is free again


def test_restore_keeps_each_active_sessions_slot(clock):
    q = queue(clock, slots=2)
    q.restore([("a", 50.0, 40.0, {}, 2), ("b", 40.0, None, {}, None),
               ("c", 30.0, 20.0, {}, 2), ("d", 20.0, None, {}, None)])
    assert q.active_ids() == {2: "a", 1: "b"}  # c's slot was taken: it waits again
    assert q.state("c", touch=False) == ("waiting", 1)
    assert q.state("d", touch=False) == ("waiting", 2)


def test_estimated_waits_count_every_slot(clock):
    q = queue(clock, slots=2)
    for _ in range(2):  # history: holds of 100 s
        s = join(q)
        clock.advance(100)
        q.remove(s)
    join(q), join(q)  # both slots busy
    clock.advance(40)
    w1, w2, w3 = join(q), join(q), join(q)
    assert q.waits() == [0.0, 0.0, 60.0, 60.0, 160.0]
    assert [q.eta(q.state(s, touch=False)[1]) for s in (w1, w2, w3)] == [60.0, 60.0, 160.0]


def test_a_restore_with_fewer_slots_ends_the_sessions_whose_slot_is_gone(clock):
    from remote_lab import UnknownSession
    q = queue(clock, slots=2)
    ended = q.restore([("a", 50.0, 40.0, {}, 1), ("b", 40.0, 30.0, {}, 3),
                       ("c", 30.0, None, {}, None)])
    assert [sid for sid, _ in ended] == ["b"]
    assert "restarted with --slots 2: slot 3, which it held, and its lab are gone" in ended[0][1]
    assert q.active_ids() == {1: "a", 2: "c"}
    with pytest.raises(UnknownSession) as e:
        q.state("b")
    assert e.value.args[1] == ended[0][1]  # its 404 says why
