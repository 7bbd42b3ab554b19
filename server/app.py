"""The coordinator as a Flower ServerApp: reads the study from the run config and runs it.

`flwr run .` uses the module-level `app`; `fedward simulate` builds one with `make_server_app` for an
already resolved study and its sites. Both call `server.coordinator.run_study`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.runconfig import study_from_run_config
from common.schema import StudyConfig
from common.simulated import model_shape, num_sites
from server.coordinator import Reporter, run_study


def make_server_app(
    study: StudyConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    n_sites: int | None = None,
) -> ServerApp:
    """A ServerApp for `study` (default: the run config's), waiting for `n_sites` sites (default: the study's)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        the_study = study or study_from_run_config(rc)
        classes, in_channels = model_shape(the_study)
        run_study(
            grid,
            the_study,
            out_dir or str(rc.get("out-dir", "runs/flwr")),
            classes=classes,
            in_channels=in_channels,
            n_sites=n_sites or num_sites(the_study),
            resume=resume or bool(rc.get("resume", False)),
            reporter=reporter,
        )

    return server_app


app = make_server_app()
