"""Live progress for `fedward simulate`: a rich progress bar, one line per round, a summary table.

The summary table shows the same per-site rows as the report (server.report.tables).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from common.privacy import epsilon_text
from common.schema import StudyConfig
from server.coordinator import Reporter
from server.report.doc import is_private, metric_of
from server.report.tables import RUN_COLUMNS, run_rows


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task = None

    def start(self, study: StudyConfig, first_round: int) -> None:
        self.headline = "Dice" if study.task == "segmentation" else "AUC"
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("starting", total=study.rounds, completed=first_round - 1)
        self.total = study.rounds

    def phase(self, round_: int, text: str) -> None:
        if self.progress is not None:
            label = "initial model" if round_ == 0 else f"round {round_}/{self.total}"
            self.progress.update(self.task, description=f"{label}: {text}")

    def round_done(self, record: dict, round_s: float) -> None:
        sites = "  ".join(
            f"{name} {_fmt(m.get(self.key))}"
            + (f" ε {epsilon_text(m['epsilon'])}" if m.get("epsilon") is not None else "")
            for name, m in record["sites"].items()
        )
        extra = ""
        if record.get("refused"):
            extra += f"  [yellow]refused: {', '.join(record['refused'])}[/]"
        if record.get("failed"):
            extra += f"  [red]failed: {', '.join(record['failed'])}[/]"
        self.console.print(
            f"round {record['round']:>3}/{self.total}  pooled {self.headline} {_fmt(record['pooled'].get(self.key))}"
            f"  | {sites}  ({round_s:.1f}s){extra}"
        )
        if self.progress is not None:
            self.progress.advance(self.task)

    @property
    def key(self) -> str:
        return getattr(self, "headline", "AUC").lower()

    def finish(self, results: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.console.print(summary_table(results))


def summary_table(results: dict) -> Table:
    """Per site (and pooled): sizes, AUC (Dice) before -> after, and the final metrics.

    The rows are the report's (server.report.tables.run_rows), so terminal and report.html agree.
    """
    rows, private = run_rows(results), is_private(results)
    table = Table(
        title=f"fedward: {results.get('study', {}).get('name', '')} after "
        f"{results.get('final', {}).get('round', 0)} rounds ({results.get('status')})"
    )
    table.add_column("site", no_wrap=True)
    for col in (*RUN_COLUMNS[metric_of(results)][2][1:], *(("ε",) if private else ())):
        table.add_column(col, justify="right", no_wrap=True)
    for row in rows:
        site, *cells = row.texts(private, missing="-")
        table.add_row(Text(site, style="bold" if row.pooled else ""), *cells)
    if results.get("stop_reason"):
        table.caption = f"stopped: {results['stop_reason']}"
    return table
