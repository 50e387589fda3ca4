//! Logging in: SCRAM by default, md5 and trust per user, auth_file users with SCRAM passthrough.

use pgsurge::config::{Settings, UserSettings};

use crate::harness::{code, connect, pg, try_connect, Proxy};

#[tokio::test]
async fn the_upstream_user_logs_in_with_scram_and_a_wrong_password_gets_28p01() {
    let proxy = Proxy::start(Settings::default()).await;
    let c = proxy.client().await;
    let row = c.query_one("SELECT 40 + 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);

    let Err(err) = try_connect(&proxy.url("app", "wrong", "app")).await else { panic!("wrong password refused") };
    assert_eq!(code(&err), "28P01");
    let Err(err) = try_connect(&proxy.url("nobody", "app", "app")).await else { panic!("unknown user refused") };
    assert_eq!(code(&err), "28P01", "an unknown user looks like a wrong password");
}

#[tokio::test]
async fn an_unknown_database_is_3d000() {
    let proxy = Proxy::start(Settings::default()).await;
    let err = try_connect(&proxy.url("app", "app", "nope")).await.err().unwrap();
    assert_eq!(code(&err), "3D000");
}

#[tokio::test]
async fn an_auth_file_user_with_a_scram_secret_logs_in_upstream_by_passthrough() {
    let pg = pg();
    let user = crate::harness::unique("pt");
    pg.psql_super("app", &format!("CREATE ROLE {user} LOGIN PASSWORD 'pt-secret'; GRANT ALL ON DATABASE app TO {user};"));
    let secret = pg.psql_super("postgres", &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'"));
    assert!(secret.starts_with("SCRAM-SHA-256$"));
    let file = std::env::temp_dir().join(format!("{user}.txt"));
    std::fs::write(&file, format!("\"{user}\" \"{secret}\"\n")).unwrap();
    let proxy = Proxy::start(Settings { auth_file: Some(file.clone()), ..Default::default() }).await;

    let c = connect(&proxy.url(&user, "pt-secret", "app")).await;
    let who: String = c.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(who, user, "logged in upstream as itself, without pgsurge knowing the password");
    let err = try_connect(&proxy.url(&user, "nope", "app")).await.err().unwrap();
    assert_eq!(code(&err), "28P01");
    std::fs::remove_file(file).ok();
}

#[tokio::test]
async fn md5_and_trust_can_be_chosen_per_user() {
    let mut users = std::collections::BTreeMap::new();
    users.insert(
        "app".to_string(),
        UserSettings { password: Some("app".into()), auth_type: Some("md5".into()), pool_size: None, ..Default::default() },
    );
    let proxy = Proxy::start(Settings { users, ..Default::default() }).await;
    let c = connect(&proxy.app_url()).await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
    let err = try_connect(&proxy.url("app", "bad", "app")).await.err().unwrap();
    assert_eq!(code(&err), "28P01");

    let mut users = std::collections::BTreeMap::new();
    users.insert(
        "app".to_string(),
        UserSettings { password: Some("app".into()), auth_type: Some("trust".into()), pool_size: None, ..Default::default() },
    );
    let proxy = Proxy::start(Settings { users, ..Default::default() }).await;
    let c = connect(&format!("host=127.0.0.1 port={} user=app dbname=app", proxy.addr.port())).await;
    assert_eq!(c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0), 1);
}
