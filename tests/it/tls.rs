//! TLS both ways with certificates the test makes itself: clients verify pgsurge (verify-full), pgsurge
//! verifies Postgres (verify-full), and the refusals when either side is not what it should be.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgsurge::config::{Dur, Settings};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::harness::{code, connect, try_connect, unique, Pg, Proxy};

/// A CA and a certificate it signed for localhost / 127.0.0.1, written as PEM files in a fresh directory.
pub(crate) struct Certs {
    dir: PathBuf,
}

impl Certs {
    pub(crate) fn new() -> Certs {
        let dir = std::env::temp_dir().join(unique("pgsurge-tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "pgsurge test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "localhost");
        let key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(dir.join("server.crt"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        Certs { dir }
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// psql with libpq's own TLS checks; returns (success, output).
async fn psql(conn: &str, sql: &str) -> (bool, String) {
    let out = tokio::process::Command::new("psql").args(["-X", "-At", "-d", conn, "-c", sql]).output().await.expect("psql");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_string())
}

#[tokio::test]
async fn clients_verify_pgsurge_with_verify_full_and_require_refuses_plain_clients() {
    let certs = Certs::new();
    let proxy = Proxy::start(Settings {
        client_tls_cert: Some(certs.path("server.crt")),
        client_tls_key: Some(certs.path("server.key")),
        client_tls_mode: Some("require".into()),
        admin_users: Some("app".into()),
        ..Default::default()
    })
    .await;
    let port = proxy.addr.port();
    let ca = certs.path("ca.crt");
    let url = |host: &str, mode: &str, ca: &Path| {
        format!("host={host} port={port} user=app password=app dbname=app sslmode={mode} sslrootcert={}", ca.display())
    };
    let (ok, out) = psql(&url("localhost", "verify-full", &ca), "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").await;
    assert!(ok, "verify-full through pgsurge: {out}");

    let other = Certs::new();
    let (ok, out) = psql(&url("localhost", "verify-full", &other.path("ca.crt")), "SELECT 1").await;
    assert!(!ok && out.contains("SSL"), "a client trusting another CA refuses pgsurge: {out}");

    let Err(err) = try_connect(&proxy.app_url()).await else { panic!("a plain client is refused under require") };
    assert_eq!(code(&err), "28000");

    let Err(err) = try_connect(&proxy.url("app", "app", "pgsurge")).await else { panic!("plain console clients are refused too") };
    assert_eq!(code(&err), "28000");
    let (ok, out) = psql(&format!("{} dbname=pgsurge", url("127.0.0.1", "verify-full", &ca)), "SHOW CLIENTS").await;
    assert!(ok && out.contains("TLS"), "SHOW CLIENTS marks TLS clients: {out}");
}

#[tokio::test]
async fn allow_serves_plain_and_tls_clients_alike() {
    let certs = Certs::new();
    let proxy = Proxy::start(Settings {
        client_tls_cert: Some(certs.path("server.crt")),
        client_tls_key: Some(certs.path("server.key")),
        ..Default::default()
    })
    .await;
    let c = connect(&proxy.app_url()).await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let conn = format!(
        "host=localhost port={} user=app password=app dbname=app sslmode=verify-full sslrootcert={}",
        proxy.addr.port(),
        certs.path("ca.crt").display()
    );
    let (ok, out) = psql(&conn, "SELECT 1").await;
    assert!(ok && out == "1", "{out}");
}

/// A cluster of its own with ssl = on and the test's certificate.
fn pg_with_tls(certs: &Certs) -> Pg {
    let pg = Pg::start();
    let data = pg.dir.as_ref().unwrap().join("data");
    for (from, to) in [("server.crt", "server.crt"), ("server.key", "server.key")] {
        std::fs::copy(certs.path(from), data.join(to)).unwrap();
    }
    let mut chown = std::process::Command::new("sh");
    chown.args([
        "-c",
        &format!(
            "chmod 600 {0}/server.key; [ $(id -u) = 0 ] && chown postgres:postgres {0}/server.crt {0}/server.key; true",
            data.display()
        ),
    ]);
    assert!(chown.status().unwrap().success());
    pg.psql_super("postgres", "ALTER SYSTEM SET ssl = on");
    pg.psql_super("postgres", "SELECT pg_reload_conf()");
    pg
}

#[tokio::test]
async fn pgsurge_verifies_postgres_with_verify_full_and_refuses_a_server_it_cannot_trust() {
    if std::env::var("PGSURGE_TEST_DATABASE_URL").is_ok() {
        return; // needs a cluster of its own with ssl on
    }
    let certs = Certs::new();
    let pg = pg_with_tls(&certs);
    let settings = |ca: PathBuf| Settings {
        server_tls_mode: Some("verify-full".into()),
        server_tls_ca_file: Some(ca),
        query_wait_timeout: Some(Dur(Duration::from_secs(2))),
        ..Default::default()
    };
    let proxy = Proxy::start_for(&pg, settings(certs.path("ca.crt"))).await;
    let c = connect(&proxy.app_url()).await;
    let row = c.query_one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).await.unwrap();
    assert!(row.get::<_, bool>(0), "the server connection is encrypted ({})", row.get::<_, String>(1));

    let other = Certs::new();
    let untrusting = Proxy::start_for(&pg, settings(other.path("ca.crt"))).await;
    let Err(err) = try_connect(&untrusting.app_url()).await else { panic!("a server with an unknown CA is refused") };
    assert_eq!(code(&err), "08001");
    let msg = err.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(msg.contains("certificate"), "the reason names the certificate: {msg}");

    let plain = Pg::start();
    let Err(err) = try_connect(&Proxy::start_for(&plain, settings(certs.path("ca.crt"))).await.app_url()).await else {
        panic!("verify-full refuses a server without TLS")
    };
    assert_eq!(code(&err), "08001");
}
