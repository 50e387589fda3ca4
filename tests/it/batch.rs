//! The N+1 batcher: concurrent point lookups merged into one statement, each client answered byte for byte
//! as if alone; failures, cancels and non-matching shapes; N+1 detection in SHOW NPLUSONE.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use pgsurge::cache::config::BatchSettings;
use pgsurge::config::{Dur, Settings, UserSettings};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// pgsurge with trust logins (hundreds of SCRAM handshakes would dominate a debug build), pool size 2.
async fn proxy(batch: bool, admin: bool) -> Proxy {
    let mut users = BTreeMap::new();
    users.insert(
        "app".to_string(),
        UserSettings { password: Some("app".into()), auth_type: Some("trust".into()), pool_size: None, ..Default::default() },
    );
    Proxy::start(Settings {
        users,
        pool_size: Some(2),
        batch_flag: Some(batch),
        admin_users: admin.then(|| "app".into()),
        ..Default::default()
    })
    .await
}

fn url(p: &Proxy) -> String {
    format!("host=127.0.0.1 port={} user=app dbname=app", p.addr.port())
}

/// A table with int4, int8, text, uuid keys and a non-unique column (several rows per key).
async fn table() -> String {
    let t = unique("items");
    let c = connect(&pg().app_url).await;
    c.batch_execute(&format!(
        "CREATE TABLE {t}(id int4 PRIMARY KEY, big int8 UNIQUE, code text UNIQUE, u uuid UNIQUE, grp int4, val text);
         INSERT INTO {t} SELECT g, g::int8 * 1000000000, 'c' || g, md5(g::text)::uuid, g % 37, 'v' || g FROM generate_series(1, 300) g;
         ANALYZE {t};"
    ))
    .await
    .unwrap();
    t
}

/// A raw protocol client: sends exactly the frames a driver would and returns exactly the bytes it got.
struct Raw(TcpStream, BytesMut, Vec<u8>);

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut b = BytesMut::new();
        b.put_i32(0);
        b.put_i32(196_608);
        for (k, v) in [("user", "app"), ("database", "app")] {
            b.put_slice(k.as_bytes());
            b.put_u8(0);
            b.put_slice(v.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
        let n = b.len() as i32;
        b[..4].copy_from_slice(&n.to_be_bytes());
        s.write_all(&b).await.unwrap();
        let mut r = Raw(s, BytesMut::new(), vec![]);
        let login = r.until_ready().await;
        r.2 = frames(&login, false).into_iter().find(|f| f[0] == b'K').expect("BackendKeyData")[5..].to_vec();
        r
    }

    /// A CancelRequest with this connection's key, sent to `addr`.
    fn canceller(&self, addr: SocketAddr) -> impl std::future::Future<Output = ()> {
        let key = self.2.clone();
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut b = BytesMut::new();
            b.put_i32(16);
            b.put_i32(80_877_102);
            b.put_slice(&key);
            s.write_all(&b).await.unwrap();
            let _ = s.read(&mut [0u8; 1]).await;
        }
    }

    /// Reads whole frames up to and including ReadyForQuery.
    async fn until_ready(&mut self) -> Vec<u8> {
        let mut out = vec![];
        loop {
            while self.1.len() >= 5 {
                let n = 1 + u32::from_be_bytes(self.1[1..5].try_into().unwrap()) as usize;
                if self.1.len() < n {
                    break;
                }
                let f = self.1.split_to(n);
                out.extend_from_slice(&f);
                if f[0] == b'Z' {
                    return out;
                }
            }
            assert!(self.0.read_buf(&mut self.1).await.unwrap() > 0, "connection closed");
        }
    }

    /// Parse (unnamed) Bind Describe-portal Execute Sync with one parameter.
    async fn lookup(&mut self, sql: &str, param: Option<&[u8]>, param_format: i16, result_format: i16) -> Vec<u8> {
        let mut b = BytesMut::new();
        msg(&mut b, b'P', |b| {
            b.put_u8(0);
            b.put_slice(sql.as_bytes());
            b.put_u8(0);
            b.put_i16(0);
        });
        msg(&mut b, b'B', |b| {
            b.put_slice(&[0, 0]);
            b.put_i16(1);
            b.put_i16(param_format);
            b.put_i16(1);
            match param {
                None => b.put_i32(-1),
                Some(p) => {
                    b.put_i32(p.len() as i32);
                    b.put_slice(p);
                }
            }
            b.put_i16(1);
            b.put_i16(result_format);
        });
        msg(&mut b, b'D', |b| b.put_slice(b"P\0"));
        msg(&mut b, b'E', |b| b.put_slice(&[0, 0, 0, 0, 0]));
        msg(&mut b, b'S', |_| {});
        self.0.write_all(&b).await.unwrap();
        self.until_ready().await
    }
}

fn msg(out: &mut BytesMut, tag: u8, f: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    f(out);
    let n = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&n.to_be_bytes());
}

/// The frames of a reply; DataRows sorted when the key is not unique (row order is unspecified then).
fn frames(mut b: &[u8], sort_rows: bool) -> Vec<Vec<u8>> {
    let mut v = vec![];
    while b.len() >= 5 {
        let n = 1 + u32::from_be_bytes(b[1..5].try_into().unwrap()) as usize;
        v.push(b[..n].to_vec());
        b.advance(n);
    }
    if sort_rows {
        let (mut rows, rest): (Vec<_>, Vec<_>) = v.into_iter().partition(|f| f[0] == b'D');
        rows.sort();
        let mut out: Vec<Vec<u8>> = rest.iter().take_while(|f| f[0] != b'C').cloned().collect();
        out.extend(rows);
        out.extend(rest.into_iter().skip_while(|f| f[0] != b'C'));
        v = out;
    }
    v
}

fn sqlstate(reply: &[u8]) -> Option<String> {
    let f = frames(reply, false).into_iter().find(|f| f[0] == b'E')?;
    let mut body = &f[5..];
    while !body.is_empty() && body[0] != 0 {
        let end = body.iter().position(|&c| c == 0).unwrap();
        if body[0] == b'C' {
            return Some(String::from_utf8_lossy(&body[1..end]).into());
        }
        body = &body[end + 1..];
    }
    None
}

#[derive(Clone, Debug)]
struct Case {
    column: &'static str,
    param: Option<Vec<u8>>,
    param_format: i16,
    result_format: i16,
}

fn random_case(rng: &mut impl Rng) -> Case {
    let n: i64 = if rng.gen_bool(0.15) { rng.gen_range(1000..2000) } else { rng.gen_range(1..12) }; // few keys: duplicates
    let column = ["id", "big", "code", "u", "grp"][rng.gen_range(0..5)];
    let mut param_format = 0;
    let param = if rng.gen_bool(0.05) {
        None
    } else {
        Some(match column {
            "id" | "grp" if rng.gen_bool(0.5) => {
                param_format = 1;
                (n as i32).to_be_bytes().to_vec()
            }
            "big" if rng.gen_bool(0.5) => {
                param_format = 1;
                (n * 1_000_000_000).to_be_bytes().to_vec()
            }
            "id" | "grp" => n.to_string().into_bytes(),
            "big" => (n * 1_000_000_000).to_string().into_bytes(),
            "code" => format!("c{n}").into_bytes(),
            _ => format!("{:032x}", md5_of(n)).into_bytes(),
        })
    };
    Case { column, param, param_format, result_format: rng.gen_range(0..2) }
}

/// The uuid the table holds for key `n` (md5 of its text), computed by Postgres' own rule in the test.
fn md5_of(n: i64) -> u128 {
    // Missing keys only need to be well-formed uuids; present ones are looked up as 'c' codes' twins below.
    (n as u128) * 0x9e37_79b9_7f4a_7c15
}

fn sql_for(t: &str, column: &str) -> String {
    format!("SELECT id, val AS value, big, u FROM {t} WHERE {column} = $1")
}

async fn run_cases(addr: SocketAddr, t: &str, cases: &[Case]) -> Vec<Vec<u8>> {
    let mut clients = vec![];
    for _ in cases {
        clients.push(Raw::connect(addr).await);
    }
    let start = Arc::new(tokio::sync::Barrier::new(cases.len()));
    let mut tasks = vec![];
    for (mut c, case) in clients.into_iter().zip(cases.iter().cloned()) {
        let (start, sql) = (start.clone(), sql_for(t, case.column));
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            c.lookup(&sql, case.param.as_deref(), case.param_format, case.result_format).await
        }));
    }
    let mut out = vec![];
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

async fn upstream_calls(t: &str) -> i64 {
    let s = pg().super_client("app").await;
    let r =
        s.query_one(&format!("SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements WHERE query ILIKE '%{t}%'"), &[]).await.unwrap();
    r.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_lookups_get_exactly_what_they_would_get_alone_in_far_fewer_statements() {
    let t = table().await;
    // Real uuids for present keys: ask Postgres for them once.
    let c = connect(&pg().app_url).await;
    let uuids: Vec<String> =
        c.query(&format!("SELECT u::text FROM {t} WHERE id < 12 ORDER BY id"), &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::env::var("BATCH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(7));
    let mut cases: Vec<Case> = (0..200).map(|_| random_case(&mut rng)).collect();
    for case in cases.iter_mut().filter(|c| c.column == "u" && c.param.is_some()) {
        if rng.gen_bool(0.8) {
            case.param = Some(uuids[rng.gen_range(0..uuids.len())].clone().into_bytes());
        }
    }

    let on = proxy(true, false).await;
    let before = upstream_calls(&t).await;
    let merged = run_cases(on.addr, &t, &cases).await;
    let calls = upstream_calls(&t).await - before;

    let off = proxy(false, false).await;
    let alone = run_cases(off.addr, &t, &cases).await;
    for (i, case) in cases.iter().enumerate() {
        let sort = case.column == "grp";
        assert_eq!(frames(&merged[i], sort), frames(&alone[i], sort), "lookup {i} {case:?}");
        assert_eq!(sqlstate(&merged[i]), None, "lookup {i} {case:?}");
    }
    let stats = on.app.batch.stats();
    let lookups: u64 = stats.iter().map(|s| s.1.lookups).sum();
    assert!(lookups >= 100, "most lookups were merged: {stats:?}");
    assert!(calls * 3 <= 200, "Postgres ran {calls} statements for 200 lookups");
    assert!(stats.iter().all(|s| s.1.fallbacks == 0), "{stats:?}");
    eprintln!("200 lookups: {lookups} merged, {calls} upstream statements: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_that_fails_the_cast_fails_only_its_own_lookup() {
    let t = table().await;
    // A merge window, so the bad key always rides in a merged statement (with a free server and no window,
    // a lookup that arrives alone is sent alone and nothing would fall back).
    let mut users = BTreeMap::new();
    users.insert(
        "app".to_string(),
        UserSettings { password: Some("app".into()), auth_type: Some("trust".into()), pool_size: None, ..Default::default() },
    );
    let on = Proxy::start(Settings {
        users,
        pool_size: Some(2),
        batch_flag: Some(true),
        batch: BatchSettings { max_wait: Some(Dur(Duration::from_millis(300))), ..Default::default() },
        ..Default::default()
    })
    .await;
    let mut cases: Vec<Case> =
        (1..=40).map(|n| Case { column: "id", param: Some(n.to_string().into_bytes()), param_format: 0, result_format: 0 }).collect();
    cases[17].param = Some(b"abc".to_vec());
    let replies = run_cases(on.addr, &t, &cases).await;
    let stats = on.app.batch.stats();
    assert!(stats.iter().any(|s| s.1.fallbacks >= 1), "the bad key made a merged statement fail: {stats:?}");
    for (i, r) in replies.iter().enumerate() {
        if i == 17 {
            assert_eq!(sqlstate(r).as_deref(), Some("22P02"));
        } else {
            assert_eq!(sqlstate(r), None, "lookup {i}");
            assert!(frames(r, false).iter().filter(|f| f[0] == b'D').count() == 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statements_beyond_the_exact_shape_are_never_merged() {
    let t = table().await;
    let on = proxy(true, false).await;
    let shapes = [
        format!("SELECT a.id, b.val FROM {t} a JOIN {t} b ON b.id = a.id WHERE a.id = $1"),
        format!("SELECT id, val FROM {t} WHERE grp = $1 ORDER BY id"),
        format!("SELECT id, val FROM {t} WHERE grp = $1 LIMIT 2"),
        format!("SELECT id, val FROM {t} WHERE id = $1 AND grp > 0"),
        format!("SELECT id, val FROM {t} WHERE id = $1 FOR UPDATE"),
        format!("SELECT id, random() FROM {t} WHERE id = $1"),
    ];
    let c = connect(&url(&on)).await;
    for sql in &shapes {
        let mut tasks = vec![];
        for i in 0..30 {
            let (u, sql) = (url(&on), sql.clone());
            tasks.push(tokio::spawn(async move {
                let c = connect(&u).await;
                c.query(&sql, &[&(i % 7 + 1)]).await.unwrap().len()
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap() >= 1);
        }
    }
    // Inside a transaction: the exact shape, but never merged.
    let tx_sql = format!("SELECT id, val AS in_tx FROM {t} WHERE id = $1");
    let mut tasks = vec![];
    for i in 0..30 {
        let (u, sql) = (url(&on), tx_sql.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&u).await;
            let tx = c.transaction().await.unwrap();
            let n = tx.query(&sql, &[&(i % 7 + 1)]).await.unwrap().len();
            tx.commit().await.unwrap();
            n
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 1);
    }
    drop(c);
    let stats = on.app.batch.stats();
    assert!(stats.is_empty(), "nothing merged: {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancelled_asker_gets_57014_and_the_rest_of_its_batch_succeeds() {
    let t = table().await;
    let on = proxy(true, false).await;
    // Both server connections busy: the lookups below wait, and join one batch.
    let mut sleepers = vec![];
    for _ in 0..2 {
        let c = connect(&url(&on)).await;
        sleepers.push(tokio::spawn(async move { c.simple_query("SELECT pg_sleep(1.5)").await.unwrap() }));
    }
    let busy = eventually(Duration::from_secs(5), || async { on.pool_idle_and_busy().1 == 2 }).await;
    assert!(busy);
    let sql = format!("SELECT val FROM {t} WHERE id = $1");
    let mut cancels = vec![];
    let mut tasks = vec![];
    for i in 1..=10 {
        let mut c = Raw::connect(on.addr).await;
        cancels.push(Some(c.canceller(on.addr)));
        let sql = sql.clone();
        tasks.push(tokio::spawn(async move { c.lookup(&sql, Some(i.to_string().as_bytes()), 0, 0).await }));
        let n = i as usize;
        assert!(eventually(Duration::from_secs(5), || async { on.waiting() >= n }).await, "lookup {i} waits");
    }
    // Two members of the batch are cancelled (a cancelled leader hands the others back to the usual path).
    for i in [3, 6] {
        cancels[i].take().unwrap().await;
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let reply = t.await.unwrap();
        if i == 3 || i == 6 {
            assert_eq!(sqlstate(&reply).as_deref(), Some("57014"), "lookup {i}");
        } else {
            assert_eq!(sqlstate(&reply), None, "lookup {i}");
            let rows: Vec<_> = frames(&reply, false).into_iter().filter(|f| f[0] == b'D').collect();
            let want = format!("v{}", i + 1);
            assert!(rows.len() == 1 && rows[0].ends_with(want.as_bytes()), "lookup {i}");
        }
    }
    for s in sleepers {
        s.await.unwrap();
    }
    let stats = on.app.batch.stats();
    assert_eq!(stats.iter().map(|s| s.1.lookups).sum::<u64>(), 10, "one batch of all ten: {stats:?}");
}

#[tokio::test]
async fn a_loop_of_lookups_shows_up_in_show_nplusone() {
    let t = table().await;
    let p = proxy(false, true).await;
    let c = connect(&url(&p)).await;
    let list = c.query(&format!("SELECT id FROM {t} WHERE grp = 3"), &[]).await.unwrap();
    let lookup = c.prepare(&format!("SELECT val FROM {t} WHERE id = $1")).await.unwrap();
    for r in &list {
        let id: i32 = r.get(0);
        c.query_one(&lookup, &[&id]).await.unwrap();
    }
    let admin = connect(&format!("host=127.0.0.1 port={} user=app dbname=pgsurge", p.addr.port())).await;
    let rows = admin.simple_query("SHOW NPLUSONE").await.unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("statement").is_some_and(|s| s.contains(&t)) => Some(r),
            _ => None,
        })
        .expect("the loop is reported");
    assert_eq!(row.get("patterns"), Some("1"));
    assert_eq!(row.get("lookups"), Some(list.len().to_string().as_str()));
    assert!(row.get("suggested_fix").unwrap().contains("id = ANY($1)"));
}

trait Observe {
    fn pool_idle_and_busy(&self) -> (usize, usize);
    fn waiting(&self) -> usize;
}

impl Observe for Proxy {
    fn pool_idle_and_busy(&self) -> (usize, usize) {
        let pools = self.app.pools();
        let Some(p) = pools.first() else { return (0, 0) };
        let total = p.total_servers.load(std::sync::atomic::Ordering::Relaxed);
        (p.idle_count(), total - p.idle_count())
    }

    fn waiting(&self) -> usize {
        self.app.ops.clients.snapshot().iter().filter(|c| c.state() == pgsurge::cancel::ClientState::Waiting).count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lookups_arriving_while_their_statement_runs_merge_behind_it_even_with_servers_free() {
    let t = table().await;
    let mut users = BTreeMap::new();
    users.insert(
        "app".to_string(),
        UserSettings { password: Some("app".into()), auth_type: Some("trust".into()), pool_size: None, ..Default::default() },
    );
    // 20 server connections for 16 clients: nobody ever waits for one; at most 20 / 4 = 5 of the statement run at once.
    let p = Proxy::start(Settings { users, pool_size: Some(20), batch_flag: Some(true), ..Default::default() }).await;
    let tasks: Vec<_> = (0..16)
        .map(|c| {
            let (url, t) = (url(&p), t.clone());
            tokio::spawn(async move {
                let client = connect(&url).await;
                let stmt = client.prepare(&format!("SELECT val FROM {t} WHERE id = $1")).await.unwrap();
                for i in 0..50 {
                    let id = 1 + (c * 50 + i) % 300;
                    let row = client.query_one(&stmt, &[&id]).await.unwrap();
                    assert_eq!(row.get::<_, String>(0), format!("v{id}"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = p.app.batch.stats();
    let (batches, lookups): (u64, u64) = stats.iter().fold((0, 0), |(b, l), s| (b + s.1.batches, l + s.1.lookups));
    assert!(batches > 0 && lookups > 2 * batches, "800 lookups: {lookups} merged into {batches} statements: {stats:?}");
    let pool = p.app.pools()[0].clone();
    let idle = || async { pool.stats.active.load(std::sync::atomic::Ordering::Relaxed) == 0 };
    assert!(eventually(Duration::from_secs(5), idle).await, "every server connection went back to the pool");
}
