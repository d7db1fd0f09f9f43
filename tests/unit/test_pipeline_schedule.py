"""Pipeline schedules and the simulator: structure, requirements, and the paper's Table 2 bubbles."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from dsv3.parallel.pipeline.schedule import (
    SCHEDULES,
    Action,
    Message,
    Schedule,
    make_schedule,
    table_bubble,
)
from dsv3.parallel.pipeline.simulator import Durations, peak_activations, simulate

# durations (F, B, W); FB given separately
GRID = [
    (F, B, W)
    for F, B, W in itertools.product((1.0, 1.5, 2.0, 3.0), (1.0, 2.0, 3.0, 4.0), (0.0, 0.5, 1.0, 1.5, 2.0))
    if W <= B
]


def _cases(name: str) -> list[tuple[int, int]]:
    if name in ("1f1b", "zb1p"):
        return [(p, n) for p in (1, 2, 3, 4, 6) for n in (p, p + 1, 2 * p + 3)]
    if name == "dualpipe":
        return [(p, n) for p in (2, 4, 6, 8) for n in (2 * p, 2 * p + 2, 3 * p + 2 * (p % 2))]
    return [(p, n) for p in (2, 4, 6, 8) for n in (p, p + 1, 2 * p + 3)]


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_chunk_has_one_forward_and_one_backward_on_its_rank(name):
    for pp, n in _cases(name):
        s = make_schedule(name, pp, n)  # validate(): placement, completeness, W after I, no deadlock
        counts = {k: 0 for k in ("F", "B", "I", "W")}
        for acts in s.actions:
            for a in acts:
                for p in a.parts():
                    counts[p.kind] += 1
        assert counts["F"] == n * s.num_stages
        assert counts["B"] + counts["I"] == n * s.num_stages
        assert counts["I"] == counts["W"]
        if name == "1f1b":
            assert counts["I"] == 0
        if name == "zb1p":
            assert counts["B"] == 0
        fo = s.forward_only().validate()
        assert all(a.kind == "F" for acts in fo.actions for a in acts)


def test_placement_of_the_four_schedules():
    assert make_schedule("1f1b", 4, 4).stages_of(2) == [2]
    dp = make_schedule("dualpipe", 4, 8)
    assert [dp.stages_of(r) for r in range(4)] == [[0, 3], [1, 2], [1, 2], [0, 3]]
    assert dp.holders(1) == [1, 2]
    assert dp.rank_of(0, 0) == 0 and dp.rank_of(4, 0) == 3  # second half of micro-batches enters at the end
    v = make_schedule("dualpipev", 8, 8)
    assert v.num_ranks == 4 and v.num_stages == 8
    assert [v.stages_of(r) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    # the fold (stage 3 -> 4) stays on the last device: no message on a channel for it
    assert all(m.stage != 4 or m.kind != "act" for msgs in v.channels().values() for m in msgs)


def test_dualpipe_mirror_ranks_run_the_same_program():
    s = make_schedule("dualpipe", 6, 14)
    half = s.num_microbatches // 2

    def mirrored(a: Action) -> Action:
        flip = lambda m: m + half if m < half else m - half  # noqa: E731
        if a.kind == "FB":
            return Action("FB", flip(a.mb), a.stage, flip(a.b_mb), a.b_stage)
        return Action(a.kind, flip(a.mb), a.stage)

    for r in range(3):
        assert [mirrored(a) for a in s.actions[r]] == list(s.actions[5 - r])


def test_dualpipe_and_dualpipev_share_one_engine():
    """DualPipe with 2C micro-batches and DualPipeV with C run the same programme: equal bubbles on the
    first half of DualPipe's ranks, for any durations."""
    for pp, c in ((4, 4), (6, 7), (8, 9)):
        dp, v = make_schedule("dualpipe", pp, 2 * c), make_schedule("dualpipev", pp, c)
        assert [[a.kind for a in acts] for acts in dp.actions[: pp // 2]] == [
            [a.kind for a in acts] for acts in v.actions
        ]
        for F, B, W in GRID[::7]:
            d = Durations(F, B, W, FB=F + B - 0.5 * min(F, B))
            assert simulate(v, d).bubble == pytest.approx(simulate(dp, d).bubble[: pp // 2])


def test_channels_carry_each_message_once():
    for name in SCHEDULES:
        s = make_schedule(name, 4, 8)
        sent = [m for msgs in s.channels().values() for m in msgs]
        assert len(sent) == len(set(sent))
        needed = {m for acts in s.actions for a in acts for m in s.incoming(a)}
        local = needed - set(sent)
        # messages not on a channel are hand-offs within a rank (only DualPipeV's fold)
        assert all(
            s.rank_of(m.mb, m.stage) == s.rank_of(m.mb, m.stage + (1 if m.kind == "grad" else -1))
            for m in local
        )
        assert (name == "dualpipev") == bool(local)
        assert all(isinstance(m, Message) for m in sent)


def test_requirements_are_checked_up_front():
    bad = [
        ("gpipe", 4, 8, "unknown pipeline schedule"),
        ("1f1b", 0, 8, "pp must be a positive integer"),
        ("1f1b", 4, 3, "at least pp=4"),
        ("zb1p", 4, 2, "at least pp=4"),
        ("dualpipe", 3, 12, "even pp"),
        ("dualpipe", 4, 9, "even number of micro-batches"),
        ("dualpipe", 4, 6, "at least 2*pp=8"),
        ("dualpipev", 5, 10, "even pp"),
        ("dualpipev", 8, 6, "at least pp=8"),
        ("1f1b", 2, 0, "positive integer"),
    ]
    for name, pp, n, msg in bad:
        with pytest.raises(ValueError, match=re.escape(msg)):
            make_schedule(name, pp, n)


def test_validate_rejects_broken_schedules():
    s = make_schedule("1f1b", 2, 2)
    # rank 1 wants the backward before its forward input ever arrives: a deadlock
    swapped = (s.actions[0], tuple(reversed(s.actions[1])))
    with pytest.raises(ValueError, match="deadlock|before its I"):
        Schedule(**{**s.__dict__, "actions": swapped}).validate()
    missing = (s.actions[0][:-1], s.actions[1])
    with pytest.raises(ValueError, match="needs one B"):
        Schedule(**{**s.__dict__, "actions": missing}).validate()
    wrong_rank = (s.actions[0] + (Action("F", 0, 1),), s.actions[1])
    with pytest.raises(ValueError, match="placed on"):
        Schedule(**{**s.__dict__, "actions": wrong_rank}).validate()


# ---------------------------------------------------------------------- bubbles
def test_1f1b_bubble_is_exact_on_every_rank():
    for (pp, n), (F, B, W) in itertools.product(_cases("1f1b"), GRID[::3]):
        r = simulate(make_schedule("1f1b", pp, n), Durations(F, B, W))
        assert r.bubble == pytest.approx([(pp - 1) * (F + B)] * pp)


def test_zb1p_bubble_is_exact_on_every_rank_when_w_is_small():
    exact = [(F, B, W) for F, B, W in GRID if min(F, B - W) >= W]
    assert len(exact) > 20
    for (pp, n), (F, B, W) in itertools.product(_cases("zb1p"), exact):
        r = simulate(make_schedule("zb1p", pp, n), Durations(F, B, W))
        assert r.bubble == pytest.approx([(pp - 1) * (F + B - 2 * W)] * pp)
    # outside the condition the formula is only an approximation (here W > F)
    r = simulate(make_schedule("zb1p", 4, 8), Durations(1.0, 4.0, 2.0))
    assert max(r.bubble) != pytest.approx(r.table_bubble)


@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
def test_dualpipe_bubble_formula_is_the_worst_rank(name):
    """(PP/2-1)(F&B+B-3W): the maximum over ranks, exact when F = B-W and W <= B-W, independent of the
    micro-batch count; middle ranks idle most."""
    hits = 0
    exact = [(F, B, W) for F, B, W in GRID if F == B - W and W <= B - W]
    for pp, n in _cases(name):
        s = make_schedule(name, pp, n)
        for F, B, W in exact:
            for FB in (F + B, F + B - 0.5 * min(F, B), max(F, B)):
                r = simulate(s, Durations(F, B, W, FB))
                hits += 1
                assert max(r.bubble) == pytest.approx((pp / 2 - 1) * (FB + B - 3 * W))
                assert r.bubble[0] <= r.bubble[pp // 2 - 1] + 1e-9  # the middle idles at least as much
    assert hits > 30
    # with other durations it is an approximation: F != B - W below
    r = simulate(make_schedule(name, 8, 16), Durations(1.0, 3.0, 1.0, 3.5))
    assert max(r.bubble) != pytest.approx(r.table_bubble)
    assert r.bubble[0] < r.bubble[3]


def test_bubbles_order_as_the_table_predicts():
    d = Durations(1.0, 2.0, 1.0, 2.5)
    pp, n = 8, 16
    b = {name: max(simulate(make_schedule(name, pp, n), d).bubble) for name in SCHEDULES}
    assert b["1f1b"] > b["zb1p"] > b["dualpipe"] == b["dualpipev"]
    assert b["zb1p"] == table_bubble("zb1p", pp, d.F, d.B, d.W, d.fb)


def test_activations_and_parameters_per_device_match_table_2():
    for pp in (2, 4, 8):
        one = simulate(make_schedule("1f1b", pp, 2 * pp))
        assert one.activations == [pp - r for r in range(pp)] and one.params == [1.0] * pp
        zb = simulate(make_schedule("zb1p", pp, 2 * pp))
        assert max(zb.activations) == pp and zb.params == [1.0] * pp
        dp = simulate(make_schedule("dualpipe", pp, 2 * pp + 2))
        assert max(dp.activations) == pp + 1 and dp.params == [2.0] * pp
        v = simulate(make_schedule("dualpipev", pp, pp + 3))
        assert max(v.activations) == pp + 1 and v.params == [2.0] * (pp // 2)
    assert peak_activations((Action("F", 0, 0), Action("FB", 1, 0, 0, 0), Action("B", 1, 0))) == 2


def test_durations_are_checked():
    for kw, msg in [
        ({"F": 0.0}, "must be > 0"),
        ({"B": -1.0}, ">= 0"),
        ({"B": 1.0, "W": 2.0}, "cannot exceed B"),
        ({"FB": 0.0}, "FB must be > 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Durations(**kw)
    assert Durations(1.0, 2.0, 0.5).fb == 3.0


def test_simulation_timeline_respects_dependencies_and_json():
    s = make_schedule("dualpipe", 4, 8)
    r = simulate(s, Durations(1.0, 2.0, 1.0, 2.5))
    end = {}
    for row in r.timeline:
        for prev, iv in zip([None] + row[:-1], row):
            assert prev is None or iv.start >= prev.end
            for p in iv.action.parts():
                end[(p.kind, p.mb, p.stage)] = iv.end
    for row in r.timeline:
        for iv in row:
            for p in iv.action.parts():
                if p.kind == "F" and p.stage > 0 and iv.action.kind == "F":
                    assert iv.start >= end[("F", p.mb, p.stage - 1)]
    d = json.loads(r.to_json())
    assert d["bubble"] == r.bubble and d["activations"] == r.activations and d["params"] == [2.0] * 4
    assert len(d["timeline"]) == 4
