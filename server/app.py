"""The coordinator as a Flower ServerApp: reads the study from the run config and runs it.

`flwr run .` uses the module-level `app`; `fedward simulate` builds one with `make_server_app` for an
already resolved study. Both call `server.coordinator.run_study`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import StudyConfig
from server.coordinator import Reporter, run_study
from server.runconfig import study_from_run_config


def make_server_app(
    study: StudyConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    n_sites: int | None = None,
) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        run_study(
            grid,
            study or study_from_run_config(rc),
            out_dir or str(rc.get("out-dir", "runs/flwr")),
            resume=resume or bool(rc.get("resume", False)),
            reporter=reporter,
            n_sites=n_sites,
        )

    return server_app


app = make_server_app()
