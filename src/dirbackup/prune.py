"""Backup retention ("prune"): which backups of one group to keep, exactly as Proxmox VE does.

The hypervisor lets users configure retention per storage or per backup job as a
`prune-backups` property string such as ``keep-last=3,keep-daily=7,keep-weekly=4``
and hands it to the storage plugin's `prune_backups`.  Operators compare what we
do with what every other PVE storage does (and with the GUI's prune simulator),
so the marks must be the ones PVE's `prune_mark_backup_group` would produce, down
to its quirks.  This module is that algorithm, written from its documented and
tested behaviour, with no I/O: the storage plugin lists a backup group (one guest,
one guest type), calls `mark`, and removes what is marked `remove`.

The rules, as PVE applies them:

* Backups are considered newest first.  Protected backups are marked `protected`
  up front; no rule keeps them, removes them or counts them.
* keep-last, keep-hourly, keep-daily, keep-weekly, keep-monthly and keep-yearly
  run in that order.  Each rule sees the *periods* of the backups (the ctime
  itself for keep-last; the local hour, day, ISO week, month or year otherwise).
  Periods that already hold a backup kept by an earlier rule are covered and
  skipped.  Walking the undecided backups newest first, the rule keeps the
  first backup of each new period until it has taken N periods; later backups
  of a period it took are marked `remove` at once, so later rules do not
  reconsider them (PVE does the same; it matters because an ISO week can span
  two months and two years).
* Whatever no rule kept is removed.  ``keep-all=1``, or no positive option at
  all, keeps everything (protected backups stay `protected`).

One addition of ours, off unless asked for (`future_after`): backups stamped
in the future are kept outside the rules (see `mark`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from dirbackup.errors import PruneOptionError

__all__ = ["KeepRules", "Mark", "PruneCandidate", "mark"]


class Mark(StrEnum):
    """What prune does with a backup; the values are the strings PVE's API returns.

    A StrEnum (a str *and* an Enum): marks compare equal to PVE's strings and
    also print and serialise as them (``f"{Mark.KEEP}"`` is ``keep``), so the
    storage plugin can hand them to the hypervisor unchanged.
    """

    KEEP = "keep"
    REMOVE = "remove"
    PROTECTED = "protected"


# (option name in the property string, attribute name), in the order PVE applies them.
_COUNT_OPTIONS: tuple[tuple[str, str], ...] = (
    ("keep-last", "keep_last"),
    ("keep-hourly", "keep_hourly"),
    ("keep-daily", "keep_daily"),
    ("keep-weekly", "keep_weekly"),
    ("keep-monthly", "keep_monthly"),
    ("keep-yearly", "keep_yearly"),
)
_KEEP_ALL = "keep-all"
_KNOWN_OPTIONS = (_KEEP_ALL, *(option for option, _ in _COUNT_OPTIONS))

# PVE's schema: counts are integers (an optional sign, ASCII digits) with minimum 0,
# keep-all is a boolean spelled as PVE::JSONSchema::parse_boolean accepts it.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_TRUE = frozenset({"1", "on", "yes", "true"})
_FALSE = frozenset({"0", "off", "no", "false"})


@dataclass(frozen=True)
class KeepRules:
    """A validated `prune-backups` setting.

    Every instance is valid (construction checks it), so code that receives a
    KeepRules never has to re-check: counts are non-negative ints and keep-all is
    not combined with a positive count (PVE rejects that combination as
    ambiguous).  `parse` and `from_mapping` also normalise like PVE's validator:
    a setting without any positive count *is* keep-all, and says so.
    """

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_all: bool = False

    def __post_init__(self) -> None:
        for option, attr in _COUNT_OPTIONS:
            value = getattr(self, attr)
            # bool is an int in Python, but True as a count is a caller's mistake.
            if isinstance(value, bool) or not isinstance(value, int):
                raise PruneOptionError(f"{option} must be a non-negative integer, got {value!r}")
            if value < 0:
                raise PruneOptionError(f"{option} must not be negative, got {value}")
        if not isinstance(self.keep_all, bool):
            raise PruneOptionError(f"{_KEEP_ALL} must be a boolean, got {self.keep_all!r}")
        if self.keep_all and self._positive_options():
            raise PruneOptionError(
                f"{_KEEP_ALL} cannot be set together with other options "
                f"({', '.join(self._positive_options())})"
            )

    @classmethod
    def parse(cls, text: str) -> KeepRules:
        """Parse a property string such as ``"keep-last=3,keep-daily=2"`` or ``"keep-all=1"``.

        Strict like PVE's schema, because a typo silently ignored here would
        remove backups the operator meant to keep: unknown options, duplicates,
        values that are not non-negative integers (or a boolean for keep-all) and
        parts without ``=`` raise PruneOptionError.  Empty parts (``"keep-last=1,"``)
        are skipped, as PVE does; nothing else is trimmed.
        """
        if not isinstance(text, str):
            raise PruneOptionError(f"prune-backups must be a string, got {text!r}")
        values: dict[str, str] = {}
        for part in text.split(","):
            if not part.strip():
                continue
            option, sep, value = part.partition("=")
            if not sep:
                raise PruneOptionError(
                    f"prune-backups {text!r}: {part!r} has no '=': expected option=value"
                )
            if not option or not value:
                raise PruneOptionError(
                    f"prune-backups {text!r}: {part!r} needs both an option and a value"
                )
            if option in values:
                raise PruneOptionError(f"prune-backups {text!r}: duplicate option {option!r}")
            values[option] = value
        return cls._build(values, f"prune-backups {text!r}")

    @classmethod
    def from_mapping(cls, opts: Mapping[str, int | str | bool]) -> KeepRules:
        """Build from the hash PVE passes to `prune_backups`, e.g. ``{'keep-last': 3}``.

        PVE's hashes come from its own parser, so counts may be ints or digit
        strings and keep-all a bool, 0/1 or a boolean word; the same validation
        as `parse` applies (unknown keys are errors, not ignored).
        """
        if not isinstance(opts, Mapping):
            raise PruneOptionError(f"prune options must be a mapping, got {opts!r}")
        for option in opts:
            if not isinstance(option, str):
                raise PruneOptionError(f"prune option names must be strings, got {option!r}")
        return cls._build(opts, f"prune options {dict(opts)!r}")

    @classmethod
    def _build(cls, values: Mapping[str, int | str | bool], where: str) -> KeepRules:
        """Validate raw option values and normalise like PVE's validate_prune_backups."""
        unknown = [option for option in values if option not in _KNOWN_OPTIONS]
        if unknown:
            raise PruneOptionError(
                f"{where}: unknown option {unknown[0]!r} (known: {', '.join(_KNOWN_OPTIONS)})"
            )
        counts = {
            attr: _to_count(option, values[option], where)
            for option, attr in _COUNT_OPTIONS
            if option in values
        }
        keep_all = _to_bool(_KEEP_ALL, values[_KEEP_ALL], where) if _KEEP_ALL in values else False
        if not any(counts.values()):
            return cls(keep_all=True)
        if keep_all:
            positive = [option for option, attr in _COUNT_OPTIONS if counts.get(attr)]
            raise PruneOptionError(
                f"{where}: {_KEEP_ALL} cannot be set together with other options "
                f"({', '.join(positive)})"
            )
        return cls(
            keep_last=counts.get("keep_last", 0),
            keep_hourly=counts.get("keep_hourly", 0),
            keep_daily=counts.get("keep_daily", 0),
            keep_weekly=counts.get("keep_weekly", 0),
            keep_monthly=counts.get("keep_monthly", 0),
            keep_yearly=counts.get("keep_yearly", 0),
        )

    def to_string(self) -> str:
        """The canonical property string: options in PVE's order, zero counts left out.

        A setting that keeps everything is written ``keep-all=1``, so that
        ``KeepRules.parse(r.to_string())`` means the same as ``r`` and is what
        `parse` itself returns for such settings.
        """
        if self.keeps_all:
            return f"{_KEEP_ALL}=1"
        return ",".join(
            f"{option}={getattr(self, attr)}"
            for option, attr in _COUNT_OPTIONS
            if getattr(self, attr) > 0
        )

    @property
    def keeps_all(self) -> bool:
        """True when prune removes nothing: keep-all is set or no count is positive.

        PVE treats an all-zero (or empty) setting as keep-all rather than
        "keep nothing"; removing every backup is never what such a setting means.
        """
        return self.keep_all or not self._positive_options()

    def _positive_options(self) -> list[str]:
        return [option for option, attr in _COUNT_OPTIONS if getattr(self, attr) > 0]


def _to_count(option: str, value: object, where: str) -> int:
    """A count as PVE's integer type with minimum 0 accepts it (bools are not counts)."""
    if isinstance(value, bool):
        raise PruneOptionError(f"{where}: {option} must be an integer, got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value):
        number = int(value)
    else:
        raise PruneOptionError(f"{where}: {option} must be an integer, got {value!r}")
    if number < 0:
        raise PruneOptionError(f"{where}: {option} must not be negative, got {value!r}")
    return number


def _to_bool(option: str, value: object, where: str) -> bool:
    """A boolean as PVE's property strings spell it: 1/on/yes/true or 0/off/no/false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise PruneOptionError(f"{where}: {option} must be a boolean (1 or 0), got {value!r}")


@dataclass(frozen=True)
class PruneCandidate:
    """One backup of a group, as the storage plugin lists it.

    `key` identifies it in the result (the volid); `ctime` is its creation time
    in epoch seconds, the time PVE's rules are computed from; `protected` backups
    are never removed and do not count towards any rule.
    """

    key: str
    ctime: int
    protected: bool = False

    def __post_init__(self) -> None:
        # A ctime read as a string or float from a manifest would sort and bucket
        # wrongly without any error; refuse it where the mistake is made.
        if isinstance(self.ctime, bool) or not isinstance(self.ctime, int):
            raise TypeError(f"ctime of {self.key!r} must be an int, got {self.ctime!r}")


# The periods of the calendar rules (keep-hourly .. keep-yearly, in the order of
# _COUNT_OPTIONS), from the local wall-clock time.  keep-last's period is the
# ctime itself.  The hour is the wall-clock hour, as in PVE: the hour repeated
# when clocks go back is one period.
_CALENDAR_PERIODS: tuple[Callable[[dt.datetime], Hashable], ...] = (
    lambda t: (t.year, t.month, t.day, t.hour),
    lambda t: (t.year, t.month, t.day),
    # ISO week *and* ISO week-year (%V/%G): Dec 30 2019 is in week 1 of 2020.
    lambda t: tuple(t.isocalendar())[:2],
    lambda t: (t.year, t.month),
    lambda t: t.year,
)


def _local_time(candidate: PruneCandidate, tz: dt.tzinfo | None) -> dt.datetime:
    """Wall-clock time of a ctime: the C library's localtime() for tz None, like PVE."""
    try:
        return dt.datetime.fromtimestamp(candidate.ctime, tz)
    except (OverflowError, OSError, ValueError) as exc:
        raise ValueError(
            f"ctime {candidate.ctime} of {candidate.key!r} is not a representable time"
        ) from exc


def mark(
    candidates: Sequence[PruneCandidate],
    rules: KeepRules,
    tz: dt.tzinfo | None = None,
    future_after: int | None = None,
) -> dict[str, Mark]:
    """Mark every backup of one group `keep`, `remove` or `protected`, as PVE would.

    The result maps each candidate's key to its mark, in the order of
    `candidates`.  Periods are computed in local time (tz None: the process's
    local time zone, like PVE's localtime(); pass a tzinfo to pin it).  The
    result does not depend on the order of `candidates`: backups with equal
    ctimes are taken in key order.  Note that PVE's keep-last counts distinct
    ctimes, so of several backups with the same ctime only one is kept by it.

    `future_after` (epoch seconds; None = PVE's behaviour) is our one
    addition: backups stamped later than it were made by a wrong clock, and
    are kept outside the rules -- like protected ones they take no slot and
    cover no period -- so that one of them never makes keep-last or a
    calendar rule remove the newest real backups.

    Raises ValueError if two candidates share a key, since the result could not
    tell them apart.
    """
    seen: set[str] = set()
    for candidate in candidates:
        if candidate.key in seen:
            raise ValueError(f"duplicate prune candidate key {candidate.key!r}")
        seen.add(candidate.key)

    if rules.keeps_all:
        return {c.key: Mark.PROTECTED if c.protected else Mark.KEEP for c in candidates}

    # Newest first; the key breaks ties so that input order cannot change the result.
    # Protected and future-stamped backups take no part: no rule keeps, removes or counts them.
    future = {c.key for c in candidates if future_after is not None and c.ctime > future_after}
    ordered = sorted(
        (c for c in candidates if not c.protected and c.key not in future),
        key=lambda c: (-c.ctime, c.key),
    )
    decided: dict[str, Mark] = {}
    _apply_rule(ordered, [c.ctime for c in ordered], rules.keep_last, decided)
    calendar_counts = [getattr(rules, attr) for _, attr in _COUNT_OPTIONS[1:]]
    if any(calendar_counts):
        local = [_local_time(c, tz) for c in ordered]
        for count, period in zip(calendar_counts, _CALENDAR_PERIODS, strict=True):
            if count > 0:
                _apply_rule(ordered, [period(t) for t in local], count, decided)

    return {
        c.key: Mark.PROTECTED
        if c.protected
        else Mark.KEEP
        if c.key in future
        else decided.get(c.key, Mark.REMOVE)
        for c in candidates
    }


def _apply_rule(
    ordered: Sequence[PruneCandidate],
    periods: Sequence[Hashable],
    count: int,
    decided: dict[str, Mark],
) -> None:
    """Apply one keep rule to `ordered` (newest first; `periods` parallel to it).

    Records the rule's marks in `decided`, which holds those of earlier rules.
    """
    if count <= 0:
        return
    covered = {p for c, p in zip(ordered, periods, strict=True) if decided.get(c.key) is Mark.KEEP}
    taken: set[Hashable] = set()
    for candidate, period in zip(ordered, periods, strict=True):
        if candidate.key in decided or period in covered:
            continue
        if period in taken:
            # An older backup of a period this rule already kept: out for good,
            # later rules must not pick it up for their own (coarser) periods.
            decided[candidate.key] = Mark.REMOVE
        elif len(taken) < count:
            taken.add(period)
            decided[candidate.key] = Mark.KEEP
        else:
            break
