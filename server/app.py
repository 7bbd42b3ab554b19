"""The coordinator as a Flower ServerApp: reads the study from the run config and runs it.

`flwr run .` uses the module-level `app`; `fedward simulate` builds one with `make_server_app` for an
already resolved study and its sites. Both call `server.coordinator.run_study`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.model_spec import model_spec
from common.runconfig import study_from_run_config
from common.schema import StudyConfig
from common.simulated import num_sites
from server.coordinator import Reporter, run_study
from server.interrupt import StopRequest
from server.run_claim import claim_run_folder


def make_server_app(
    study: StudyConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    n_sites: int | None = None,
    stop: StopRequest | None = None,
    resume_command: str = "",
) -> ServerApp:
    """A ServerApp for `study` (default: the run config's), waiting for `n_sites` sites (default: the study's)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        the_study = study or study_from_run_config(rc)
        spec = model_spec(the_study)  # from the study alone: never a site's data or config
        out = out_dir or str(rc.get("out-dir", "runs/flwr"))
        resuming = resume or bool(rc.get("resume", False))
        # a deployment's ServerApp claims its run folder itself (`fedward simulate` already holds it)
        claim = (
            contextlib.nullcontext()
            if study is not None
            else claim_run_folder(out, resume=resuming, force=False, command=f"flwr run (ServerApp) -> {out}")
        )
        with claim:
            _run(grid, the_study, out, spec, resuming, rc)

    def _run(grid, the_study, out, spec, resuming, rc) -> None:
        run_study(
            grid,
            the_study,
            out,
            spec=spec,
            n_sites=n_sites or num_sites(the_study),
            resume=resuming,
            reporter=reporter,
            stop=stop,
            resume_command=resume_command or str(rc.get("resume-command", "")),
        )

    return server_app


app = make_server_app()
