"""`fedward certs`: the chain verifies in a real TLS handshake, SANs are there, keys are 0600 and kept."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.cli.supernode.register import try_load_public_key

from server.certs import CertsError, main, make_credentials, verify_chain

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def _sans(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}


def _handshake(creds, host: str) -> str:
    """A real TLS handshake on loopback: the server presents server.pem, the client trusts only ca.crt."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    client_ctx = ssl.create_default_context(cafile=str(creds.site_cas["hospital-a"]))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=host) as tls:
                return tls.recv(2).decode()
    finally:
        thread.join(timeout=10)
        listener.close()


def test_certs_command_makes_a_verifiable_chain_with_the_given_hosts(tmp_path, capsys):
    rc = main(
        [
            str(tmp_path),
            "--sites",
            ",".join(SITES),
            "--hosts",
            "localhost,127.0.0.1,::1,superlink.example.org",
        ]
    )

    assert rc == 0
    creds = make_credentials(tmp_path, SITES)  # reads back what the command wrote, changes nothing
    assert creds.made == []
    verify_chain(creds.server_cert, creds.ca_cert, host="superlink.example.org")
    assert _sans(creds.server_cert) == {"localhost", "127.0.0.1", "::1", "superlink.example.org"}
    ip_sans = x509.load_pem_x509_certificate(
        creds.server_cert.read_bytes()
    ).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ipaddress.ip_address("127.0.0.1") in ip_sans.value.get_values_for_type(x509.IPAddress)
    ca = x509.load_pem_x509_certificate(creds.ca_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    for site in SITES:  # every site trusts the same CA, byte for byte
        assert creds.site_cas[site].read_bytes() == creds.ca_cert.read_bytes()
    assert "flwr supernode register" in capsys.readouterr().out


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_a_client_that_trusts_the_ca_completes_a_tls_handshake(tmp_path, host):
    creds = make_credentials(tmp_path, SITES)

    assert _handshake(creds, host) == "ok"


def test_a_client_with_another_ca_or_host_name_is_refused(tmp_path):
    creds = make_credentials(tmp_path / "study", SITES)
    other = make_credentials(tmp_path / "other", SITES)
    creds.site_cas["hospital-a"] = other.site_cas["hospital-a"]

    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(creds, "localhost")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|doesn't match"):
        _handshake(make_credentials(tmp_path / "study", SITES), "superlink.example.org")


def test_private_keys_and_secrets_are_owner_only(tmp_path):
    creds = make_credentials(tmp_path, SITES)

    private = [creds.ca_key, creds.server_key, *creds.site_keys.values(), *creds.superexec_secrets.values()]
    assert len(private) == 2 + 2 * len(SITES) + 1
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in [creds.ca_cert, creds.server_cert, *creds.site_pubs.values()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0o044, path  # public files stay readable
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))  # no temporary files left


def test_site_keys_are_p384_keys_in_the_formats_flower_reads(tmp_path):
    creds = make_credentials(tmp_path, SITES)

    for site in SITES:
        key = serialization.load_ssh_private_key(creds.site_keys[site].read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        public = try_load_public_key(creds.registered_pubs[site])  # what `flwr supernode register` does
        assert public == key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert creds.site_pubs[site].read_bytes() == creds.registered_pubs[site].read_bytes()
    keys = {creds.site_keys[s].read_bytes() for s in SITES}
    assert len(keys) == len(SITES)


def test_existing_keys_are_kept_and_reused_unless_forced(tmp_path):
    first = make_credentials(tmp_path, SITES[:2])
    before = {p: p.read_bytes() for p in first.made}

    second = make_credentials(tmp_path, SITES)  # add a third hospital later
    assert {p: p.read_bytes() for p in before} == before
    assert set(second.made) == {second.site_keys["hospital-c"], second.superexec_secrets["hospital-c"]}
    verify_chain(second.server_cert, second.site_cas["hospital-c"], host="localhost")

    rc = main([str(tmp_path), "--sites", ",".join(SITES), "--force"])
    assert rc == 0
    assert first.ca_key.read_bytes() != before[first.ca_key]
    assert first.site_keys["hospital-a"].read_bytes() != before[first.site_keys["hospital-a"]]
    verify_chain(first.server_cert, first.site_cas["hospital-a"], host="127.0.0.1")


def test_a_new_host_re_signs_the_server_certificate_for_the_same_key(tmp_path):
    first = make_credentials(tmp_path, SITES)
    key = first.server_key.read_bytes()

    again = make_credentials(tmp_path, SITES, hosts=None)
    assert first.server_cert in again.kept
    rc = main([str(tmp_path), "--sites", "hospital-a", "--hosts", "coordinator.example.org,10.0.0.5"])

    assert rc == 0
    assert first.server_key.read_bytes() == key
    assert _sans(first.server_cert) == {
        "localhost",
        "127.0.0.1",
        "::1",
        "coordinator.example.org",
        "10.0.0.5",
    }
    verify_chain(first.server_cert, first.ca_cert, host="10.0.0.5")


@pytest.mark.parametrize(
    "sites, hosts, message",
    [
        ("Hospital A", None, "not allowed"),
        ("a,a", None, "twice"),
        (",", None, "empty"),
        ("a", "bad host!", "neither an IP address nor a host name"),
    ],
)
def test_bad_arguments_are_refused_with_a_message(tmp_path, capsys, sites, hosts, message):
    argv = [str(tmp_path), "--sites", sites] + (["--hosts", hosts] if hosts else [])

    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "ca").exists()


def test_a_certificate_from_another_ca_does_not_verify(tmp_path):
    creds = make_credentials(tmp_path / "study", SITES)
    other = make_credentials(tmp_path / "other", SITES)

    with pytest.raises(CertsError, match="not signed by the CA"):
        verify_chain(creds.server_cert, other.ca_cert)
    with pytest.raises(CertsError, match="does not name"):
        verify_chain(creds.server_cert, creds.ca_cert, host="elsewhere.example.org")
