"""PostgreSQL over verified TLS: sslmode=verify-full, sslrootcert and a client certificate, all from the DSN."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from exporter.localpg import LocalCluster
from tests.support.exporters import running_exporter
from tests.support.pgbins import bindir_for, selected_major
from tests.support.scrape import wait_for_metric
from tests.support.servers import settings_for

pytestmark = pytest.mark.live

ROLE = "pgvitals_tls"  # `cert` authentication: the client certificate's CN is the role name


@dataclass
class TlsServer:
    cluster: LocalCluster
    ca_file: Path
    client_cert: Path
    client_key: Path

    def dsn(self, rootcert: Path | None = None, host: str = "localhost") -> str:
        return (f"host={host} port={self.cluster.port} dbname=postgres user={ROLE} sslmode=verify-full "
                f"sslrootcert={rootcert or self.ca_file} sslcert={self.client_cert} sslkey={self.client_key}")


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    ca = trustme.CA()
    cluster = LocalCluster(bindir=bindir_for(selected_major()), name="tls", settings={
        "ssl": "on", "ssl_cert_file": "'server.crt'", "ssl_key_file": "'server.key'", "ssl_ca_file": "'ca.crt'",
    }).init()
    server_leaf = ca.issue_cert("localhost", "127.0.0.1")
    for name, blob in (("server.crt", server_leaf.cert_chain_pems[0]), ("server.key", server_leaf.private_key_pem),
                       ("ca.crt", ca.cert_pem)):
        path = cluster.data / name
        blob.write_to_path(str(path))
        path.chmod(0o600)
        if cluster.os_user:
            shutil.chown(path, cluster.os_user, cluster.os_user)
    hba = cluster.data / "pg_hba.conf"
    # Only TLS with a verified client certificate for the monitoring role; the superuser stays as it was.
    hba.write_text(f"hostssl all {ROLE} 127.0.0.1/32 cert\nhost all {ROLE} 127.0.0.1/32 reject\n"
                   + hba.read_text())
    cluster.start()
    cluster.execute(f"CREATE ROLE {ROLE} LOGIN IN ROLE pg_monitor")
    client_dir = tmp_path_factory.mktemp("pgtls")
    client = ca.issue_cert("pgvitals-client.example.org", common_name=ROLE)
    client_cert, client_key, ca_file = client_dir / "client.crt", client_dir / "client.key", client_dir / "ca.pem"
    client.cert_chain_pems[0].write_to_path(str(client_cert))
    client.private_key_pem.write_to_path(str(client_key))
    os.chmod(client_key, 0o600)  # libpq refuses a private key others can read
    ca.cert_pem.write_to_path(str(ca_file))
    yield TlsServer(cluster, ca_file, client_cert, client_key)
    cluster.destroy()


def test_monitored_over_verify_full_with_a_client_certificate(tls_pg: TlsServer) -> None:
    with running_exporter(settings_for([{"name": "tls", "dsn": tls_pg.dsn()}])) as daemon:
        metrics = wait_for_metric(daemon.server.port, "pg_up", lambda v: v == 1, target="tls")
        assert metrics.value("pg_up", target="tls") == 1
        sessions = tls_pg.cluster.execute(
            "SELECT s.ssl, s.client_serial::text AS serial FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            f"WHERE a.usename = '{ROLE}'")
        # pg_hba lets this role in only over TLS with a certificate; the sessions carry ours.
        serial = x509.load_pem_x509_certificate(tls_pg.client_cert.read_bytes()).serial_number
        assert sessions and all(row["ssl"] and row["serial"] == str(serial) for row in sessions), sessions


def test_an_untrusted_server_certificate_is_refused(tls_pg: TlsServer, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with running_exporter(settings_for([{"name": "tls", "dsn": tls_pg.dsn(rootcert=other_ca)}])) as daemon:
        wait_for_metric(daemon.server.port, "pg_up", lambda v: v == 0, target="tls")
