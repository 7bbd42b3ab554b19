"""The site's privacy ledger: an append-only record of every round's privacy spending.

One JSON object per line, one line per release (a trained round, say), in
`<state_dir>/privacy-ledger.jsonl`:

    {"round": 3, "attempt": 1, "steps": 40, "sample_rate": 0.025, "noise_multiplier": 1.1,
     "max_grad_norm": 1.0, "delta": 1e-05, "epsilon": 1.93, "time": "2025-01-01T12:00:00+00:00",
     "study": "demo-1a2b3c4d", "kind": "train", "repeatable": false}

`epsilon` is the cumulative epsilon (at that line's `delta`) of its budget's private lines after the
line. A line's `kind` is `train` (a round of DP-SGD), `count` (the site's training-set size, released
once per study with Gaussian noise: one step of noise `noise_multiplier` x sensitivity 1 at sample
rate 1, its noised `value` kept so the study's later rounds reuse it), `evaluation` (one protected
evaluation release, client.evaluation), or a release without differential privacy: `train-nonprivate`
(a round trained without DP, at a site whose policy allows it: exact size, loss and update) or
`evaluation-nonprivate` (an `exact` or `summary` evaluation release), written with noise 0 and no
clipping. Training, count and
train-nonprivate lines are the training images' budget, the evaluation kinds the test images': the
splits hold different images (patients), so each image spends one of them. The budget a site enforces
(`privacy.max_epsilon`, `privacy.evaluation.max_epsilon`) composes the private lines (`epsilon`); what
a site reports as spent (`spent`) is infinite once any image of the budget was released without
privacy, since no epsilon bounds an exact release. `repeatable: true` marks spending whose noise was
seeded from the round (`privacy.repeatable_noise`, simulation only): counted like any other, but not
private against a coordinator that knows the seed. The ledger, not any
process's memory, is the truth: `epsilon(delta)` recomputes it from all lines with a fresh Opacus
RDPAccountant, so a restarted site continues from where the last process stopped.

Contract for callers: append a round's entry right after training and BEFORE its update leaves the
site. `append` returns only once the line is fsync'd, so every update that was ever sent is on disk,
and a round whose update is then lost still counts (spending always counts). A round trained again
after a lost update is appended with `attempt` = previous attempt + 1; both attempts count.
Appending a round already recorded without a new attempt number raises `LedgerError`.

Concurrent writers: `PrivacyLedger.locked()` holds an exclusive lock (`flock` on
`privacy-ledger.jsonl.lock`) that every `append` also takes. A site holds it from its budget check to
its ledger line (`client.guard.site_lock`), so two processes training at one site at once (two studies
sharing a ledger) cannot both pass the check on the same remaining budget: the second one waits, then
sees the first one's spending. The lock is re-entrant within a process.

Damaged files: a line that is not a valid entry raises `LedgerError` naming the file and line,
except a torn last line (no final newline: the process died inside `append`). Under the contract
above, that round's update never left the site, so the torn line is ignored with a `LedgerWarning`
and cut off by the next `append`. A last line without a newline that is still a complete, valid
entry is counted (when in doubt, count the spending).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from common.privacy import HistoryItem, rdp_epsilon

LEDGER_FILENAME = "privacy-ledger.jsonl"


class LedgerError(Exception):
    """The privacy ledger is damaged, or an append would double-count or reorder rounds."""


class LedgerWarning(UserWarning):
    """The ledger had a torn last line (a crash inside `append`); it was not counted."""


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One round's privacy spending at one site."""

    round: int  # the coordinator's server round
    steps: int  # optimizer steps actually taken (each one spends privacy)
    sample_rate: float  # Poisson sampling rate: batch size / examples at the site
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    epsilon: float  # cumulative epsilon of its budget's private lines at `delta` after this line
    time: str  # ISO 8601, UTC
    attempt: int = 1  # > 1: the round was trained again after an earlier attempt's update was lost
    study: str = ""  # the study (run) this round belongs to; round order is checked per study
    kind: str = "train"  # one of ENTRY_KINDS
    value: float | None = None  # count: the noised value released
    repeatable: bool = False  # noise seeded from the round: not private against the coordinator

    def __post_init__(self) -> None:
        problems = []
        if self.round < 0:
            problems.append(f"round must be >= 0, got {self.round}")
        if self.attempt < 1:
            problems.append(f"attempt must be >= 1, got {self.attempt}")
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.sample_rate <= 1:
            problems.append(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.kind in NONPRIVATE_KINDS:
            if self.noise_multiplier != 0 or self.max_grad_norm != 0:
                problems.append(
                    f"a {self.kind} line must have noise_multiplier 0 and max_grad_norm 0 (no DP), got "
                    f"{self.noise_multiplier}, {self.max_grad_norm}"
                )
        elif not (self.noise_multiplier > 0 and self.max_grad_norm > 0):
            problems.append(
                f"noise_multiplier and max_grad_norm must be > 0, got {self.noise_multiplier}, {self.max_grad_norm}"
            )
        if not 0 < self.delta < 1:
            problems.append(f"delta must be in (0, 1), got {self.delta}")
        if not (self.epsilon >= 0 and math.isfinite(self.epsilon)):
            problems.append(f"epsilon must be finite and >= 0, got {self.epsilon}")
        if self.kind not in ENTRY_KINDS:
            problems.append(f"kind must be one of {ENTRY_KINDS}, got {self.kind!r}")
        if (self.kind == "count") != (self.value is not None):
            problems.append("a count line, and only a count line, holds a released value")
        if problems:
            raise LedgerError("invalid ledger entry: " + "; ".join(problems))

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False)

    @classmethod
    def from_dict(cls, data: object) -> LedgerEntry:
        """Parse one decoded JSON line; raises LedgerError on missing keys or wrong types."""
        if not isinstance(data, dict):
            raise LedgerError(f"expected a JSON object, got {type(data).__name__}")
        missing = [f.name for f in fields(cls) if f.name not in data and f.name not in _OPTIONAL_FIELDS]
        if missing:
            raise LedgerError(f"missing keys {missing}")
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name in ("time", "study", "kind"):
                ok = isinstance(value, str)
            elif f.name == "repeatable":
                ok = isinstance(value, bool)
            elif f.name == "value" and value is None:
                ok = True
            elif f.name in _INT_FIELDS:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                value = float(value) if ok else value
            if not ok:
                raise LedgerError(f"{f.name!r} has the wrong type: {value!r}")
            values[f.name] = value
        return cls(**values)


_INT_FIELDS = ("round", "attempt", "steps")
_OPTIONAL_FIELDS = ("attempt", "study", "kind", "value", "repeatable")  # lines from older versions lack them
TRAINING_KINDS = ("train", "count")  # private spending of the training images (privacy.max_epsilon)
EVALUATION_KINDS = ("evaluation",)  # of the test images (privacy.evaluation.max_epsilon)
NONPRIVATE_OF = {TRAINING_KINDS: "train-nonprivate", EVALUATION_KINDS: "evaluation-nonprivate"}
NONPRIVATE_KINDS = tuple(NONPRIVATE_OF.values())  # releases without DP: no epsilon bounds them
ENTRY_KINDS = TRAINING_KINDS + EVALUATION_KINDS + NONPRIVATE_KINDS


def spending(budget: tuple[str, ...]) -> tuple[str, ...]:
    """Every kind of line that spends the images of `budget` (TRAINING_KINDS or EVALUATION_KINDS),
    the releases without privacy included."""
    return (*budget, NONPRIVATE_OF[budget])


def budget_of(kind: str) -> tuple[str, ...]:
    """The private kinds of line that spend the same budget as a line of `kind`."""
    return EVALUATION_KINDS if kind in spending(EVALUATION_KINDS) else TRAINING_KINDS


# per ledger path: (a lock for this process's threads, [depth, fd of the held flock])
_LOCKS: dict[str, tuple[threading.RLock, list[int]]] = {}
_LOCKS_MUTEX = threading.Lock()


class PrivacyLedger:
    """Append-only JSON-lines file of `LedgerEntry`s; see the module docstring for the rules."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.path)!r})"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this ledger's exclusive lock (blocking; re-entrant within this process)."""
        key = str(self.path.resolve())
        with _LOCKS_MUTEX:
            thread_lock, _ = _LOCKS.setdefault(key, (threading.RLock(), [0, -1]))
        with thread_lock:
            state = _LOCKS[key][1]
            if state[0] == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                state[1] = fd
            state[0] += 1
            try:
                yield
            finally:
                state[0] -= 1
                if state[0] == 0:
                    fcntl.flock(state[1], fcntl.LOCK_UN)
                    os.close(state[1])
                    state[1] = -1

    def _read(self, *, warn: bool = True) -> tuple[list[LedgerEntry], int, bool]:
        """Entries, byte length of the intact part, and whether that part lacks a final newline."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], 0, False
        entries: list[LedgerEntry] = []
        last_trained: dict[str, LedgerEntry] = {}  # per study: one pass, however long the ledger
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        offset = 0
        for lineno, raw in enumerate(lines, start=1):
            offset += len(raw) + 1
            if raw.strip():
                entries.append(self._parse(raw, lineno, last_trained))
        if not tail.strip():
            return entries, len(data), False
        lineno = len(lines) + 1
        try:
            entries.append(self._parse(tail, lineno, last_trained))
            return entries, len(data), True
        except LedgerError as e:
            if warn:
                warnings.warn(
                    f"{self.path}:{lineno}: torn last line ignored ({e}); the process stopped "
                    f"while appending, before that round's update left the site. The next append "
                    f"removes it. Torn bytes: {tail[:200]!r}",
                    LedgerWarning,
                    stacklevel=3,
                )
            return entries, offset, False

    def _parse(self, raw: bytes, lineno: int, last_trained: dict[str, LedgerEntry]) -> LedgerEntry:
        """The line's entry, checked to come after its study's last `train` line (`last_trained`,
        which it then updates)."""
        where = f"{self.path}:{lineno}"
        try:
            entry = LedgerEntry.from_dict(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, LedgerError) as e:
            raise LedgerError(
                f"{where}: not a valid privacy ledger entry ({e}). The ledger is the record of "
                "this site's privacy spending: restore it from a backup rather than delete it."
            ) from None
        if entry.kind == "train":
            if entry.study in last_trained and (problem := _order_problem(last_trained[entry.study], entry)):
                raise LedgerError(f"{where}: {problem}")
            last_trained[entry.study] = entry
        return entry

    def entries(self) -> list[LedgerEntry]:
        """All recorded entries, oldest first.

        Raises:
            LedgerError: a line (other than a torn last one) is not a valid entry, or rounds are
                out of order; the message names the file and line.
        """
        return self._read()[0]

    def append(self, entry: LedgerEntry) -> None:
        """Write `entry` as a new line; returns only once it is flushed and fsync'd to disk.

        Raises:
            LedgerError: `entry` does not come strictly after the last recorded (round, attempt).
        """
        with self.locked():
            self._append(entry)

    def _append(self, entry: LedgerEntry) -> None:
        entries, intact, needs_newline = self._read()
        entries = [e for e in entries if e.study == entry.study and e.kind == entry.kind == "train"]
        if entries:
            problem = _order_problem(entries[-1], entry)
            if problem:
                raise LedgerError(f"{self.path}: cannot append: {problem}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "ab") as f:
            if f.tell() > intact:  # a torn last line, already reported by _read: cut it off
                f.truncate(intact)
            line = ("\n" if needs_newline else "") + entry.to_json() + "\n"
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        if created:
            _fsync_dir(self.path.parent)

    def history(self, kinds: tuple[str, ...] = TRAINING_KINDS) -> list[HistoryItem]:
        """The Opacus RDP accountant history of the lines of `kinds` (by default, the training
        budget's): [(noise_multiplier, sample_rate, steps), ...]."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries() if e.kind in kinds]

    def epsilon(self, delta: float, kinds: tuple[str, ...] = TRAINING_KINDS) -> float:
        """Cumulative epsilon at `delta` over every recorded line of `kinds` (a fresh RDPAccountant)."""
        return rdp_epsilon(self.history(kinds), delta=delta)

    def spent(self, delta: float, kinds: tuple[str, ...] = TRAINING_KINDS) -> float:
        """What the site reports as spent on the images of the budget `kinds` (TRAINING_KINDS or
        EVALUATION_KINDS): `epsilon`, or infinity once any of them was released without privacy (its
        line has no noise)."""
        return self.epsilon(delta, spending(kinds))


def _order_problem(last: LedgerEntry, new: LedgerEntry) -> str | None:
    if new.round > last.round:
        if new.attempt != 1:
            return f"round {new.round} is new, so its attempt must be 1, got {new.attempt}"
        return None
    if new.round == last.round:
        if new.attempt == last.attempt + 1:
            return None
        return (
            f"round {new.round} attempt {last.attempt} is already recorded; a round is never "
            f"counted twice by accident. If its update was lost and the site trained it again, "
            f"record it with attempt={last.attempt + 1} (both attempts' spending counts)"
        )
    return f"round {new.round} comes after round {last.round}: rounds must increase"


def _fsync_dir(path: Path) -> None:
    """Make a newly created file's directory entry durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SiteAccountant:
    """Privacy accounting for one site, kept in `<state_dir>/privacy-ledger.jsonl`.

    Holds nothing in memory: every question re-reads the ledger, so a new process over the same
    state folder continues the epsilon of the last one.
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.ledger = PrivacyLedger(self.state_dir / LEDGER_FILENAME)

    def history(self, kinds: tuple[str, ...] = TRAINING_KINDS) -> list[HistoryItem]:
        return self.ledger.history(kinds)

    def epsilon(self, delta: float, kinds: tuple[str, ...] = TRAINING_KINDS) -> float:
        return self.ledger.epsilon(delta, kinds)

    def spent(self, delta: float, kinds: tuple[str, ...] = TRAINING_KINDS) -> float:
        return self.ledger.spent(delta, kinds)

    def released_count(self, study: str) -> float | None:
        """The noised training-set size this site released for `study`, if it has."""
        for e in self.ledger.entries():
            if e.kind == "count" and e.study == study:
                return e.value
        return None

    def record_round(
        self,
        *,
        round: int,
        steps: int,
        sample_rate: float,
        noise_multiplier: float,
        max_grad_norm: float,
        delta: float,
        retry: bool = False,
        study: str = "",
        kind: str = "train",
        value: float | None = None,
        repeatable: bool = False,
    ) -> LedgerEntry:
        """Append a trained round, a released count or a release without DP (before it is sent) and
        return the entry.

        `retry=True` records a second training of the last recorded round (its update was lost):
        the new attempt's spending is added to the old one's.
        """
        with self.ledger.locked():  # read the ledger and append to it as one step
            entries = self.ledger.entries()
            attempt = 1
            same_study = [e for e in entries if e.study == study and e.kind == kind == "train"]
            if retry and same_study and same_study[-1].round == round:
                attempt = same_study[-1].attempt + 1
            history = [
                (e.noise_multiplier, e.sample_rate, e.steps) for e in entries if e.kind in budget_of(kind)
            ]
            if kind not in NONPRIVATE_KINDS:  # the line's epsilon composes the private lines only
                history.append((float(noise_multiplier), float(sample_rate), int(steps)))
            entry = LedgerEntry(
                round=int(round),
                attempt=attempt,
                steps=int(steps),
                sample_rate=float(sample_rate),
                noise_multiplier=float(noise_multiplier),
                max_grad_norm=float(max_grad_norm),
                delta=float(delta),
                epsilon=rdp_epsilon(history, delta=delta),
                time=datetime.now(UTC).isoformat(timespec="seconds"),
                study=study,
                kind=kind,
                value=value,
                repeatable=repeatable,
            )
            self.ledger.append(entry)
            return entry

    def record_nonprivate(
        self, *, budget: tuple[str, ...], round: int, steps: int, delta: float, study: str
    ) -> LedgerEntry:
        """Append a release of the images of `budget` (TRAINING_KINDS or EVALUATION_KINDS) without
        differential privacy, before it is sent: from then on the site reports their epsilon as infinite."""
        return self.record_round(
            round=round, steps=steps, sample_rate=1.0, noise_multiplier=0.0, max_grad_norm=0.0, delta=delta,
            study=study, kind=NONPRIVATE_OF[budget],
        )  # fmt: skip


def ledger_notices(state_dir: str | os.PathLike[str]) -> list[str]:
    """Read a site's ledger once, before a run: what a reader must be told (a torn last line that was
    dropped, naming the file). Raises LedgerError when the ledger is damaged beyond that."""
    path = Path(state_dir) / LEDGER_FILENAME
    if not path.exists():
        return []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LedgerWarning)
        PrivacyLedger(path).entries()
    return [str(w.message) for w in caught if issubclass(w.category, LedgerWarning)]
