"""Who is calling: the site's bearer token on every call and, under mutual TLS, its certificate."""

from __future__ import annotations

import hmac

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coordinator.config import FederationConfig, TLSConfig, token_hash
from coordinator.state import Reason, Refused
from rmm.errors import RMMError


def authenticate(
    context: grpc.aio.ServicerContext,
    federation: FederationConfig | None,
    federation_id: str,
    site_id: str,
    *,
    mutual_tls: bool,
) -> None:
    """Refuse the call unless its token is the site's and, under mutual TLS, its certificate too."""
    if federation is None:
        raise Refused(Reason.NOT_FOUND, f"no federation {federation_id!r} on this coordinator; check the federation id")
    token = _bearer(context.invocation_metadata() or ())
    if token is None:
        raise Refused(Reason.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata; send the site's token")
    digest = token_hash(token)
    # Compare with every site, without stopping early, so timing does not tell which sites exist.
    matches = [site for site, cred in federation.sites.items() if hmac.compare_digest(digest, cred.token_sha256)]
    if not matches:
        raise Refused(
            Reason.UNAUTHENTICATED,
            f"the token is not valid for any site of federation {federation_id}; check the site's token",
        )
    if matches[0] != site_id:
        raise Refused(
            Reason.DENIED,
            f"the token belongs to site {matches[0]}, not {site_id!r}; a site can only act as itself",
        )
    if mutual_tls:
        names = context.auth_context().get("x509_common_name", [])
        if [n.decode() for n in names] != [site_id]:
            shown = ", ".join(n.decode() for n in names) or "none"
            raise Refused(
                Reason.DENIED,
                f"the client certificate's common name ({shown}) is not site {site_id}; use the site's own certificate",
            )


def _bearer(metadata) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip() or None
    return None


def server_credentials(tls: TLSConfig) -> grpc.ServerCredentials:
    """TLS from the config's files; with client_ca, clients must present a certificate it signed."""

    def read(path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as e:
            raise RMMError(
                f"cannot read TLS file ({e.strerror}); see `rmm certs` to make development certificates",
                file=path,
            ) from None

    ca = read(tls.client_ca) if tls.client_ca else None
    key, cert = read(tls.key), read(tls.cert)
    # gRPC reports bad PEM only as a failure to listen: check the files here, so the error names them.
    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
    except ValueError:
        raise RMMError("not a PEM certificate (tls.cert)", file=tls.cert) from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise RMMError("not a PEM private key without a password (tls.key)", file=tls.key) from None
    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != public.public_bytes(*spki):
        raise RMMError(f"this key does not belong to the certificate {tls.cert} (tls.key)", file=tls.key)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
