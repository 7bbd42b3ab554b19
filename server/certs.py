"""Credentials for a deployment: a certificate authority, the SuperLink's TLS certificate, site keys.

    fedward certs deploy/certs --sites hospital-a,hospital-b,hospital-c --hosts coordinator.example.org

writes one folder per party, so each gets only what it needs:

    OUT_DIR/ca/ca.crt, ca.key                         the CA; keep ca.key offline (it signs server certs)
    OUT_DIR/superlink/ca.crt, server.pem, server.key  the coordinator's TLS certificate and key
    OUT_DIR/superlink/supernodes/<site>.pub           public keys the coordinator registers
    OUT_DIR/superlink/superexec.secret                shared by the SuperLink and its SuperExec
    OUT_DIR/sites/<site>/ca.crt, auth.key, auth.pub   what hospital <site> needs to connect
    OUT_DIR/sites/<site>/superexec.secret             shared by the site's SuperNode and SuperExec

TLS: the SuperLink's certificate names every host name and address given with `--hosts`, always
with localhost, 127.0.0.1 and ::1 (where the SuperExec beside the SuperLink reaches it), and is signed
by the CA that each site trusts. SuperNode authentication:
each site signs its requests with its own EC P-384 key (OpenSSH format, as Flower reads it); the
SuperLink accepts only sites whose public key was registered (`flwr supernode register`).

The SuperExec secrets authenticate the process that runs fedward's apps to its SuperLink or SuperNode
when they run in separate containers (`--isolation process`, as in deploy/compose and deploy/k8s).

Private keys and secrets are written owner-only (0600). Existing keys are kept and reused (so adding a site later
signs nothing new and changes no other party's files); `--force` replaces them.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import ConfigError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 825  # the longest validity clients accept for a TLS server certificate
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
CURVE = ec.SECP384R1  # Flower's SuperNode authentication needs a NIST curve; P-384 as in its docs


class CertsError(ConfigError):
    """Credentials cannot be made as asked (bad site name, existing files, mismatching certificate)."""


@dataclass
class Credentials:
    """Where everything was written; `made` and `kept` list the files written now and reused."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    superlink_ca: Path
    site_keys: dict[str, Path] = field(default_factory=dict)  # site -> auth.key
    site_pubs: dict[str, Path] = field(default_factory=dict)  # site -> auth.pub
    site_cas: dict[str, Path] = field(default_factory=dict)  # site -> ca.crt
    registered_pubs: dict[str, Path] = field(default_factory=dict)  # site -> superlink/supernodes/<site>.pub
    superexec_secrets: dict[str, Path] = field(default_factory=dict)  # "superlink" or site -> secret file
    made: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def parse_sites(text: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'], each a valid folder and certificate name, without duplicates."""
    sites = [s.strip() for s in text.split(",") if s.strip()]
    if not sites:
        raise CertsError("--sites is empty: give the site names, e.g. --sites hospital-a,hospital-b")
    for s in sites:
        if not SITE_NAME.match(s):
            raise CertsError(
                f"site name '{s}' is not allowed: use lower-case letters, digits, '.', '_' or '-' "
                f"(it names a folder and the site's key), e.g. hospital-a"
            )
    if len(set(sites)) != len(sites):
        raise CertsError(f"--sites names a site twice: {sites}")
    return sites


def parse_hosts(text: str) -> list[x509.GeneralName]:
    """'coordinator.example.org,10.0.0.5' -> SAN entries (an IP address where it parses as one, else a
    DNS name), after localhost, 127.0.0.1 and ::1, which are always named."""
    names: list[x509.GeneralName] = []
    given = [h.strip() for h in text.split(",")]
    if not any(given):
        raise CertsError("--hosts is empty: give the SuperLink's host names and addresses")
    for h in dict.fromkeys([*DEFAULT_HOSTS, *given]):
        if not h:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$", h):
                raise CertsError(f"--hosts: '{h}' is neither an IP address nor a host name") from None
            names.append(x509.DNSName(h))
    return names


# ---------------------------------------------------------------------------------------- writing


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write atomically; private files are created 0600 and never readable by others, even briefly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _secret(path: Path, force: bool, c: Credentials) -> Path:
    """A random shared secret (64 hex digits), kept when it exists unless `force`."""
    if path.exists() and not force:
        c.kept.append(path)
    else:
        _write(path, secrets.token_hex(32).encode(), private=True)
        c.made.append(path)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise CertsError(
            f"{path}: not an unencrypted PEM private key ({err}); remove it or use --force"
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{path}: not an EC private key; remove it or use --force")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as err:
        raise CertsError(f"{path}: cannot read the certificate ({err}); remove it or use --force") from err


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedward"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(CURVE())
    name = _name("fedward study CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_key: ec.EllipticCurvePrivateKey,
    hosts: list[x509.GeneralName],
    days: int,
) -> x509.Certificate:
    first = next((h.value for h in hosts if str(h.value) not in DEFAULT_HOSTS), hosts[0].value)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(f"fedward superlink {first}"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(min(_now() + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def site_public_openssh(key: ec.EllipticCurvePrivateKey, site: str) -> bytes:
    """The public key line `flwr supernode register` reads, with the site name as its comment."""
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" fedward-site:{site}\n".encode()


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _san_strings(cert: x509.Certificate) -> set[str]:
    return {str(n.value) for n in _sans(cert)}


def make_credentials(
    out_dir: str | Path,
    sites: list[str],
    *,
    hosts: list[x509.GeneralName] | None = None,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> Credentials:
    """Make (or complete) the credentials folder; see the module docstring for its layout.

    Without `force`, an existing CA, server key and site keys are reused; the server certificate is
    signed again (for the same key) when the CA is new or `hosts` names a host it lacks.
    """
    if days < 1:
        raise CertsError(f"--days must be at least 1, got {days}")
    out = Path(out_dir)
    c = Credentials(
        out_dir=out,
        ca_cert=out / "ca" / "ca.crt",
        ca_key=out / "ca" / "ca.key",
        server_cert=out / "superlink" / "server.pem",
        server_key=out / "superlink" / "server.key",
        superlink_ca=out / "superlink" / "ca.crt",
    )
    ca_key, ca_cert = _certificate_authority(c, days, force)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _superlink_certificate(c, ca_key, ca_cert, hosts, days, force)
    _write(c.superlink_ca, ca_pem, private=False)
    c.superexec_secrets["superlink"] = _secret(out / "superlink" / "superexec.secret", force, c)
    for site in sites:
        _site_credentials(c, site, ca_pem, force)
    return c


def _certificate_authority(
    c: Credentials, days: int, force: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's key and certificate: the existing ones unless `force`, else new ones written."""
    if c.ca_key.exists() and not force:
        ca_key = _load_key(c.ca_key)
        if not c.ca_cert.exists():
            raise CertsError(f"{c.ca_key} exists but {c.ca_cert} does not: restore it, or use --force")
        ca_cert = _load_cert(c.ca_cert)
        c.kept += [c.ca_key, c.ca_cert]
        return ca_key, ca_cert
    ca_key, ca_cert = make_ca(days)
    _write(c.ca_key, _key_pem(ca_key), private=True)
    _write(c.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    c.made += [c.ca_key, c.ca_cert]
    return ca_key, ca_cert


def _superlink_certificate(
    c: Credentials,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[x509.GeneralName] | None,
    days: int,
    force: bool,
) -> None:
    """The SuperLink's TLS key (kept unless `force`) and certificate, signed again when needed: a new
    CA or key, a host it does not name yet, or a certificate for another key."""
    if c.server_key.exists() and not force:
        server_key = _load_key(c.server_key)
        c.kept.append(c.server_key)
    else:
        server_key = ec.generate_private_key(CURVE())
        _write(c.server_key, _key_pem(server_key), private=True)
        c.made.append(c.server_key)
    old = _load_cert(c.server_cert) if c.server_cert.exists() and not force else None
    wanted = {str(h.value) for h in hosts or []}
    if (
        old is not None
        and c.ca_key not in c.made
        and c.server_key not in c.made
        and wanted <= _san_strings(old)
        and old.public_key() == server_key.public_key()
    ):
        c.kept.append(c.server_cert)
        return
    if hosts is None:
        hosts = _sans(old) if old is not None else []
    cert = make_server_cert(ca_key, ca_cert, server_key, hosts or parse_hosts(",".join(DEFAULT_HOSTS)), days)
    _write(c.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    c.made.append(c.server_cert)


def _site_credentials(c: Credentials, site: str, ca_pem: bytes, force: bool) -> None:
    """One site's authentication key pair (kept unless `force`), its copy of the CA and its secret,
    and its public key in the SuperLink's folder for registration."""
    folder = c.out_dir / "sites" / site
    key_path, pub_path, ca_path = folder / "auth.key", folder / "auth.pub", folder / "ca.crt"
    registered = c.out_dir / "superlink" / "supernodes" / f"{site}.pub"
    if key_path.exists() and not force:
        try:
            key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as err:
            raise CertsError(f"{key_path}: not an OpenSSH private key ({err}); use --force") from err
        c.kept.append(key_path)
    else:
        key = ec.generate_private_key(CURVE())
        openssh = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        _write(key_path, openssh, private=True)
        c.made.append(key_path)
    pub = site_public_openssh(key, site)
    _write(pub_path, pub, private=False)
    _write(registered, pub, private=False)
    _write(ca_path, ca_pem, private=False)
    c.site_keys[site], c.site_pubs[site], c.site_cas[site] = key_path, pub_path, ca_path
    c.superexec_secrets[site] = _secret(folder / "superexec.secret", force, c)
    c.registered_pubs[site] = registered


# ---------------------------------------------------------------------------------------- checks


def verify_chain(cert_path: str | Path, ca_path: str | Path, host: str | None = None) -> None:
    """Check that the CA signed the certificate, it is valid now and (if given) names `host`."""
    cert, ca = _load_cert(Path(cert_path)), _load_cert(Path(ca_path))
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as err:  # InvalidSignature has no common base
        raise CertsError(f"{cert_path} is not signed by the CA in {ca_path}: {err}") from err
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertsError(
            f"{cert_path} is not valid now (valid {cert.not_valid_before_utc} to {cert.not_valid_after_utc})"
        )
    if host is not None and host not in _san_strings(cert):
        raise CertsError(f"{cert_path} does not name '{host}' (it names {sorted(_san_strings(cert))})")


# ---------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder for the credentials (e.g. deploy/certs)")
    parser.add_argument(
        "--sites", required=True, help="comma-separated site names, e.g. hospital-a,hospital-b"
    )
    parser.add_argument(
        "--hosts",
        default=None,
        help=f"comma-separated host names and IP addresses the sites use to reach the SuperLink "
        f"({', '.join(DEFAULT_HOSTS)} are always included)",
    )
    parser.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity of new certificates")
    parser.add_argument("--force", action="store_true", help="replace existing keys and certificates")


def run(args: argparse.Namespace) -> int:
    """`fedward certs`: make the credentials, print what was made and kept and what goes where."""
    hosts = parse_hosts(args.hosts) if args.hosts else None
    c = make_credentials(args.out_dir, parse_sites(args.sites), hosts=hosts, days=args.days, force=args.force)
    for p in c.made:
        print(f"made  {p}")
    for p in c.kept:
        print(f"kept  {p}   (exists; --force replaces it)")
    print(
        f"\ncoordinator: copy {c.out_dir / 'superlink'}/ to the SuperLink and register each site:\n"
        + "".join(f"  flwr supernode register {p} <connection>\n" for p in c.registered_pubs.values())
        + "".join(f"site {s}: give {c.out_dir / 'sites' / s}/ to that hospital only\n" for s in c.site_keys)
        + f"keep {c.ca_key} offline: it signs the SuperLink's certificate"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedward certs", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except CertsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
