"""Live progress for `fedward simulate`: a rich progress bar, one line per round, a summary table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.schema import StudyConfig
from server.coordinator import Reporter


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task = None

    def start(self, study: StudyConfig, first_round: int) -> None:
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
            f"{name} {_fmt(m['auc'])}" + (f" ε{m['epsilon']:.2f}" if m.get("epsilon") is not None else "")
            for name, m in record["sites"].items()
        )
        extra = ""
        if record.get("refused"):
            extra += f"  [yellow]refused: {', '.join(record['refused'])}[/]"
        if record.get("failed"):
            extra += f"  [red]failed: {', '.join(record['failed'])}[/]"
        self.console.print(
            f"round {record['round']:>3}/{self.total}  pooled AUC {_fmt(record['pooled'].get('auc'))}"
            f"  | {sites}  ({round_s:.1f}s){extra}"
        )
        if self.progress is not None:
            self.progress.advance(self.task)

    def finish(self, results: dict) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.console.print(summary_table(results))


def summary_table(results: dict) -> Table:
    """Per site (and pooled): test size, AUC before -> after, and the final threshold metrics."""
    final, initial = results.get("final", {}), results.get("initial", {})
    last = results["rounds"][-1] if results.get("rounds") else {}
    table = Table(
        title=f"fedward: {results['study']['name']} after {final.get('round', 0)} rounds "
        f"({results.get('status')})"
    )
    table.add_column("site", no_wrap=True)
    private = bool(results["study"].get("privacy", {}).get("enabled"))
    for col in ("train", "test", "AUC 0", "AUC", "acc", "sens", "spec", "bal acc") + (
        ("ε",) if private else ()
    ):
        table.add_column(col, justify="right", no_wrap=True)
    rows = [(name, m) for name, m in final.get("sites", {}).items()]
    rows.append(("pooled", final.get("pooled", {})))
    for name, m in rows:
        init = (initial.get("pooled") if name == "pooled" else initial.get("sites", {}).get(name)) or {}
        n_train = last.get("train", {}).get(name, {}).get("n_train")
        if name == "pooled":
            n_train = sum(t["n_train"] for t in last.get("train", {}).values()) or None
        table.add_row(
            f"[bold]{name}[/]" if name == "pooled" else name,
            str(n_train or "-"),
            str(m.get("n_test", "-")),
            _fmt(init.get("auc")),
            _fmt(m.get("auc")),
            _fmt(m.get("accuracy")),
            _fmt(m.get("sensitivity")),
            _fmt(m.get("specificity")),
            _fmt(m.get("balanced_accuracy")),
            *((_fmt(m.get("epsilon"), 2) if name != "pooled" else "",) if private else ()),
        )
    if results.get("stop_reason"):
        table.caption = f"stopped: {results['stop_reason']}"
    return table
