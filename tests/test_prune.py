"""Prune marks: PVE's own scenarios, each rule, calendar edge cases, option parsing, properties."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator, Mapping
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirbackup.errors import DirbackupError, PruneOptionError
from dirbackup.prune import KeepRules, Mark, PruneCandidate, mark

K, R, P = Mark.KEEP, Mark.REMOVE, Mark.PROTECTED
UTC = dt.UTC
VIENNA = ZoneInfo("Europe/Vienna")
HOUR = 3600
DAY = 24 * HOUR


def at(text: str, tz: dt.tzinfo = UTC) -> int:
    """Epoch seconds of an ISO date-time string read in `tz`."""
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=tz).timestamp())


def marks_of(
    ctimes: list[int],
    rules: KeepRules,
    tz: dt.tzinfo | None = UTC,
    protected: frozenset[int] = frozenset(),
) -> list[Mark]:
    """Mark backups b0, b1, ... (ctimes in any order) and return the marks in that order."""
    cands = [PruneCandidate(f"b{i}", t, i in protected) for i, t in enumerate(ctimes)]
    result = mark(cands, rules, tz)
    assert list(result) == [c.key for c in cands]
    return [result[c.key] for c in cands]


# ----------------------------------------- PVE's scenarios (pve-storage prune_backups_test.pm)
# The data below are the facts of that test file: its backup lists and expected marks.  PVE groups
# backups by guest type and VMID and marks each group separately; the groups here are the qemu
# and lxc groups of one VMID (both VMIDs of the original have identical lists and results).  The
# original's "renamed" backups are not part of any group and are not ours to mark.

BASE = 1577881101  # 2020-01-01 12:18:21 UTC

QEMU_GROUP = [
    ("qemu-2018_05_26-11_18_21", BASE - 585 * DAY - HOUR, False),
    ("qemu-2019_12_31-11_18_21", BASE - DAY - HOUR, False),
    ("qemu-2019_12_31-11_18_51", BASE - DAY - HOUR + 30, True),
    ("qemu-2019_12_31-11_19_21", BASE - DAY - HOUR + 60, False),
    ("qemu-2020_01_01-11_18_21", BASE - HOUR, False),
    ("qemu-2020_01_01-12_18_21", BASE, False),
]
LXC_GROUP = [("lxc-2020_01_01-12_18_21", BASE, False)]

# keep options, then the marks of the five unprotected qemu backups (oldest first) and the lxc one.
PVE_DEFAULT_CASES: list[tuple[str, dict[str, int], str]] = [
    ("last=3", {"keep-last": 3}, "RRKKK K"),
    ("weekly=2", {"keep-weekly": 2}, "KRRRK K"),
    (
        "daily=weekly=monthly=1",
        {"keep-hourly": 0, "keep-daily": 1, "keep-weekly": 1, "keep-monthly": 1},
        "KRKRK K",
    ),
    ("hourly=4", {"keep-hourly": 4, "keep-daily": 0}, "KRKKK K"),
    (
        "yearly=2",
        {"keep-hourly": 0, "keep-daily": 0, "keep-weekly": 0, "keep-monthly": 0, "keep-yearly": 2},
        "RRKRK K",
    ),
    ("last=2,hourly=2", {"keep-last": 2, "keep-hourly": 2}, "KRKKK K"),
    ("last=1,monthly=2", {"keep-last": 1, "keep-monthly": 2}, "KRKRK K"),
    ("monthly=3", {"keep-monthly": 3}, "KRKRK K"),
    ("last=daily=weekly=1", {"keep-last": 1, "keep-daily": 1, "keep-weekly": 1}, "KRKRK K"),
    (
        "last=daily=weekly=1, others zero",
        {
            "keep-hourly": 0,
            "keep-last": 1,
            "keep-daily": 1,
            "keep-weekly": 1,
            "keep-monthly": 0,
            "keep-yearly": 0,
        },
        "KRKRK K",
    ),
    ("daily=2", {"keep-daily": 2}, "RRKRK K"),
    ("weekly=monthly=1", {"keep-weekly": 1, "keep-monthly": 1}, "KRRRK K"),
    ("weekly=yearly=1", {"keep-weekly": 1, "keep-yearly": 1}, "KRRRK K"),
    # PVE checks only the lxc group with keep-last=1; the qemu marks follow from keep-last=1.
    ("lxc only, last=1", {"keep-last": 1}, "RRRRK K"),
    ("all missing", {}, "KKKKK K"),
    # PVE's file spells one key "keep-monthyl"; its hash bypasses the schema there.  We validate
    # every hash (see test_from_mapping_rejects), so the intended key is used.
    (
        "all zero",
        {
            "keep-last": 0,
            "keep-hourly": 0,
            "keep-daily": 0,
            "keep-weekly": 0,
            "keep-monthly": 0,
            "keep-yearly": 0,
        },
        "KKKKK K",
    ),
    (
        "some zero, some missing",
        {"keep-last": 0, "keep-hourly": 0, "keep-daily": 0, "keep-monthly": 0, "keep-yearly": 0},
        "KKKKK K",
    ),
]


LETTER = {"K": K, "R": R}


def run_group(
    group: list[tuple[str, int, bool]], rules: KeepRules, tz: dt.tzinfo
) -> dict[str, Mark]:
    return mark([PruneCandidate(k, t, p) for k, t, p in group], rules, tz)


@pytest.mark.parametrize("tz", [UTC, VIENNA], ids=["UTC", "Vienna"])
@pytest.mark.parametrize(
    ("keep", "expected"), [c[1:] for c in PVE_DEFAULT_CASES], ids=[c[0] for c in PVE_DEFAULT_CASES]
)
def test_pve_default_list(keep: dict[str, int], expected: str, tz: dt.tzinfo) -> None:
    rules = KeepRules.from_mapping(keep)
    qemu = run_group(QEMU_GROUP, rules, tz)
    want = dict(zip([k for k, _, p in QEMU_GROUP if not p], expected[:5], strict=True))
    for key, _, protected in QEMU_GROUP:
        assert qemu[key] is (P if protected else LETTER[want[key]])
    lxc = run_group(LXC_GROUP, rules, tz)
    assert lxc == {"lxc-2020_01_01-12_18_21": LETTER[expected[-1]]}


@pytest.mark.parametrize("tz", [UTC, VIENNA], ids=["UTC", "Vienna"])
def test_pve_years_before_2000_and_after_2038(tz: dt.tzinfo) -> None:
    group = [("1970", 83, False), ("2070", DAY * (365 * 100 + 25) + 60, False)]
    assert run_group(group, KeepRules(keep_yearly=1), tz) == {"1970": R, "2070": K}


@pytest.mark.parametrize("tz", [UTC, VIENNA], ids=["UTC", "Vienna"])
def test_pve_threeway_month_already_covered_by_weekly(tz: dt.tzinfo) -> None:
    group = [("12_25", BASE - 7 * DAY, False), ("12_31", BASE - DAY, False), ("01_01", BASE, False)]
    got = run_group(group, KeepRules(keep_daily=1, keep_weekly=1, keep_monthly=1), tz)
    # Dec 31 is in the ISO week of Jan 1 (kept daily); Dec 25 is kept weekly and covers December.
    assert got == {"12_25": K, "12_31": R, "01_01": K}


@pytest.mark.parametrize("tz", [UTC, VIENNA], ids=["UTC", "Vienna"])
def test_pve_weekboundary(tz: dt.tzinfo) -> None:
    group = [
        ("2020_12_03", BASE + (366 - 31 + 2) * DAY, False),
        ("2020_12_04", BASE + (366 - 31 + 3) * DAY, False),
        ("2020_12_07", BASE + (366 - 31 + 6) * DAY, False),
    ]
    got = run_group(group, KeepRules(keep_daily=1, keep_weekly=1), tz)
    assert got == {"2020_12_03": R, "2020_12_04": K, "2020_12_07": K}


# ------------------------------------------------------------------------------ each rule alone


def test_keep_last_alone() -> None:
    ctimes = [100, 400, 300, 200, 500]
    assert marks_of(ctimes, KeepRules(keep_last=2)) == [R, K, R, R, K]
    assert marks_of(ctimes, KeepRules(keep_last=9)) == [K] * 5


def test_keep_hourly_alone() -> None:
    ctimes = [
        at("2024-05-01T10:05"),
        at("2024-05-01T10:55"),
        at("2024-05-01T11:00"),
        at("2024-05-01T08:59"),
        at("2024-04-30T11:30"),
    ]
    assert marks_of(ctimes, KeepRules(keep_hourly=2)) == [R, K, K, R, R]
    assert marks_of(ctimes, KeepRules(keep_hourly=4)) == [R, K, K, K, K]


def test_keep_daily_alone() -> None:
    ctimes = [
        at("2024-05-01T23:59:59"),
        at("2024-05-02T00:00"),
        at("2024-05-01T00:00"),
        at("2024-04-28T12:00"),
        at("2024-05-02T18:00"),
    ]
    assert marks_of(ctimes, KeepRules(keep_daily=2)) == [K, R, R, R, K]
    assert marks_of(ctimes, KeepRules(keep_daily=3)) == [K, R, R, K, K]


def test_keep_weekly_alone() -> None:
    # 2024-05-06 is a Monday: weeks run Monday to Sunday.
    ctimes = [
        at("2024-05-05T23:00"),
        at("2024-05-06T01:00"),
        at("2024-05-12T22:00"),
        at("2024-04-29T08:00"),
        at("2024-04-20T08:00"),
    ]
    assert marks_of(ctimes, KeepRules(keep_weekly=2)) == [K, R, K, R, R]
    assert marks_of(ctimes, KeepRules(keep_weekly=5)) == [K, R, K, R, K]


def test_keep_monthly_alone() -> None:
    ctimes = [
        at("2024-02-29T12:00"),
        at("2024-03-01T00:00"),
        at("2024-03-31T23:00"),
        at("2024-01-15T00:00"),
        at("2023-12-31T23:59"),
    ]
    assert marks_of(ctimes, KeepRules(keep_monthly=2)) == [K, R, K, R, R]
    assert marks_of(ctimes, KeepRules(keep_monthly=4)) == [K, R, K, K, K]


def test_keep_yearly_alone() -> None:
    ctimes = [
        at("2023-12-31T23:59"),
        at("2024-01-01T00:00"),
        at("2024-07-01T00:00"),
        at("2021-06-01T00:00"),
        at("2023-01-01T00:00"),
    ]
    assert marks_of(ctimes, KeepRules(keep_yearly=2)) == [K, R, K, R, R]
    assert marks_of(ctimes, KeepRules(keep_yearly=3)) == [K, R, K, K, R]


# --------------------------------------------------------------------------------- combinations


def test_later_rules_skip_periods_covered_by_earlier_ones() -> None:
    # keep-last keeps the two newest (same day); keep-daily then starts at the day before.
    ctimes = [
        at("2024-05-03T10:00"),
        at("2024-05-03T08:00"),
        at("2024-05-02T20:00"),
        at("2024-05-02T10:00"),
        at("2024-05-01T10:00"),
        at("2024-04-30T10:00"),
    ]
    assert marks_of(ctimes, KeepRules(keep_last=2, keep_daily=2)) == [K, K, K, R, K, R]


def test_typical_schedule_daily_backups_for_a_year() -> None:
    start = at("2023-01-01T02:00")
    ctimes = [start + i * DAY for i in range(365)]  # 2023-01-01 .. 2023-12-31
    rules = KeepRules.parse("keep-last=3,keep-daily=7,keep-weekly=4,keep-monthly=6,keep-yearly=1")
    got = marks_of(ctimes, rules)
    kept = {
        dt.datetime.fromtimestamp(t, UTC).date().isoformat()
        for t, m in zip(ctimes, got, strict=True)
        if m is K
    }
    assert kept == {
        "2023-12-31",
        "2023-12-30",
        "2023-12-29",  # last 3
        *(f"2023-12-{d}" for d in range(22, 29)),  # 7 more days
        "2023-12-17",
        "2023-12-10",
        "2023-12-03",
        "2023-11-26",  # Sundays of 4 more weeks
        "2023-10-31",
        "2023-09-30",
        "2023-08-31",
        "2023-07-31",
        "2023-06-30",
        "2023-05-31",
    }  # the year 2023 is covered already, so keep-yearly adds nothing
    assert got.count(K) == 3 + 7 + 4 + 6


def test_backup_dropped_by_an_earlier_rule_is_not_reconsidered() -> None:
    # PVE quirk, reproduced: Dec 31 2019 shares ISO week 2020-W01 with Jan 2, so keep-weekly
    # marks it `remove`; keep-yearly then keeps the next 2019 backup, not Dec 31.
    ctimes = [
        at("2020-01-02T12:00"),
        at("2019-12-31T12:00"),
        at("2019-06-01T12:00"),
        at("2018-06-01T12:00"),
    ]
    assert marks_of(ctimes, KeepRules(keep_weekly=1, keep_yearly=2)) == [K, R, K, K]
    # Same with months: Dec 31 is dropped by the weekly rule, Dec 20 is December's backup.
    ctimes = [
        at("2020-01-02T12:00"),
        at("2019-12-31T12:00"),
        at("2019-12-20T12:00"),
        at("2019-11-15T12:00"),
    ]
    assert marks_of(ctimes, KeepRules(keep_weekly=1, keep_monthly=2)) == [K, R, K, K]


# --------------------------------------------------------------------------------- protection


def test_protected_are_neither_removed_nor_counted() -> None:
    ctimes = [500, 400, 300, 200, 100]
    got = marks_of(ctimes, KeepRules(keep_last=2), protected=frozenset({0, 2}))
    assert got == [P, K, P, K, R]


def test_protected_backup_does_not_cover_its_period() -> None:
    ctimes = [at("2024-05-03T12:00"), at("2024-05-03T06:00"), at("2024-05-02T06:00")]
    got = marks_of(ctimes, KeepRules(keep_daily=1), protected=frozenset({0}))
    assert got == [P, K, R]


def test_all_protected() -> None:
    assert marks_of([1, 2, 3], KeepRules(keep_last=1), protected=frozenset({0, 1, 2})) == [P] * 3


@pytest.mark.parametrize("rules", [KeepRules(keep_all=True), KeepRules(), KeepRules.parse("")])
def test_keep_all_and_all_zero_keep_everything_but_stay_protected(rules: KeepRules) -> None:
    assert rules.keeps_all
    got = marks_of([10, 20, 20, 30], rules, protected=frozenset({1}))
    assert got == [K, P, K, K]


# -------------------------------------------------------------------------- calendar edge cases


def test_iso_week_belongs_to_iso_year_at_new_year() -> None:
    # Tue Dec 31 2019 and Mon Dec 30 2019 are in week 1 of 2020; Sun Dec 29 in week 52 of 2019.
    ctimes = [
        at("2020-01-01T08:00"),
        at("2019-12-31T08:00"),
        at("2019-12-30T08:00"),
        at("2019-12-29T08:00"),
        at("2019-12-23T08:00"),
    ]
    assert marks_of(ctimes, KeepRules(keep_weekly=2)) == [K, R, R, K, R]


def test_same_week_number_in_different_iso_years_are_different_weeks() -> None:
    # Both are "week 1" and both fall in calendar year 2019: week number with calendar year
    # (the %V/%Y mix-up PVE fixed in #3199) would merge them.
    ctimes = [at("2019-12-30T08:00"), at("2019-01-02T08:00")]
    assert marks_of(ctimes, KeepRules(keep_weekly=2)) == [K, K]


def test_week_53_spans_the_new_year() -> None:
    # 2020 has 53 ISO weeks: Mon Dec 28 2020 .. Sun Jan 3 2021.  Jan 4 2021 starts 2021-W01.
    ctimes = [
        at("2021-01-04T08:00"),
        at("2021-01-03T08:00"),
        at("2020-12-28T08:00"),
        at("2020-12-27T08:00"),
    ]
    assert marks_of(ctimes, KeepRules(keep_weekly=2)) == [K, K, R, R]
    assert marks_of(ctimes, KeepRules(keep_weekly=3)) == [K, K, R, K]


def test_periods_are_local_time() -> None:
    # 22:30 UTC on June 1 is already June 2 in Vienna (CEST, UTC+2).
    ctimes = [at("2020-06-02T10:00"), at("2020-06-01T22:30"), at("2020-06-01T12:00")]
    assert marks_of(ctimes, KeepRules(keep_daily=2), tz=VIENNA) == [K, R, K]
    assert marks_of(ctimes, KeepRules(keep_daily=2), tz=UTC) == [K, K, R]


def test_repeated_hour_when_clocks_go_back_is_one_hourly_period() -> None:
    # Vienna, 2020-10-25 03:00 CEST -> 02:00 CET (01:00 UTC): 02:30 happens twice.
    ctimes = [at("2020-10-25T01:30"), at("2020-10-25T00:30"), at("2020-10-24T23:30")]
    assert marks_of(ctimes, KeepRules(keep_hourly=2), tz=VIENNA) == [K, R, K]
    assert marks_of(ctimes, KeepRules(keep_hourly=2), tz=UTC) == [K, K, R]


def test_day_of_25_hours_is_one_daily_period() -> None:
    # 00:30 CEST and 23:30 CET on Oct 25 2020 are 24 hours apart yet on the same local day.
    ctimes = [at("2020-10-25T22:30"), at("2020-10-24T22:30"), at("2020-10-24T12:00")]
    assert marks_of(ctimes, KeepRules(keep_daily=2), tz=VIENNA) == [K, R, K]
    assert marks_of(ctimes, KeepRules(keep_daily=2), tz=UTC) == [K, K, R]


def test_skipped_hour_when_clocks_go_forward() -> None:
    # Vienna, 2020-03-29 02:00 CET -> 03:00 CEST (01:00 UTC): 01:59:59 and 03:00 are a second
    # apart but in different hours; 01:30 shares the hour of 01:59:59.
    ctimes = [at("2020-03-29T01:00"), at("2020-03-29T00:59:59"), at("2020-03-29T00:30")]
    assert marks_of(ctimes, KeepRules(keep_hourly=2), tz=VIENNA) == [K, K, R]


@pytest.fixture
def vienna_local_time() -> Iterator[None]:
    """Make the process's local time zone Europe/Vienna, as PVE's localtime() would see it."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Vienna"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.usefixtures("vienna_local_time")
def test_tz_none_uses_process_local_time() -> None:
    ctimes = [
        at("2020-10-25T01:30"),
        at("2020-10-25T00:30"),
        at("2020-10-24T23:30"),
        at("2020-06-01T22:30"),
        at("2020-06-01T12:00"),
    ]
    rules = KeepRules(keep_hourly=2, keep_daily=2)
    assert marks_of(ctimes, rules, tz=None) == marks_of(ctimes, rules, tz=VIENNA)
    assert marks_of(ctimes, rules, tz=None) == [K, R, K, K, K]
    assert marks_of(ctimes, rules, tz=UTC) == [K, K, K, K, R]


# ----------------------------------------------------------------------- equal ctimes, odd input


def test_equal_ctimes_count_once_for_keep_last_like_pve() -> None:
    # PVE's keep-last counts distinct ctimes: of b0/b1 (same second) only one is kept,
    # chosen by key so that the input order does not matter.
    assert marks_of([100, 100, 50], KeepRules(keep_last=1)) == [K, R, R]
    assert marks_of([100, 100, 50], KeepRules(keep_last=2)) == [K, R, K]
    cands = [PruneCandidate("b", 100), PruneCandidate("a", 100), PruneCandidate("c", 50)]
    assert mark(cands, KeepRules(keep_last=2)) == {"b": R, "a": K, "c": K}
    assert mark(cands[::-1], KeepRules(keep_last=2)) == {"b": R, "a": K, "c": K}


def test_equal_ctimes_in_a_calendar_rule() -> None:
    assert marks_of([100, 100], KeepRules(keep_daily=3)) == [K, R]


def test_empty_input() -> None:
    assert mark([], KeepRules(keep_last=3)) == {}
    assert mark([], KeepRules(keep_all=True)) == {}


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate prune candidate key 'x'"):
        mark([PruneCandidate("x", 1), PruneCandidate("x", 2)], KeepRules(keep_last=1))


def test_ctime_must_be_an_int() -> None:
    with pytest.raises(TypeError, match="ctime of 'x' must be an int"):
        PruneCandidate("x", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        PruneCandidate("x", "1700000000")  # type: ignore[arg-type]


def test_unrepresentable_ctime() -> None:
    cands = [PruneCandidate("far", 10**18), PruneCandidate("now", 1_700_000_000)]
    with pytest.raises(ValueError, match="ctime 1000000000000000000 of 'far'"):
        mark(cands, KeepRules(keep_daily=1))
    # keep-last needs no calendar, so it still works
    assert mark(cands, KeepRules(keep_last=1)) == {"far": K, "now": R}


# ------------------------------------------------------------------------------- option parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "keep-last=3,keep-daily=7,keep-weekly=4",
            KeepRules(keep_last=3, keep_daily=7, keep_weekly=4),
        ),
        (
            "keep-hourly=24,keep-monthly=12,keep-yearly=10",
            KeepRules(keep_hourly=24, keep_monthly=12, keep_yearly=10),
        ),
        ("keep-yearly=1,keep-last=2", KeepRules(keep_last=2, keep_yearly=1)),
        ("keep-last=1,", KeepRules(keep_last=1)),
        (",keep-last=1,,", KeepRules(keep_last=1)),
        ("keep-last=+007", KeepRules(keep_last=7)),
        ("keep-all=0,keep-last=2", KeepRules(keep_last=2)),
        ("keep-all=1", KeepRules(keep_all=True)),
        ("keep-all=yes", KeepRules(keep_all=True)),
        ("keep-all=TRUE", KeepRules(keep_all=True)),
        ("keep-all=1,keep-last=0", KeepRules(keep_all=True)),
        ("keep-all=0", KeepRules(keep_all=True)),  # nothing positive: PVE keeps all
        ("keep-last=0,keep-daily=0", KeepRules(keep_all=True)),
        ("", KeepRules(keep_all=True)),
    ],
)
def test_parse(text: str, expected: KeepRules) -> None:
    assert KeepRules.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keep-lats=1", "unknown option 'keep-lats'"),
        ("keep-monthyl=0", "unknown option 'keep-monthyl'"),
        ("Keep-Last=1", "unknown option 'Keep-Last'"),
        (" keep-last=1", "unknown option ' keep-last'"),
        ("keep-last=-1", "keep-last must not be negative"),
        ("keep-weekly=1.5", "keep-weekly must be an integer, got '1.5'"),
        ("keep-daily=abc", "keep-daily must be an integer"),
        ("keep-daily= 1", "keep-daily must be an integer"),
        ("keep-daily=\u0663", "keep-daily must be an integer"),  # Arabic-Indic three
        ("keep-last=1;keep-daily=2", "keep-last must be an integer"),
        ("keep-last==1", "keep-last must be an integer"),
        ("keep-last=", "needs both an option and a value"),
        ("=1", "needs both an option and a value"),
        ("keep-last", "has no '='"),
        ("keep-last=1,keep-last=2", "duplicate option 'keep-last'"),
        ("keep-last=1,keep-last=1", "duplicate option 'keep-last'"),
        ("keep-all=1,keep-weekly=2", "keep-all cannot be set together with other options"),
        ("keep-all=2", "keep-all must be a boolean"),
        ("keep-all=maybe", "keep-all must be a boolean"),
    ],
)
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(PruneOptionError, match=message.replace("(", r"\(")) as info:
        KeepRules.parse(text)
    assert isinstance(info.value, DirbackupError)
    assert isinstance(info.value, ValueError)
    assert repr(text) in str(info.value)  # the message names the offending setting


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        ({"keep-last": 3}, KeepRules(keep_last=3)),
        ({"keep-last": "3", "keep-daily": 2, "keep-all": 0}, KeepRules(keep_last=3, keep_daily=2)),
        ({"keep-all": True}, KeepRules(keep_all=True)),
        ({"keep-all": "1"}, KeepRules(keep_all=True)),
        ({"keep-yearly": 0}, KeepRules(keep_all=True)),
        ({}, KeepRules(keep_all=True)),
    ],
)
def test_from_mapping(opts: Mapping[str, int | str | bool], expected: KeepRules) -> None:
    assert KeepRules.from_mapping(opts) == expected


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        ({"keep-monthyl": 0}, "unknown option 'keep-monthyl'"),
        ({"keep_last": 1}, "unknown option 'keep_last'"),
        ({"keep-last": True}, "keep-last must be an integer, got True"),
        ({"keep-last": -2}, "keep-last must not be negative"),
        ({"keep-last": 2.0}, "keep-last must be an integer, got 2.0"),
        ({"keep-last": None}, "keep-last must be an integer, got None"),
        ({"keep-all": 1, "keep-daily": 1}, "keep-all cannot be set together"),
        ({"keep-all": 5}, "keep-all must be a boolean"),
    ],
)
def test_from_mapping_rejects(opts: Mapping[str, int | str | bool], message: str) -> None:
    with pytest.raises(PruneOptionError, match=message):
        KeepRules.from_mapping(opts)


def test_constructor_validates() -> None:
    with pytest.raises(PruneOptionError, match="keep-last must not be negative"):
        KeepRules(keep_last=-1)
    with pytest.raises(PruneOptionError, match="keep-daily must be a non-negative integer"):
        KeepRules(keep_daily=True)
    with pytest.raises(PruneOptionError, match="keep-weekly must be a non-negative integer"):
        KeepRules(keep_weekly="2")  # type: ignore[arg-type]
    with pytest.raises(PruneOptionError, match=r"cannot be set together .*\(keep-last\)"):
        KeepRules(keep_all=True, keep_last=1)
    with pytest.raises(PruneOptionError, match="keep-all must be a boolean"):
        KeepRules(keep_all=1)  # type: ignore[arg-type]


def test_to_string() -> None:
    assert KeepRules(keep_yearly=1, keep_last=3).to_string() == "keep-last=3,keep-yearly=1"
    assert KeepRules(keep_all=True).to_string() == "keep-all=1"
    assert KeepRules().to_string() == "keep-all=1"
    assert KeepRules.parse("keep-weekly=4,keep-daily=007").to_string() == (
        "keep-daily=7,keep-weekly=4"
    )


def test_keeps_all() -> None:
    assert KeepRules().keeps_all
    assert KeepRules(keep_all=True).keeps_all
    assert not KeepRules(keep_monthly=1).keeps_all


def test_mark_values_are_pve_strings() -> None:
    assert [m.value for m in Mark] == ["keep", "remove", "protected"]
    assert Mark.KEEP == "keep"


# --------------------------------------------------------------------------------- properties

counts = st.integers(min_value=0, max_value=4)
rules_st = st.builds(
    KeepRules,
    keep_last=counts,
    keep_hourly=counts,
    keep_daily=counts,
    keep_weekly=counts,
    keep_monthly=counts,
    keep_yearly=counts,
)
# Backups bunched within hours, weeks and years, so that periods hold several of them.
START = at("2018-11-20T00:00")
offsets = st.one_of(
    st.integers(0, 3 * HOUR), st.integers(0, 60 * DAY), st.integers(0, 4 * 365 * DAY)
)


@st.composite
def candidate_lists(draw: st.DrawFn, unique_ctimes: bool = False) -> list[PruneCandidate]:
    ctimes = draw(st.lists(offsets, max_size=30, unique=unique_ctimes))
    flags = draw(st.lists(st.booleans(), min_size=len(ctimes), max_size=len(ctimes)))
    return [
        PruneCandidate(f"v{i:02}", START + t, p)
        for i, (t, p) in enumerate(zip(ctimes, flags, strict=True))
    ]


@settings(max_examples=150, deadline=None)
@given(cands=candidate_lists(), rules=rules_st, data=st.data())
def test_property_general(
    cands: list[PruneCandidate], rules: KeepRules, data: st.DataObject
) -> None:
    got = mark(cands, rules, UTC)
    assert list(got) == [c.key for c in cands]  # every candidate, in input order
    for c in cands:
        assert (got[c.key] is P) == c.protected  # protected never REMOVE (nor KEEP)
    if rules.keeps_all:
        assert R not in got.values()
    else:
        total = sum(
            (
                rules.keep_last,
                rules.keep_hourly,
                rules.keep_daily,
                rules.keep_weekly,
                rules.keep_monthly,
                rules.keep_yearly,
            )
        )
        assert list(got.values()).count(K) <= total
    shuffled = data.draw(st.permutations(cands))
    assert mark(shuffled, rules, UTC) == got


@settings(max_examples=150, deadline=None)
@given(cands=candidate_lists(unique_ctimes=True), rules=rules_st, n=st.integers(1, 6))
def test_property_keep_last_keeps_the_n_newest(
    cands: list[PruneCandidate], rules: KeepRules, n: int
) -> None:
    rules = KeepRules(**{**rules.__dict__, "keep_last": n, "keep_all": False})
    got = mark(cands, rules, UTC)
    newest = sorted((c for c in cands if not c.protected), key=lambda c: -c.ctime)[:n]
    assert all(got[c.key] is K for c in newest)


def _utc(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, UTC)


# Period of each rule, written independently of the implementation (strftime %G/%V like PVE).
ORACLE_PERIODS = {
    "keep_last": lambda t: t,
    "keep_hourly": lambda t: _utc(t).strftime("%Y-%m-%d %H"),
    "keep_daily": lambda t: _utc(t).strftime("%Y-%m-%d"),
    "keep_weekly": lambda t: _utc(t).strftime("%G-%V"),
    "keep_monthly": lambda t: _utc(t).strftime("%Y-%m"),
    "keep_yearly": lambda t: _utc(t).strftime("%Y"),
}


@settings(max_examples=200, deadline=None)
@given(cands=candidate_lists(), rule=st.sampled_from(sorted(ORACLE_PERIODS)), n=st.integers(1, 5))
def test_property_single_rule_keeps_newest_of_the_n_newest_periods(
    cands: list[PruneCandidate], rule: str, n: int
) -> None:
    got = mark(cands, KeepRules(**{rule: n}), UTC)
    period = ORACLE_PERIODS[rule]
    best: dict[object, PruneCandidate] = {}
    for c in cands:
        if c.protected:
            continue
        p = period(c.ctime)
        if p not in best or (c.ctime, best[p].key) > (best[p].ctime, c.key):
            best[p] = c
    chosen = sorted(best.values(), key=lambda c: -c.ctime)[:n]
    assert {k for k, m in got.items() if m is K} == {c.key for c in chosen}


@settings(max_examples=100, deadline=None)
@given(rules=rules_st)
def test_property_to_string_round_trips(rules: KeepRules) -> None:
    again = KeepRules.parse(rules.to_string())
    assert again.keeps_all == rules.keeps_all
    if not rules.keeps_all:
        assert again == rules
    assert (
        KeepRules.from_mapping(dict(part.split("=") for part in rules.to_string().split(",")))
        == again
    )


# ----------------------------------------- backups stamped in the future (our addition)


def test_future_stamped_backup_takes_no_slot() -> None:
    """One backup stamped a year ahead (a wrong clock) must not make keep-last
    or keep-daily remove the newest real backups: it is kept outside the rules."""
    now = at("2024-06-10T12:00")
    ctimes = [now - 3 * DAY, now - 2 * DAY, now - DAY, now, now + 365 * DAY]
    for rules, expected in (
        (KeepRules(keep_last=1), [R, R, R, K, K]),
        (KeepRules(keep_daily=2), [R, R, K, K, K]),
        (KeepRules(keep_last=1, keep_monthly=1), [R, R, R, K, K]),
    ):
        cands = [PruneCandidate(f"b{i}", t) for i, t in enumerate(ctimes)]
        assert list(mark(cands, rules, UTC, future_after=now + DAY).values()) == expected
    # PVE's own behaviour (no horizon): the future backup takes the slot
    cands = [PruneCandidate(f"b{i}", t) for i, t in enumerate(ctimes)]
    assert list(mark(cands, KeepRules(keep_last=1), UTC).values()) == [R, R, R, R, K]
    # protected stays protected; keep-all keeps all; only later than the horizon counts
    cands = [PruneCandidate("a", now), PruneCandidate("b", now + 2 * DAY, True)]
    assert mark(cands, KeepRules(keep_last=1), UTC, future_after=now + DAY) == {"a": K, "b": P}
    cands = [PruneCandidate("a", now), PruneCandidate("b", now + DAY)]
    assert mark(cands, KeepRules(keep_last=1), UTC, future_after=now + DAY) == {"a": R, "b": K}


@settings(max_examples=150, deadline=None)
@given(cands=candidate_lists(), rules=rules_st, futures=st.lists(offsets, max_size=5))
def test_property_future_stamped_backups_change_no_other_mark(
    cands: list[PruneCandidate], rules: KeepRules, futures: list[int]
) -> None:
    horizon = START + 4 * 365 * DAY
    ahead = [PruneCandidate(f"f{i}", horizon + 1 + t) for i, t in enumerate(futures)]
    got = mark(cands + ahead, rules, UTC, future_after=horizon)
    assert {k: got[k] for k in (c.key for c in cands)} == mark(cands, rules, UTC)
    assert all(got[c.key] is K for c in ahead)
