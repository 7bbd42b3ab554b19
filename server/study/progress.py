"""Live progress of a `fedward study`: which part, round and site, and an estimate of the time left.

Also the Reporter of each federated run inside the study (server.coordinator), so the rounds of every
federation show up in the same lines. DIR/progress.json holds the latest state for long runs watched
from elsewhere.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from common.privacy import epsilon_text
from common.schema import StudyConfig
from server.coordinator import Reporter
from server.report.doc import METRIC_LABELS
from server.run_folder import PROGRESS_FILE, write_json
from server.study.plan import Part

SIM_OVERHEAD_GUESS_S = 20.0  # starting the site processes and the first evaluation, until measured


class StudyProgress(Reporter):
    """Live progress: which part, round and site, and an estimate of the time left.

    The estimate counts the training work left (images x epochs) at the speed measured so far, kept
    apart with and without privacy, plus the measured start-up cost of each federated run still to
    come. On a terminal a live bar shows it; every round and every site also prints one line, and
    DIR/progress.json holds the latest state for long runs watched from elsewhere.
    """

    def __init__(self, parts: list[Part], out_dir: Path, console: Console):
        self.parts, self.dir, self.console = parts, out_dir, console
        self.metric = "auc"  # the rounds' headline (start: dice for a segmentation study)
        self.t0 = time.perf_counter()
        self.done_units = 0.0
        # measured [seconds, units] per kind of work: (federated run?, with privacy?)
        self.rate = {(sim, dp): [0.0, 0.0] for sim in (True, False) for dp in (True, False)}
        self.overheads: list[float] = []
        self.index, self.part, self.part_t0, self.part_round_s, self.part_done = -1, None, 0.0, 0.0, 0.0
        self.round, self.site = 0, None
        self.progress: Progress | None = None
        self.task = None

    # ------------------------------------------------------------------ estimate

    def _seconds_per_unit(self, simulation: bool, private: bool) -> float | None:
        """Measured speed of this kind of work, else of the nearest kind measured so far."""
        dp_factor = 3.0 if private else 1 / 3  # DP-SGD costs about 3x plain SGD per image (small CNNs)
        for sim, dp, factor in (
            (simulation, private, 1.0),
            (not simulation, private, 1.0),
            (simulation, not private, dp_factor),
            (not simulation, not private, dp_factor),
        ):
            secs, units = self.rate[(sim, dp)]
            if units > 0:
                return secs / units * factor
        return None

    def eta_s(self) -> float | None:
        left_units = dict.fromkeys(self.rate, 0.0)
        sims_left = 0
        for i, part in enumerate(self.parts):
            if i < self.index:
                continue
            done = self.part_done if i == self.index else 0.0
            left_units[(part.simulation, part.private)] += max(part.units - done, 0.0)
            if part.simulation and (i > self.index or (i == self.index and self.round == 0)):
                sims_left += 1
        total = 0.0
        for (simulation, private), units in left_units.items():
            if units == 0:
                continue
            rate = self._seconds_per_unit(simulation, private)
            if rate is None:
                return None
            total += units * rate
        overhead = float(np.median(self.overheads)) if self.overheads else SIM_OVERHEAD_GUESS_S
        return total + sims_left * overhead

    # ------------------------------------------------------------------ parts

    def begin(self, part: Part) -> None:
        self.index, self.part = self.parts.index(part), part
        self.part_t0, self.part_round_s, self.part_done = time.perf_counter(), 0.0, 0.0
        self.round, self.site = 0, None
        if self.console.is_terminal and self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[left]}"),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=sum(p.units for p in self.parts), left="")
        self._say(f"starting ({part.units:,.0f} image-epochs)")

    def end(self, part: Part) -> None:
        wall = time.perf_counter() - self.part_t0
        if part.simulation:
            self.overheads.append(max(wall - self.part_round_s, 0.0))
        self.done_units = sum(p.units for p in self.parts[: self.index + 1])
        self._update()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def at_site(self, site: str, status: str) -> None:
        """In-process work at one site begins (local training)."""
        self.site = site
        self._update(f"{site}: {status}")

    def trained(self, private: bool, units: float, seconds: float) -> None:
        """In-process training reports each finished round-equivalent (local, centralized)."""
        self.rate[(False, private)][0] += seconds
        self.rate[(False, private)][1] += units
        self.done_units += units
        self.part_done += units
        self._update()

    def site_done(self, site: str, text: str) -> None:
        self.site = site
        self._say(f"{site}: {text}")

    # ------------------------------------------------------------------ Reporter (federated runs)

    def start(self, study: StudyConfig, first_round: int) -> None:
        self.metric = "dice" if study.task == "segmentation" else "auc"  # the rounds' headline
        self._update(f"round 0/{self.part.rounds}: evaluating the initial model")

    def phase(self, round_: int, text: str) -> None:
        if round_ > 0:
            self._update(f"round {round_}/{self.part.rounds}: {text}")

    def round_done(self, record: dict, round_s: float) -> None:
        part = self.part
        self.round = record["round"]
        self.part_round_s += round_s
        units = part.units / max(part.rounds, 1)
        self.rate[(True, part.private)][0] += round_s
        self.rate[(True, part.private)][1] += units
        self.done_units += units
        self.part_done += units
        sites = "  ".join(
            f"{name} {fmt(m.get(self.metric))}"
            + (f" ε {epsilon_text(m['epsilon'])}" if m.get("epsilon") is not None else "")
            for name, m in record["sites"].items()
        )
        skipped = sorted({*record.get("refused", {}), *record.get("failed", {})})
        self._say(
            f"round {record['round']}/{part.rounds}  pooled {METRIC_LABELS[self.metric]} "
            f"{fmt(record['pooled'].get(self.metric))}  | {sites}"
            + (f"  (did not train: {', '.join(skipped)})" if skipped else "")
        )

    def finish(self, results: dict) -> None: ...

    # ------------------------------------------------------------------ output

    def _left_text(self) -> str:
        eta = self.eta_s()
        return "estimating time left" if eta is None else f"about {_duration(eta)} left"

    def _update(self, status: str | None = None) -> None:
        if self.progress is not None and self.task is not None and self.part is not None:
            head = f"[{self.index + 1}/{len(self.parts)}] {self.part.label}"
            self.progress.update(
                self.task,
                completed=self.done_units,
                description=f"{head}: {status}" if status else head,
                left=self._left_text(),
            )
        self._write_state(status)

    def _say(self, text: str) -> None:
        elapsed = _duration(time.perf_counter() - self.t0)
        self.console.print(
            f"[{self.index + 1}/{len(self.parts)} {elapsed}, {self._left_text()}] {self.part.label} · {text}",
            highlight=False,
            soft_wrap=True,
        )
        self._update()

    def _write_state(self, status: str | None) -> None:
        eta = self.eta_s()
        total = sum(p.units for p in self.parts) or 1.0
        state = {
            "part": self.part.key if self.part else None,
            "label": self.part.label if self.part else None,
            "part_index": self.index + 1,
            "parts": len(self.parts),
            "round": self.round,
            "rounds": self.part.rounds if self.part else 0,
            "site": self.site,
            "status": status,
            "done_fraction": round(min(self.done_units / total, 1.0), 4),
            "elapsed_s": round(time.perf_counter() - self.t0, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json(self.dir / PROGRESS_FILE, state)


def fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
