"""One hospital of the local deployment: its site service, its SuperNode and the runner of its ClientApps.

    sites/<site>/site.yaml        the site config (service only: 0600)
    sites/<site>/state/           privacy ledger and cache (service only: 0700)
    sites/<site>/socket/site.sock the site service's socket (the ClientApps' group may connect)
    sites/<site>/node/            the SuperNode's FLWR_HOME (the SuperNode's user)
    sites/<site>/app/             the ClientApps' FLWR_HOME (the ClientApps' user)

The site service (`fedward site serve`) runs as the invoking user; with isolation, the SuperNode runs
as server.isolation.NODE_USER (it alone reads the site's authentication key) and the SuperExec, which
starts a ClientApp for every message from the app the coordinator ships, as APP_USER, which reaches
the site only through the socket (server/isolation.py). The SuperNode runs with `--isolation process`
so that the SuperExec is a process of its own, started here.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.config import ConfigError, load_site
from server import isolation
from server.isolation import APP_USER, Account


@dataclass
class SitePaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "site.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def socket(self) -> Path:
        return self.root / "socket" / "site.sock"

    @property
    def node_home(self) -> Path:
        return self.root / "node"

    @property
    def app_home(self) -> Path:
        return self.root / "app"


def write_site_config(template: Path, site: str, paths: SitePaths, *, isolated: bool) -> None:
    """The deployed site's config: the template's data and policy, with its state folder and socket."""
    data = yaml.safe_load(template.read_text()) or {}
    if data.get("site", site) != site:
        raise ConfigError(f"{template}: 'site' is '{data['site']}' but the file is named for '{site}'")
    data["site"] = site
    data["state_dir"] = str(paths.state)
    data["service"] = {"socket": str(paths.socket), "group": APP_USER if isolated else ""}
    for folder in (paths.root, paths.state, paths.socket.parent, paths.node_home, paths.app_home):
        folder.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(yaml.safe_dump(data, sort_keys=False))
    load_site(paths.config)  # validate now, not inside the site service


def isolate(paths: SitePaths, node: Account, app: Account, *, key: Path | None, secret: Path | None) -> None:
    """Who may read what at this site (see the module docstring)."""
    for folder in (paths.root.parent, paths.root):  # passable whatever the umask; the contents decide
        folder.chmod(0o755)
    isolation.private(paths.config)
    isolation.private(paths.state)
    isolation.own(paths.socket.parent, _invoker(), 0o750, group=APP_USER)  # the ClientApps may connect
    isolation.own(paths.node_home, node, 0o700)
    isolation.own(paths.app_home, app, 0o700)
    if key is not None:  # the site's credentials folder: the SuperNode's; its key for it alone
        for folder in (key.parent.parent.parent, key.parent.parent):  # certs/, certs/sites/
            folder.chmod(0o755)
        isolation.own(key.parent, node, 0o640, group=APP_USER)  # CA certificate, public key, secret
        isolation.own(key, node, 0o600)
    if secret is not None:  # the SuperNode and its SuperExec share it
        isolation.own(secret, node, 0o640, group=APP_USER)


def _invoker() -> Account:
    import os
    import pwd

    entry = pwd.getpwuid(os.geteuid())
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def service_command(paths: SitePaths) -> list[str]:
    return [sys.executable, "-m", "server.cli", "site", "serve", str(paths.config)]


def supernode_command(
    address: str,
    runtime_port: int,
    paths: SitePaths,
    *,
    ca: Path | None,
    key: Path | None,
    secret: Path | None,
) -> list[str]:
    cmd = [_tool("flower-supernode"), "--superlink", address, "--isolation", "process"]
    cmd += ["--port", str(runtime_port), "--node-config", f"site-socket='{paths.socket}'"]
    if ca is None:
        cmd += ["--insecure"]
    else:
        cmd += ["--root-certificates", str(ca), "--auth-supernode-private-key", str(key)]
    if secret is not None:
        cmd += ["--superexec-auth-secret-file", str(secret)]
    return cmd


def superexec_command(runtime_port: int, secret: Path | None) -> list[str]:
    # The runtime link is plain text on loopback, between two processes of this machine. No
    # --parent-pid: Flower checks the parent with kill(pid, 0), which another user may not do, and
    # the SuperExec would stop at once; the deployment stops it with its SuperNode instead.
    cmd = [_tool("flower-superexec"), "--insecure", "--runtime-api-address", f"127.0.0.1:{runtime_port}"]
    if secret is not None:
        cmd += ["--superexec-auth-secret-file", str(secret)]
    return cmd


def _tool(name: str) -> str:
    """Flower's command next to this Python (the users of an isolated site have no PATH of ours)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)
