"""`fedward site serve SITE_CONFIG`: the hospital's own long-lived site service.

The service is the only process that touches the site's images, image cache, model, privacy policy
and ledger. It loads the data once, then answers the ClientApp that Flower starts for every message
(client.forwarder) over a local Unix socket (client.wire): train, evaluate, status. Whatever the
coordinator ships as its app runs as another OS user that can reach this socket and nothing else, so
coordinator code can neither read the data nor skip the privacy guard: every request goes through
`SiteRuntime` (client.site), which applies the site's policy and writes the ledger before replying.

A request that cannot be read, or that the site refuses, gets an answer saying why; a forwarder that
hangs up mid-request loses its answer and nothing else; the service goes on with the next request.
Files it writes (ledger, cache) are private to its user (umask 077).
"""

from __future__ import annotations

import grp
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path

import numpy as np
import torch

from client.ledger import ledger_notices
from client.site import SiteReply, SiteRuntime
from client.wire import OPS, WireError, plain_config, recv_frame, send_frame
from common.schema import SiteConfig

log = logging.getLogger("fedward.site")
READ_TIMEOUT_S = 60.0  # a forwarder sends its whole request at once; a slower one is dropped
WRITE_TIMEOUT_S = 60.0  # and reads its answer at once: one that does not is dropped, its answer lost


class ServiceError(RuntimeError):
    """The service cannot start (socket path, group, data): the message says what to do."""


def socket_path(config: SiteConfig) -> Path:
    """Where the site's service listens: `service.socket`, else `<state_dir>/site.sock`."""
    if config.service.socket:
        return Path(config.service.socket).expanduser()
    if not config.state_dir:
        raise ServiceError(
            f"site '{config.site}' has neither 'service.socket' nor 'state_dir' in its site config: "
            "the service needs a place for its socket"
        )
    return Path(config.state_dir).expanduser() / "site.sock"


class SiteService:
    """Serve one site's runtime on a Unix socket until stopped (SIGTERM, SIGINT or `stop`)."""

    def __init__(self, config: SiteConfig, runtime: SiteRuntime | None = None, path: Path | None = None):
        self.config = config
        self.path = path or socket_path(config)
        self.runtime = runtime
        self.sock: socket.socket | None = None
        self.stopping = False
        self.served = 0

    def open(self) -> None:
        """Load the data (unless given) and listen; a second service on the same socket is refused."""
        _private(self.config)
        for folder in _exposed_data(self.config):
            log.warning(
                "site %s: %s can be read by every user of this machine; `chmod -R o-rwx %s` so that only "
                "the site service reads it", self.config.site, folder, folder,
            )  # fmt: skip
        if self.runtime is None:
            self.runtime = SiteRuntime.load(self.config)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if _answers(self.path):
                raise ServiceError(f"another site service already listens on {self.path}; stop it first")
            self.path.unlink()  # left behind by a service that was killed
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self._allow_group()
        self.sock.listen(8)
        log.info("site %s: serving on %s", self.config.site, self.path)

    def _allow_group(self) -> None:
        group = self.config.service.group
        mode = stat.S_IRUSR | stat.S_IWUSR
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ServiceError(
                    f"site config {self.config.source_path}: 'service.group' {group!r} is not a group on "
                    "this machine; create it (groupadd) and add the ClientApp's user to it"
                ) from None
            os.chown(self.path, -1, gid)
            mode |= stat.S_IRGRP | stat.S_IWGRP
        os.chmod(self.path, mode)

    def serve_forever(self) -> None:
        if self.sock is None:
            self.open()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        try:
            while not self.stopping:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    if self.stopping:
                        break
                    raise
                with conn:
                    self.handle(conn)
        finally:
            self.close()

    def stop(self) -> None:
        self.stopping = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
            except OSError:
                pass
            self.sock.close()

    def close(self) -> None:
        self.stop()
        if self.path.exists() and not _answers(self.path):
            self.path.unlink(missing_ok=True)

    def handle(self, conn: socket.socket) -> None:
        """Answer one request; nothing a forwarder sends or fails to send stops the service."""
        try:
            header, arrays = recv_frame(conn, within_s=READ_TIMEOUT_S)  # trickled bytes do not hold it
        except TimeoutError:
            log.warning(
                "site %s: a forwarder's request did not come within %.0fs; dropped",
                self.config.site,
                READ_TIMEOUT_S,
            )
            return
        except WireError as err:
            reply, weights = self._unreadable(err), None
        except OSError as err:  # the forwarder went away inside its request
            log.warning("site %s: the forwarder hung up inside its request (%s)", self.config.site, err)
            return
        except Exception as err:  # anything else a frame can make the reader raise: unreadable, answered
            reply, weights = (
                self._unreadable(WireError(f"it could not be read ({type(err).__name__}: {err})")),
                None,
            )
        else:
            reply, weights = self._answer_or_error(header, arrays)
        conn.settimeout(WRITE_TIMEOUT_S)  # a forwarder that does not read its answer cannot hold the service
        try:
            try:
                send_frame(conn, reply, weights)
            except ValueError as err:  # e.g. a NaN loss after training diverged: not valid JSON
                log.warning("site %s: its answer could not be sent (%s)", self.config.site, err)
                send_frame(conn, {"error": f"site '{self.config.site}': its answer could not be sent: {err}"})
            self.served += 1
        except OSError as err:  # the forwarder went away (crashed, killed SuperNode): its answer is lost
            log.warning("site %s: the forwarder hung up before its answer (%s)", self.config.site, err)

    def _unreadable(self, err: WireError) -> dict:
        log.warning("site %s: unreadable request: %s", self.config.site, err)
        return {"error": f"site service: unreadable request: {err}"}

    def _answer_or_error(self, header: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict | None]:
        """The answer to a request read whole, or the error reply that says why there is none."""
        try:
            return self.answer(header, arrays)
        except WireError as err:
            return self._unreadable(err), None
        except Exception as err:  # the site's own failure (a TimeoutError too): say so, keep serving
            log.exception("site %s: request failed", self.config.site)
            # its kind only: the message may hold what must not leave (a file's path, a patient's name)
            return {"error": f"site '{self.config.site}': the request failed ({type(err).__name__}); the "
                    "site's own log says why"}, None  # fmt: skip

    def answer(self, header: dict, arrays: dict[str, np.ndarray]) -> tuple[dict, dict | None]:
        op = header.get("op")
        if op not in OPS:
            raise WireError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
        if op == "status":
            # alive and which site, nothing else: a count of requests served would tell one study's
            # ClientApp how many requests other studies made here
            return {"site": self.config.site, "metrics": {}, "refused": ""}, None
        config = plain_config(header.get("config"))
        if not arrays:
            raise WireError(f"a {op} request must carry the global model's arrays")
        weights = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
        reply: SiteReply = (
            self.runtime.train(config, weights) if op == "train" else self.runtime.evaluate(config, weights)
        )
        out = None
        if reply.weights is not None:
            out = {k: v.detach().cpu().numpy() for k, v in reply.weights.items()}
        header = {
            "site": reply.site,
            "metrics": dict(reply.metrics),
            "refused": reply.refused,
            "release": reply.release,
            "input": reply.input,
        }
        return header, out


def _answers(path: Path) -> bool:
    """Whether a service listens on `path` now."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _exposed_data(config: SiteConfig) -> list[Path]:
    """The site's data folder and label sheet when other users may read them."""
    from common.sources import site_paths

    if config.data.format not in ("dicom", "image", "nifti"):
        return (
            [Path(config.data.path)] if config.data.path and _world_readable(Path(config.data.path)) else []
        )
    return [p for p in site_paths(config) if _world_readable(p)]


def _world_readable(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


def _private(config: SiteConfig) -> None:
    """The state folder's files (ledger, cache) readable by the service's user only."""
    if not config.state_dir:
        return
    state = Path(config.state_dir).expanduser()
    state.mkdir(parents=True, exist_ok=True)
    for path in [state, *state.rglob("*")]:
        if path.is_symlink() or path.is_socket():
            continue
        keep = stat.S_IRWXU if path.is_dir() else stat.S_IRUSR | stat.S_IWUSR
        if path == state and config.service.socket == "":
            keep |= stat.S_IXGRP | stat.S_IXOTH  # the socket inside: traversable, nothing readable
        os.chmod(path, keep)


def serve(config: SiteConfig, socket: str | None = None) -> int:
    """`fedward site serve`: run until stopped; 0 on a clean stop."""
    if config.privacy.repeatable_noise:
        raise ServiceError(
            f"site config {config.source_path}: 'privacy.repeatable_noise' is for simulations only: seeded "
            "noise is not private against the coordinator; remove it to serve this site"
        )
    os.umask(0o077)  # everything this process writes (ledger, cache) is its user's alone
    for notice in ledger_notices(config.state_dir) if config.state_dir else []:
        log.warning("%s", notice)
    service = SiteService(config, path=Path(socket).expanduser() if socket else None)
    t0 = time.perf_counter()
    service.open()
    print(
        f"site {config.site}: serving on {service.path} (data loaded in {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    service.serve_forever()
    print(f"site {config.site}: stopped after {service.served} request(s)", flush=True)
    return 0
