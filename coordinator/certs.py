"""Development certificates: a private CA, a server certificate and one client certificate per site.

For loopback demos and tests, not production PKI: the CA key sits beside the certificates it signs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rmm.errors import RMMError

VALID_DAYS = 365


def make_dev_certs(
    out_dir: str | Path, sites: list[str], hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> dict[str, Path]:
    """Write ca.pem/ca.key, server.pem/server.key (SANs: `hosts`) and sites/<site>.pem/.key (CN = site id).

    Returns their paths under the keys "ca_cert", "ca_key", "server_cert", "server_key",
    "<site>_cert" and "<site>_key". Refuses a directory that already holds a CA: replacing it would
    silently invalidate every certificate it signed.
    """
    out = Path(out_dir)
    if (out / "ca.pem").exists():
        raise RMMError("already holds a development CA; remove the directory or choose another one", file=out)
    reserved = {"ca", "server"} & set(sites)
    if reserved:
        raise RMMError(
            f"site id {reserved.pop()!r} would share its key names with the CA or server files; name the site "
            "differently"
        )
    (out / "sites").mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rmm development CA")])
    ca = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca_cert": _write_cert(out / "ca.pem", ca), "ca_key": _write_key(out / "ca.key", ca_key)}

    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [_san(h) for h in hosts]
    server = (
        _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name, server_key)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths["server_cert"] = _write_cert(out / "server.pem", server)
    paths["server_key"] = _write_key(out / "server.key", server_key)

    for site in sites:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]), ca_name, key)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        paths[f"{site}_cert"] = _write_cert(out / "sites" / f"{site}.pem", cert)
        paths[f"{site}_key"] = _write_key(out / "sites" / f"{site}.key", key)
    return paths


def _builder(subject: x509.Name, issuer: x509.Name, key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew between machines
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key) -> Path:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Created 0600 from the start, so the key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path
