//! Tests of the pgbouncer.ini reader: every supported key, `%include`, unknown keys, and the config it builds.

use super::*;
use crate::config::{Config, PoolMode};
use std::time::Duration;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pgsurge-ini-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn recognised_by_its_pgbouncer_section() {
    assert!(is_ini("[databases]\na = host=x\n[pgbouncer]\nlisten_port = 1\n"));
    assert!(is_ini("  [PgBouncer]  \n"));
    assert!(!is_ini("pool_size = 3\n[databases.a]\nhost = \"x\"\n"));
}

#[test]
fn connection_strings_with_quotes() {
    let kv = connstr("host=/tmp port=5433 dbname=p0 connect_query='set a=1; set b=''x'''  user = u").unwrap();
    assert_eq!(
        kv,
        vec![
            ("host".into(), "/tmp".into()),
            ("port".into(), "5433".into()),
            ("dbname".into(), "p0".into()),
            ("connect_query".into(), "set a=1; set b='x'".into()),
            ("user".into(), "u".into()),
        ]
    );
    assert!(connstr("host").is_err());
    assert!(connstr("a='open").is_err());
    assert_eq!(seconds("1.5").unwrap().0, Duration::from_millis(1500));
    assert_eq!(seconds("250ms").unwrap().0, Duration::from_millis(250));
    assert!(seconds("soon").is_err());
}

#[test]
fn every_supported_key_lands_in_the_config() {
    let d = tmpdir("keys");
    write(&d, "users.txt", "\"app\" \"secret\"\n\"pgbouncer\" \"\"\n");
    let ini = write(
        &d,
        "pgbouncer.ini",
        &format!(
            "[databases]\n\
             app = host=/var/run/postgresql port=5433 dbname=appdb user=app password=pw pool_size=7 min_pool_size=2 \
             reserve_pool_size=1 pool_mode=session max_db_connections=9 max_db_client_connections=11 \
             connect_query='select 1' client_encoding=UTF8 datestyle=ISO timezone=UTC auth_user=app auth_dbname=appdb server_lifetime=30\n\
             * = host=127.0.0.1 port=5432\n\
             [users]\n\
             app = pool_size=3 max_user_client_connections=4 max_user_connections=5 pool_mode=transaction reserve_pool_size=1\n\
             [pgbouncer]\n\
             listen_addr = *\nlisten_port = 6543\nunix_socket_dir = {dir}\nauth_type = md5\nauth_file = {dir}/users.txt\n\
             auth_query = SELECT 1\nauth_user = app\npool_mode = transaction\ndefault_pool_size = 12\nmin_pool_size = 1\n\
             reserve_pool_size = 2\nreserve_pool_timeout = 3\nmax_client_conn = 100\nmax_db_connections = 50\n\
             max_user_connections = 40\nmax_db_client_connections = 30\nmax_user_client_connections = 20\nquery_timeout = 5\n\
             query_wait_timeout = 6\nidle_transaction_timeout = 7\nclient_idle_timeout = 8\nserver_lifetime = 9\n\
             server_idle_timeout = 10\nserver_connect_timeout = 11\nserver_login_retry = 12\nclient_login_timeout = 13\n\
             server_check_delay = 14\nmax_prepared_statements = 15\nadmin_users = pgbouncer\nstats_users = app\n\
             server_tls_sslmode = disable\nlogfile = {dir}/pgb.log\npidfile = {dir}/pgb.pid\nshutdown_timeout = 4\n",
            dir = d.display()
        ),
    );
    let c = Config::load(Settings { config: Some(ini), ..Default::default() }).unwrap();
    assert_eq!(c.listen, "0.0.0.0:6543");
    assert_eq!(c.unix_socket_path().unwrap(), d.join(".s.PGSQL.6543"));
    assert_eq!(c.admin_listen, None, "the HTTP endpoint is off unless asked for");
    assert_eq!(c.auth_type, crate::config::AuthMethod::Md5);
    assert_eq!((c.pool_mode, c.pool_size, c.min_pool_size, c.max_client_conn), (PoolMode::Transaction, 12, 1, 100));
    assert_eq!(c.query_wait_timeout, Duration::from_secs(6));
    assert_eq!(c.server_lifetime, Duration::from_secs(9));
    assert_eq!(c.server_idle_timeout, Duration::from_secs(10));
    assert_eq!(c.server_connect_timeout, Duration::from_secs(11));
    assert_eq!(c.client_login_timeout, Duration::from_secs(13));
    assert_eq!(c.server_check_delay, Duration::from_secs(14));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(4));
    assert_eq!(c.max_prepared_statements, 15);
    assert_eq!((c.admin_users.clone(), c.stats_users.clone()), (vec!["pgbouncer".to_string()], vec!["app".to_string()]));
    assert_eq!(c.auth_user.as_ref().map(|u| u.0.as_str()), Some("app"));
    assert_eq!(c.auth_query, "SELECT 1");
    assert_eq!(c.server_tls.mode, crate::tls::SslMode::Disable);
    assert_eq!(c.logfile.as_deref(), Some(d.join("pgb.log").as_path()));
    assert_eq!(c.pidfile.as_deref(), Some(d.join("pgb.pid").as_path()));
    assert_eq!((c.limits.max_db_connections, c.limits.max_user_connections), (50, 40));
    assert_eq!(c.limits.query_timeout, Duration::from_secs(5));
    assert_eq!(c.limits.idle_transaction_timeout, Duration::from_secs(7));
    let app = &c.databases["app"];
    assert_eq!((app.host.as_str(), app.port, app.dbname.as_str()), ("/var/run/postgresql", 5433, "appdb"));
    assert_eq!(app.user, Some(("app".into(), Some("pw".into()))));
    assert_eq!((app.pool_size, app.pool_mode, app.min_pool_size), (7, PoolMode::Session, Some(2)));
    assert_eq!(app.connect_query.as_deref(), Some("select 1"));
    assert_eq!(app.startup.get("timezone").map(String::as_str), Some("UTC"));
    assert_eq!(app.server_lifetime, Some(Duration::from_secs(30)));
    assert_eq!(c.databases["*"].host, "127.0.0.1");
    assert_eq!(c.users["app"].pool_size, Some(3), "[users] pool_size applies to a user of the auth_file");
    assert!(c.users.contains_key("pgbouncer"));
    // Client caps became connection caps of the [limits] table, per database and per user.
    assert_eq!(c.limits.databases["app"].max_connections, Some(11));
    assert_eq!(c.limits.users["app"].max_connections, Some(4));
    assert_eq!(c.limits.per_database.max_connections, Some(30));
    assert_eq!(c.limits.per_user.max_connections, Some(20));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn include_and_unknown_keys() {
    let d = tmpdir("include");
    write(&d, "users.txt", "\"u\" \"p\"\n");
    write(&d, "extra.ini", "[databases]\nother = host=127.0.0.1 dbname=o load_balance_hosts=disable\n");
    let ini = write(
        &d,
        "main.ini",
        "[databases]\nmain = host=127.0.0.1,127.0.0.2 port=5432,5433 dbname=m\n%include extra.ini\n[pgbouncer]\nauth_file = users.txt\n\
         tcp_keepalive = 1\nso_much_nonsense = 3\nauth_type = hba\npool_mode = statement\nunix_socket_dir =\n",
    );
    let r = read(&ini).unwrap();
    assert!(r.settings.databases.contains_key("main") && r.settings.databases.contains_key("other"), "the include was read");
    let names = r.ignored.join("\n");
    for key in ["so_much_nonsense", "auth_type = hba", "pool_mode = statement", "load_balance_hosts"] {
        assert!(names.contains(key), "{key} is named as ignored in {names}");
    }
    assert_eq!(r.settings.pool_mode.as_deref(), Some("transaction"));
    assert_eq!(r.settings.server_tcp_keepalive, Some(true), "tcp_keepalive applies to server connections");
    let main = &r.settings.databases["main"];
    assert_eq!(main.host.as_deref(), Some("127.0.0.1,127.0.0.2"), "a host list is tried in order");
    assert_eq!(main.port.as_ref().map(|p| p.0.clone()), Some(vec![5432, 5433]));
    assert_eq!(r.settings.unix_socket_dir.as_deref(), Some(""), "an empty unix_socket_dir turns the socket off");
    // A bad value names the file, line and key.
    let bad = write(&d, "bad.ini", "[pgbouncer]\nserver_lifetime = invalid\n");
    let e = read(&bad).unwrap_err().to_string();
    assert!(e.contains("bad.ini:2") && e.contains("server_lifetime"), "{e}");
    let loops = write(&d, "loop.ini", "[pgbouncer]\n%include loop.ini\n");
    assert!(read(&loops).is_err(), "an include loop is an error, not a hang");
    let _ = std::fs::remove_dir_all(&d);
}
