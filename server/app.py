"""The coordinator as a Flower ServerApp: reads the study from the run config and runs it.

`flwr run .` uses the module-level `app`; `fedward simulate` builds one with `make_server_app` for an
already resolved study and its sites. Both call `server.coordinator.run_study`, or, when packages are
given (`fedward validate`, or the run config's `validate-packages`: comma-separated package folders),
`server.validate.Validation`, which evaluates them at every site and trains nothing.
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
    packages: list[str] | None = None,
) -> ServerApp:
    """A ServerApp for `study` (default: the run config's), waiting for `n_sites` sites (default: the
    study's); with `packages` it validates them instead of training."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        the_study = study or study_from_run_config(rc)
        out = out_dir or str(rc.get("out-dir", "runs/flwr"))
        to_validate = packages or [p for p in str(rc.get("validate-packages", "")).split(",") if p.strip()]
        if to_validate:
            validate_packages(grid, the_study, out, [p.strip() for p in to_validate], claim=study is None,
                              n_sites=n_sites or num_sites(the_study), reporter=reporter, stop=stop)  # fmt: skip
            return
        spec = model_spec(the_study)  # from the study alone: never a site's data or config
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


def validate_packages(grid: Grid, study: StudyConfig, out: str, paths: list[str], *, claim: bool, n_sites: int,
                      reporter: Reporter | None, stop: StopRequest | None) -> None:  # fmt: skip
    """The ServerApp's validation (server.validate); `claim`: the run folder is not held yet (a
    deployment's `flwr run`: `fedward validate` already holds it)."""
    from server.validate import Validation  # late: a training run never needs it

    held = (
        claim_run_folder(
            out, resume=False, force=False, command=f"flwr run (validate) -> {out}", kind="validation"
        )
        if claim
        else contextlib.nullcontext()
    )
    with held:
        Validation(grid, study, paths, out, n_sites=n_sites, reporter=reporter, stop=stop).run()
