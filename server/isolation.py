"""Operating-system isolation of a site in the local deployment: who may read what.

At a deployed site three parties run, and only one of them is the hospital's own code:

    the site service (`fedward site serve`)   the invoking user   site config, data, cache, ledger
    the SuperNode (Flower)                     NODE_USER          its authentication key
    the SuperExec and every ClientApp          APP_USER           the service's socket, nothing else

The ClientApp is whatever app the coordinator ships (`flwr run` sends a FAB), so it runs as APP_USER,
which can neither read the site's files nor the SuperNode's key, and reaches the site only through the
socket, where the site service applies the site's policy to every request. `prepare_users` makes the
two system users (root only); `grant`/`private` set the files' owners and modes.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NODE_USER = "fedward-node"
APP_USER = "fedward-app"


class IsolationError(RuntimeError):
    """The machine cannot isolate the site's processes; the message says what to do."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def account(name: str) -> Account:
    entry = pwd.getpwnam(name)
    return Account(name, entry.pw_uid, entry.pw_gid)


def prepare_users(*, check_python: bool = True) -> tuple[Account, Account]:
    """The SuperNode's and the ClientApps' system users, made when missing; they must be able to run
    this Python. Needs root."""
    if os.geteuid() != 0:
        raise IsolationError(
            "isolating the ClientApp from the site's files needs root (to run the SuperNode and the "
            "ClientApp as users of their own); run as root, or pass --no-isolation to run every process "
            "as you (the coordinator's code could then read the site's files: for debugging only)"
        )
    accounts = []
    for name in (NODE_USER, APP_USER):
        try:
            pwd.getpwnam(name)
        except KeyError:
            useradd = shutil.which("useradd") or "/usr/sbin/useradd"
            subprocess.run(
                [
                    useradd,
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    name,
                ],
                check=True,
                capture_output=True,
            )
        accounts.append(account(name))
    for acc in accounts if check_python else ():
        _check_can_run_python(acc)
    return accounts[0], accounts[1]


def check_reachable(folder: Path, accounts: tuple[Account, ...]) -> None:
    """The users must be able to enter `folder` (the deployment's own folder, which holds theirs)."""
    for acc in accounts:
        blocked = [p for p in [folder, *folder.parents] if not _traversable_by(p, acc)]
        if blocked:
            raise IsolationError(
                f"user {acc.name} cannot enter {folder}: {blocked[-1]} is closed to other users; choose a "
                f"folder they can reach (e.g. under /tmp or /srv), or `chmod o+x {blocked[-1]}`"
            )


def open_python_to_users(accounts: tuple[Account, ...]) -> list[Path]:
    """Let `accounts` run this Python: grant them passage (execute, not read) through every folder
    above it that is closed to them, by ACL where `setfacl` exists, else by the folder's 'other'
    execute bit. Returns the folders changed. For a machine's administrator to run once, on purpose
    (`python -m server.isolation`)."""
    changed = []
    for folder in reversed(Path(sys.executable).parents):
        if all(_traversable_by(folder, acc) for acc in accounts):
            continue
        setfacl = shutil.which("setfacl")
        if setfacl:
            entries = ",".join(f"u:{acc.name}:x" for acc in accounts)
            subprocess.run([setfacl, "-m", entries, str(folder)], check=True)
        else:
            os.chmod(folder, folder.stat().st_mode | 0o001)
        changed.append(folder)
    return changed


def _check_can_run_python(acc: Account) -> None:
    blocked = [p for p in Path(sys.executable).parents if not _traversable_by(p, acc)]
    if blocked:
        raise IsolationError(
            f"user {acc.name} cannot run {sys.executable}: the folder {blocked[-1]} is closed to other "
            f"users. Let them through it without listing it: `setfacl -m u:{NODE_USER}:x,u:{APP_USER}:x "
            f"{blocked[-1]}` (Debian package acl), or `chmod o+x {blocked[-1]}`, or install Python and "
            "fedward where every user can run them"
        )


def _traversable_by(path: Path, acc: Account) -> bool:
    """Whether `acc` may enter `path` (owner, group or other execute bit, or an ACL entry for it)."""
    st = path.stat()
    if st.st_uid == acc.uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == acc.gid:
        return bool(st.st_mode & 0o010)
    if st.st_mode & 0o001:
        return True
    getfacl = shutil.which("getfacl")
    if getfacl:
        out = subprocess.run([getfacl, "-p", str(path)], capture_output=True, text=True).stdout
        return any(line.startswith(f"user:{acc.name}:") and line.endswith("x") for line in out.splitlines())
    return False


def own(path: Path, acc: Account, mode: int, *, group: str | None = None, recursive: bool = True) -> None:
    """Give `path` (and, when `recursive`, everything under it) to `acc`: files get `mode` without the
    execute bits, folders `mode` with an execute bit wherever it has a read bit."""
    gid = grp.getgrnam(group).gr_gid if group else acc.gid
    folder_mode = mode | ((mode & 0o444) >> 2)  # whoever may read may enter
    paths = [path, *path.rglob("*")] if path.is_dir() and recursive else [path]
    for p in paths:
        os.chown(p, acc.uid, gid)
        os.chmod(p, folder_mode if p.is_dir() else mode & 0o666)


def private(path: Path) -> None:
    """Only the invoking user may read `path` (and what is under it)."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if p.is_symlink() or p.is_socket():
            continue
        os.chmod(p, 0o700 if p.is_dir() else 0o600)


if __name__ == "__main__":  # python -m server.isolation: make the users and let them run this Python
    users = prepare_users(check_python=False)
    for folder in open_python_to_users(users):
        print(f"{', '.join(a.name for a in users)} may now pass through {folder} (not list it)")
    print(f"users {', '.join(f'{a.name} ({a.uid})' for a in users)} can run {sys.executable}")
