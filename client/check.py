"""`fedward site check SITE_CONFIG`: can this site's data be used? Look before joining a study.

Reads the site's data exactly as training will (common.sources for DICOM, PNG/JPEG and NIfTI
folders; the same loaders for MedMNIST and synthetic sites) and prints, with rich: images per
label and split, patients, modalities, stored image sizes, pixel spacing, the model input, and
every problem: files that could not be read and why, labels missing or unknown, duplicate
files, files no label row names, patients in more than one split. Reading fills the site's
image cache, so training later starts without decoding again.

Exit status: 0 the data can be used (bad files, if any, are skipped under on_bad_file: skip),
1 it cannot (the table says why), 2 the site config itself is wrong.

    python -m client.check configs/sites/example-dicom-site.yaml [--all]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from common.config import ConfigError, load_site
from common.labels import SPLITS
from common.schema import SiteConfig
from common.sources import FOLDER_FORMATS, Sample, SourceReport, scan_site, site_paths

SHOWN = 20  # problems listed per kind unless --all


@dataclass
class SiteCheck:
    """What `check_site` found; `usable` decides the exit status."""

    config: SiteConfig
    classes: list[str]
    counts: dict[str, list[int]]  # split -> images per class
    patients: dict[str, int | None]  # split -> patients (None: the format has no patient ids)
    facts: dict[str, Counter] = field(default_factory=dict)  # modality, size, spacing, frames
    input_shape: tuple[int, ...] = ()  # C x H x W the model sees
    report: SourceReport | None = None  # folder formats only
    errors: list[str] = field(default_factory=list)  # why the data cannot be used

    @property
    def usable(self) -> bool:
        return not self.errors


def check_site(config: SiteConfig) -> SiteCheck:
    """Read the site's data as training would and collect what the table shows."""
    classes = list(config.data.classes)
    if config.data.format in FOLDER_FORMATS:
        report = scan_site(config)
        counts = {s: [report.count(s, k) for k in range(len(classes))] for s in SPLITS}
        patients: dict[str, int | None] = {s: len(report.patients(s)) for s in SPLITS}
        patients["all"] = len(report.patients())
        shape = tuple(report.images.shape[1:]) if report.images is not None else ()
        return SiteCheck(config, classes, counts, patients, stats(report), shape, report, report.reasons())

    from common.data import load_site_data
    from common.sitedata import SiteDataError

    try:
        data = load_site_data(config)
    except SiteDataError as err:
        return SiteCheck(config, classes, {}, {}, errors=[str(err)])
    ys = {"train": data.train_y, "val": data.val_y, "test": data.test_y}
    n = data.num_classes
    counts = {s: [int((y == k).sum()) if y is not None else 0 for k in range(n)] for s, y in ys.items()}
    patients = dict.fromkeys([*SPLITS, "all"])  # MedMNIST and synthetic images have no patient ids
    return SiteCheck(config, data.classes, counts, patients, input_shape=tuple(data.train_x.shape[1:]))


def _counter(c: Counter, limit: int = 6) -> str:
    parts = [f"{k} ({n})" for k, n in c.most_common(limit)]
    if len(c) > limit:
        parts.append(f"... {len(c) - limit} more")
    return ", ".join(parts) or "-"


def stats(report: SourceReport) -> dict[str, Counter]:
    """What the check shows about the images: modality, stored size, spacing, frames."""

    def spacing(s: Sample) -> str:
        return (
            " x ".join(f"{v:.3g}" for v in s.spacing) + " mm" if s.spacing else "unknown"
        )  # volumes: slice first

    return {
        "modality": Counter(s.modality or "-" for s in report.samples),
        "size": Counter("x".join(map(str, s.orig_size)) for s in report.samples),
        "spacing": Counter(spacing(s) for s in report.samples),
        "frames": Counter(str(s.n_frames) for s in report.samples),
        "colour": Counter("colour" if s.colour_file else "grey" for s in report.samples),
    }


def render(check: SiteCheck, console: Console, *, show_all: bool = False) -> None:
    """Print the check as rich tables and a verdict line: `usable: N images[; K skipped]`, or
    `NOT usable:` and the reasons."""
    _print_header(check, console)
    nothing_read = check.report is not None and not check.report.samples
    if check.counts and not nothing_read:
        console.print(_counts_table(check))
    if (check.input_shape or check.facts) and not nothing_read:
        console.print(_images_table(check))
    r = check.report
    if r is not None and (r.bad or r.unlabelled or r.split_conflicts or r.notes):
        console.print(_problems_table(r, None if show_all else SHOWN))
        kinds = Counter(b.problem for b in r.bad)
        if kinds:
            verb = "skipped" if check.config.data.on_bad_file == "skip" else "bad"
            console.print(f"{verb}: {len(r.bad)} file(s) or row(s): {_counter(kinds, 10)}", highlight=False)

    if check.usable:
        n = sum(sum(v) for v in check.counts.values())
        skipped = f"; {len(r.bad)} skipped" if r is not None and r.bad else ""
        console.print(f"[bold green]usable[/]: {n} images{skipped}", highlight=False)
    else:
        console.print("[bold red]NOT usable[/]:", highlight=False)
        for reason in check.errors:
            console.print(f"  - {escape(reason)}", highlight=False)


def _print_header(check: SiteCheck, console: Console) -> None:
    """Which site, format, data, policy and config the check is about."""
    cfg = check.config
    d = cfg.data
    if d.format in FOLDER_FORMATS:
        root, labels = site_paths(cfg)
        where = f"{root} (labels {labels})"
    else:
        where = d.path or "generated"
    console.print(
        f"[bold]site[/] {escape(cfg.site)}   [bold]format[/] {d.format}   [bold]data[/] {escape(where)}",
        highlight=False,
    )
    console.print(
        f"[bold]on_bad_file[/] {d.on_bad_file}   [bold]config[/] {escape(cfg.source_path or '-')}",
        highlight=False,
    )


def _counts_table(check: SiteCheck) -> Table:
    """Images per label and split, then patients per split."""
    table = Table(title="images per label and split", title_justify="left")
    table.add_column("label")
    for split in (*SPLITS, "total"):
        table.add_column(split, justify="right")
    for k, name in enumerate(check.classes):
        per = [check.counts[s][k] for s in SPLITS]
        table.add_row(escape(name), *map(str, per), str(sum(per)))
    totals = [sum(check.counts[s]) for s in SPLITS]
    table.add_row("[bold]all[/]", *map(str, totals), str(sum(totals)), end_section=True)
    pats = check.patients
    table.add_row(
        "patients", *(str(pats.get(s)) if pats.get(s) is not None else "-" for s in (*SPLITS, "all"))
    )
    return table


def _images_table(check: SiteCheck) -> Table:
    """Modalities, stored sizes, spacing, frames, the model input and how the images were read."""
    d = check.config.data
    table = Table(title="images", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for key, label in (("modality", "modalities"), ("size", "stored size"), ("spacing", "pixel spacing")):
        if key in check.facts:
            table.add_row(label, escape(_counter(check.facts[key])))
    colours = check.facts.get("colour")
    if colours and "colour" in colours:
        table.add_row("colour", f"{_counter(colours)}; read as {d.colour}")
    frames = check.facts.get("frames")
    if frames and d.volume:  # a DICOM series or a NIfTI volume: every slice is used
        table.add_row("slices per volume", _counter(frames))
    elif frames and set(frames) != {"1"}:
        table.add_row("frames per file", f"{_counter(frames)}; frame used: {d.frame}")
    if check.input_shape:
        pre = d.preprocess
        how = f"{pre.spatial}, normalize {pre.normalize}" if d.format in FOLDER_FORMATS else "as stored"
        table.add_row("model input", f"{' x '.join(map(str, check.input_shape))} ({how})")
    if check.report is not None:
        r = check.report
        table.add_row("read", f"{r.decoded} decoded, {r.from_cache} from the cache, in {r.seconds:.1f}s")
    return table


def _problems_table(r: SourceReport, limit: int | None) -> Table:
    """Every bad file or row, patient in two splits, unlabelled file and note (the first `limit`
    of each kind; None: all)."""
    table = Table(title="problems", title_justify="left")
    table.add_column("file")
    table.add_column("line", justify="right")
    table.add_column("problem")
    table.add_column("detail", overflow="fold")
    for bad in r.bad[:limit]:
        table.add_row(escape(bad.file), str(bad.line or ""), f"[red]{bad.problem}[/]", escape(bad.detail))
    if limit and len(r.bad) > limit:
        table.add_row(f"... {len(r.bad) - limit} more", "", "", "run with --all to list them")
    for patient, splits in sorted(r.split_conflicts.items())[:limit]:
        table.add_row(f"patient {escape(patient)}", "", "[red]in two splits[/]", " and ".join(splits))
    shown = r.unlabelled[: limit or len(r.unlabelled)]
    for name in shown:
        table.add_row(
            escape(name), "", "[yellow]no label row[/]", "in the folder but not in the label sheet: not used"
        )
    if len(r.unlabelled) > len(shown):
        table.add_row(f"... {len(r.unlabelled) - len(shown)} more", "", "[yellow]no label row[/]", "")
    for note in r.notes:
        table.add_row("", "", "[yellow]note[/]", escape(note))
    return table


def main(argv: list[str] | None = None) -> int:
    """`fedward site check SITE_CONFIG [--all]`: 0 usable, 1 not usable, 2 a wrong site config."""
    parser = argparse.ArgumentParser(
        prog="fedward site check",
        description="Can this site's data be used? Read it as training would and report.",
    )
    parser.add_argument("site_config", help="the site's YAML config, e.g. /etc/fedward/site.yaml")
    parser.add_argument("--all", action="store_true", help=f"list every problem (default: the first {SHOWN})")
    args = parser.parse_args(argv)
    console = _console()
    try:
        config = load_site(args.site_config)
    except ConfigError as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    return check_and_render(config, show_all=args.all, console=console)


def check_and_render(config: SiteConfig, *, show_all: bool = False, console: Console | None = None) -> int:
    """Check the site's data and print the result: 0 usable, 1 not usable."""
    console = console or _console()
    check = check_site(config)
    render(check, console, show_all=show_all)
    return 0 if check.usable else 1


def _console() -> Console:
    return Console(width=None if sys.stdout.isatty() else 140)


if __name__ == "__main__":
    sys.exit(main())
