"""deploy/: compose files and Kubernetes manifests parse, and every service has its certificates,
ports and mounts: each file a flag names is in a mounted folder that `fedward certs` fills."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from common.config import load_site
from server.certs import make_credentials
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
FLWR = version("flwr")
CERT_FLAGS = {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--root-certificates"}
SECRET_FLAGS = {"--auth-supernode-private-key", "--superexec-auth-secret-file"}


def _flags(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args:
        key, _, value = a.partition("=")
        out[key] = value
    return out


def _interpolate(text: str) -> str:
    """Compose's ${VAR:-default} -> default, ${VAR} / ${VAR:?msg} -> <VAR>."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", text)
    return re.sub(r"\$\{(\w+)(:\?[^}]*)?\}", r"<\1>", text)


def _compose_mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """container path -> (host path or volume name, read-only)."""
    mounts = {}
    for v in service.get("volumes", []):
        parts = _interpolate(v).split(":")
        mounts[parts[1]] = (parts[0], parts[2:] == ["ro"])
    return mounts


def _mount_of(path: str, mounts: dict[str, tuple]) -> str | None:
    """The mount point that holds `path` (longest prefix)."""
    best = None
    for point in mounts:
        if (path == point or path.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) > len(best)
        ):
            best = point
    return best


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return make_credentials(tmp_path_factory.mktemp("certs"), ["hospital-a"])


def _compose(name: str) -> dict:
    return yaml.safe_load((DEPLOY / "compose" / name).read_text())


def _cert_files_exist(flags: dict, mounts: dict, folder: Path) -> None:
    """Every file a certificate or key flag names is in a read-only mount of `folder`."""
    for flag in CERT_FLAGS | SECRET_FLAGS:
        if flag not in flags:
            continue
        path = flags[flag]
        point = _mount_of(path, mounts)
        assert point is not None, f"{flag}={path} is not in any mount"
        assert mounts[point][1], f"{point} holds {flag} but is not mounted read-only"
        assert (folder / Path(path).relative_to(point)).is_file(), f"`fedward certs` writes no {path}"


def test_coordinator_compose_runs_a_tls_superlink_with_supernode_auth(creds):
    services = _compose("coordinator.yaml")["services"]
    link, app = services["superlink"], services["serverapp"]
    flags = _flags(link["command"])

    assert set(services) == {"superlink", "serverapp"}
    assert link["image"] == f"flwr/superlink:{FLWR}"
    assert {"--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"} <= set(flags)
    assert "--insecure" not in flags
    mounts = _compose_mounts(link)
    assert mounts["/certs"][0].endswith("certs/superlink")
    _cert_files_exist(flags, mounts, creds.out_dir / "superlink")
    assert link["ports"] == [f"{flags['--port']}:{flags['--port']}"]
    assert _mount_of(flags["--database"], mounts) == "/state" and not mounts["/state"][1]
    assert link["restart"] == "unless-stopped"

    app_flags = _flags(app["command"])
    assert app["network_mode"] == "service:superlink"
    assert app_flags["--runtime-api-address"] == f"127.0.0.1:{flags['--port']}"
    assert "--insecure" not in app_flags and "--root-certificates" in app_flags
    app_mounts = _compose_mounts(app)
    _cert_files_exist(app_flags, app_mounts, creds.out_dir / "superlink")
    assert app_flags["--superexec-auth-secret-file"] == flags["--superexec-auth-secret-file"]
    assert app_mounts["/studies"][1] and not app_mounts["/runs"][1]
    assert (ROOT / "deploy" / "compose" / app["build"]["context"] / app["build"]["dockerfile"]).is_file()


def test_site_compose_keeps_the_data_with_the_site_service_and_away_from_the_clientapp(creds):
    services = _compose("site.yaml")["services"]
    site, node, app = services["site"], services["supernode"], services["clientapp"]
    flags = _flags(node["command"])

    assert set(services) == {"site", "supernode", "clientapp"}
    assert node["image"] == f"flwr/supernode:{FLWR}"
    assert {"--root-certificates", "--auth-supernode-private-key", "--superlink", "--node-config"} <= set(
        flags
    )
    assert "--insecure" not in flags and flags["--isolation"] == "process"
    mounts = _compose_mounts(node)
    assert mounts["/certs"][0] == "../certs/sites/<FEDWARD_SITE>"
    _cert_files_exist(flags, mounts, creds.out_dir / "sites" / "hospital-a")
    assert not any("ports" in s for s in services.values())  # a site only connects out
    assert all(s["restart"] == "unless-stopped" for s in services.values())

    # the site service: the data read-only, the ledger on its own volume, the config, the socket
    site_mounts = _compose_mounts(site)
    assert site["entrypoint"] == ["fedward", "site", "serve"] and site["network_mode"] == "none"
    config_path = site["command"][0]
    assert site_mounts[config_path] == ("../site/site.yaml", True)
    assert site_mounts["/data"][1], "the hospital's data must be mounted read-only"
    config = load_site(DEPLOY / "site" / "site.yaml")
    assert _mount_of(config.data.path, site_mounts) == "/data"
    assert (
        _mount_of(config.state_dir, site_mounts) == "/var/lib/fedward"
        and not site_mounts["/var/lib/fedward"][1]
    )
    socket = re.fullmatch(r"site-socket='(.+)'", flags["--node-config"]).group(1)
    assert socket == config.service.socket and _mount_of(socket, site_mounts) == "/run/fedward"

    # the ClientApp's runner: the socket and its secret, no data, no ledger, no config, no key
    app_flags = _flags(app["command"])
    app_mounts = _compose_mounts(app)
    assert set(app_mounts) == {"/run/fedward", "/secret/superexec.secret"}
    assert app_mounts["/run/fedward"][0] == site_mounts["/run/fedward"][0] == "site-socket"
    assert app["network_mode"] == "service:supernode"
    assert app_flags["--runtime-api-address"] == f"127.0.0.1:{flags['--port']}"
    assert flags["--host"] == "127.0.0.1"  # the plain-text runtime link never leaves the pod
    secret = app_mounts["/secret/superexec.secret"]
    assert secret[1] and secret[0].endswith("/sites/<FEDWARD_SITE>/superexec.secret")


def _k8s(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _pod(docs: dict, deployment: str) -> tuple[dict, dict]:
    spec = docs[f"Deployment/{deployment}"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}, {v["name"]: v for v in spec["volumes"]}


def _k8s_mounts(container: dict) -> dict[str, tuple[str, bool]]:
    return {m["mountPath"]: (m["name"], bool(m.get("readOnly"))) for m in container.get("volumeMounts", [])}


def test_coordinator_manifest_matches_the_compose_file(creds):
    docs = _k8s("coordinator.yaml")
    containers, volumes = _pod(docs, "fedward-superlink")
    link, app = containers["superlink"], containers["serverapp"]
    flags = _flags(link["args"])

    assert link["image"] == f"flwr/superlink:{FLWR}"
    assert flags == _flags(_compose("coordinator.yaml")["services"]["superlink"]["command"])
    mounts = _k8s_mounts(link)
    _cert_files_exist(flags, mounts, creds.out_dir / "superlink")
    assert volumes[mounts["/certs"][0]]["secret"]["secretName"] == "fedward-superlink-certs"
    assert volumes[mounts["/state"][0]]["persistentVolumeClaim"]["claimName"] in {
        d["metadata"]["name"] for k, d in docs.items() if k.startswith("PersistentVolumeClaim/")
    }
    port = int(flags["--port"])
    assert [p["containerPort"] for p in link["ports"]] == [port]
    service = docs["Service/fedward-superlink"]["spec"]
    assert [(p["port"], p["targetPort"]) for p in service["ports"]] == [(port, port)]
    app_flags = _flags(app["args"])
    assert app_flags["--runtime-api-address"] == f"127.0.0.1:{port}"
    _cert_files_exist(app_flags, _k8s_mounts(app), creds.out_dir / "superlink")


def test_site_manifest_matches_the_compose_file(creds):
    docs = _k8s("site.yaml")
    containers, volumes = _pod(docs, "fedward-site")
    site, node, app = containers["site"], containers["supernode"], containers["clientapp"]
    flags = _flags(node["args"])
    compose = _flags(_compose("site.yaml")["services"]["supernode"]["command"])

    assert set(containers) == {"site", "supernode", "clientapp"}
    assert node["image"] == f"flwr/supernode:{FLWR}"
    assert {k: v for k, v in flags.items() if k != "--superlink"} == {
        k: v for k, v in compose.items() if k != "--superlink"
    }
    _cert_files_exist(flags, _k8s_mounts(node), creds.out_dir / "sites" / "hospital-a")
    assert not any(k.startswith("Service/") for k in docs)  # nothing listens at a hospital
    site_mounts = _k8s_mounts(site)
    assert site["command"] == ["fedward", "site", "serve"]
    assert site_mounts["/data"][1] and volumes["data"]["persistentVolumeClaim"]["readOnly"] is True
    assert site_mounts["/etc/fedward"] == ("site-config", True)
    assert not site_mounts["/var/lib/fedward"][1]
    app_mounts = _k8s_mounts(app)
    assert set(app_mounts) == {"/secret", "/run/fedward"}  # no data, ledger, config or key
    assert (
        app_mounts["/run/fedward"][0] == site_mounts["/run/fedward"][0] == "socket"
        and "emptyDir" in volumes["socket"]
    )
    assert volumes["runner-secret"]["secret"]["items"] == [
        {"key": "superexec.secret", "path": "superexec.secret"}
    ]
    _cert_files_exist(_flags(app["args"]), app_mounts, creds.out_dir / "sites" / "hospital-a")
    assert docs["Deployment/fedward-site"]["spec"]["replicas"] == 1  # one SuperNode per site key


def test_dockerfile_builds_on_flowers_superexec_image_of_the_pinned_version():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()

    assert f"FROM flwr/superexec:{FLWR}" in text
    assert re.search(rf'"flwr\[simulation\]=={re.escape(FLWR)}"', (ROOT / "pyproject.toml").read_text())


def test_local_deployment_site_configs_are_the_studys_partitions():
    from common.config import load_study
    from common.simulated import simulated_sites

    study = load_study(DEPLOY / "local" / "study.yaml")
    simulated = simulated_sites(study)
    sites = [load_site(p) for p in sorted((DEPLOY / "local" / "sites").glob("*.yaml"))]

    assert [s.site for s in sites] == [s.site for s in simulated]
    for site, sim in zip(sites, simulated, strict=True):
        assert (site.data.format, site.data.partition, site.data.synthetic) == (
            sim.data.format,
            sim.data.partition,
            sim.data.synthetic,
        )
    assert len({s.privacy.max_epsilon for s in sites}) == len(sites)  # each hospital its own policy
