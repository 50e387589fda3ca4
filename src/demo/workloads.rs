//! The five workloads, each a body for `measure`: every loop stops at the run's deadline or when its request
//! budget is spent, and every request has a timeout.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

use super::measure::{connect, describe, Env, Measured, Run, Side, Tally, Target};
use super::schema::{APP, AUTHORS, BOOKS, FLOOD};

/// A request that takes longer than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One workload of the demo, as listed in the report.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub key: &'static str,
    pub title: &'static str,
    pub what: &'static str,
}

pub const WORKLOADS: [Workload; 5] = [
    Workload { key: "connection_burst", title: "1. connection burst", what: "16 clients in a loop: connect, SELECT 1, disconnect" },
    Workload {
        key: "many_clients",
        title: "2. 1,000 clients, pool of 10",
        what: "1,000 connected clients each running a small query in a loop",
    },
    Workload { key: "hot_read", title: "3. repeated hot read", what: "32 clients repeating one aggregate over 5 hot authors" },
    Workload { key: "n_plus_one", title: "4. N+1 point lookups", what: "64 clients: list an author's books, then fetch each book by id" },
    Workload {
        key: "noisy_neighbour",
        title: "5. flood beside a worker",
        what: "8 clients of `flood` scanning orders; figures are the other client's point lookups",
    },
];

/// Runs workload `w` against `target`.
pub async fn run(env: &Env, w: &Workload, target: Target) -> Side {
    match w.key {
        "connection_burst" => super::measure::measure(env, w.title, target, 20_000, Duration::ZERO, burst).await,
        "many_clients" => {
            let n = env.max_clients.min(1000);
            super::measure::measure(env, w.title, target, 2_000_000, connect_time(n), move |run| many_clients(run, n)).await
        }
        "hot_read" => super::measure::measure(env, w.title, target, 500_000, Duration::ZERO, hot_read).await,
        "n_plus_one" => super::measure::measure(env, w.title, target, 500_000, Duration::ZERO, n_plus_one).await,
        _ => super::measure::measure(env, w.title, target, 500_000, Duration::ZERO, noisy_neighbour).await,
    }
}

/// Time allowed for opening `n` SCRAM connections before the query phase starts.
fn connect_time(n: usize) -> Duration {
    Duration::from_millis(5_000 + 15 * n as u64)
}

/// Collects the tallies of every task; a task that panicked counts as one error.
async fn join(mut set: JoinSet<Tally>) -> Tally {
    let mut all = Tally::default();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(t) => all.merge(t),
            Err(e) => all.fail(format!("client task failed: {e}")),
        }
    }
    all
}

async fn burst(run: Run) -> Measured {
    let clients = 16;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let run = run.clone();
        set.spawn(async move {
            let mut t = Tally::default();
            let config = run.config(APP);
            while run.next() {
                let t0 = Instant::now();
                let r = timeout(REQUEST_TIMEOUT, async {
                    let c = connect(&config).await?;
                    c.simple_query("SELECT 1").await.map(drop)
                })
                .await;
                t.record(&run, t0, r);
            }
            t
        });
    }
    let tally = join(set).await;
    Measured { tally, window: started.elapsed(), clients, ..Default::default() }
}

async fn many_clients(run: Run, n: usize) -> Measured {
    // Phase 1: connect every client (32 logins at a time: SCRAM costs CPU on both ends), until the query phase.
    let query_start = run.deadline - run.side_time;
    let connect_started = Instant::now();
    let gate = Arc::new(Semaphore::new(32));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let (config, gate) = (run.config(APP), gate.clone());
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let left = query_start.saturating_duration_since(Instant::now());
            let r = timeout(left, async {
                let c = connect(&config).await?;
                let stmt = c.prepare("SELECT $1::int + 1").await?;
                Ok::<_, tokio_postgres::Error>((c, stmt))
            })
            .await;
            Some(r.map_err(|_| "connect timed out".to_string()).and_then(|r| r.map_err(|e| describe(&e))))
        });
    }
    let mut clients = vec![];
    let mut tally = Tally::default();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Some(Ok(c))) => clients.push(c),
            Ok(Some(Err(e))) => tally.fail(format!("connect: {e}")),
            Ok(None) | Err(_) => tally.fail("connect: client task failed".into()),
        }
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let connected = clients.len();

    // Phase 2: every connected client queries in a loop for the side's time.
    let window_start = Instant::now();
    let run = run.until(window_start + run.side_time);
    let mut set = JoinSet::new();
    for (c, stmt) in clients {
        let run = run.clone();
        set.spawn(async move {
            let mut t = Tally::default();
            while run.next() {
                // A different value each time: this workload is about connections, not the cache.
                let i: i32 = rand::thread_rng().gen_range(0..1_000_000_000);
                let t0 = Instant::now();
                let r = timeout(run.left(REQUEST_TIMEOUT), c.query_one(&stmt, &[&i])).await;
                t.record(&run, t0, r);
            }
            t
        });
    }
    tally.merge(join(set).await);
    Measured {
        tally,
        window: window_start.elapsed(),
        clients: n,
        clients_connected: Some(connected),
        connect_seconds: Some(connect_seconds),
        flooder: None,
    }
}

async fn hot_read(run: Run) -> Measured {
    let clients = 32;
    let sql = "SELECT a.name, count(b.id)::int8, avg(b.price)::float8 FROM authors a JOIN books b ON b.author_id = a.id \
               WHERE a.id = $1 GROUP BY a.name";
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let run = run.clone();
        set.spawn(async move {
            let mut t = Tally::default();
            let c = match connect(&run.config(APP)).await {
                Ok(c) => c,
                Err(e) => {
                    t.fail(format!("connect: {}", describe(&e)));
                    return t;
                }
            };
            let stmt = match c.prepare(sql).await {
                Ok(s) => s,
                Err(e) => {
                    t.fail(describe(&e));
                    return t;
                }
            };
            while run.next() {
                let author: i32 = rand::thread_rng().gen_range(1..=5);
                let t0 = Instant::now();
                let r = timeout(REQUEST_TIMEOUT, c.query(&stmt, &[&author])).await;
                t.record(&run, t0, r);
            }
            t
        });
    }
    let tally = join(set).await;
    Measured { tally, window: started.elapsed(), clients, ..Default::default() }
}

async fn n_plus_one(run: Run) -> Measured {
    let clients = 64;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let run = run.clone();
        set.spawn(async move {
            let mut t = Tally::default();
            let c = match connect(&run.config(APP)).await {
                Ok(c) => c,
                Err(e) => {
                    t.fail(format!("connect: {}", describe(&e)));
                    return t;
                }
            };
            let prepared = async {
                let list = c.prepare("SELECT id FROM books WHERE author_id = $1 ORDER BY id LIMIT 10").await?;
                let one = c.prepare("SELECT id, title, price::float8 FROM books WHERE id = $1").await?;
                Ok::<_, tokio_postgres::Error>((list, one))
            };
            let (list, one) = match prepared.await {
                Ok(s) => s,
                Err(e) => {
                    t.fail(describe(&e));
                    return t;
                }
            };
            'outer: while run.next() {
                let author: i32 = rand::thread_rng().gen_range(1..=AUTHORS as i32);
                let t0 = Instant::now();
                let r = timeout(REQUEST_TIMEOUT, c.query(&list, &[&author])).await;
                let Some(rows) = t.record(&run, t0, r) else { continue };
                // The N+1: one lookup per id the previous query returned.
                for row in rows {
                    if !run.next() {
                        break 'outer;
                    }
                    let id: i32 = row.get(0);
                    let t0 = Instant::now();
                    let r = timeout(REQUEST_TIMEOUT, c.query_opt(&one, &[&id])).await;
                    t.record(&run, t0, r);
                }
            }
            t
        });
    }
    let tally = join(set).await;
    Measured { tally, window: started.elapsed(), clients, ..Default::default() }
}

/// Prepares `sql` for a rate-limited user: a refusal (53400) is retried after a pause until the deadline.
async fn prepare_limited(c: &tokio_postgres::Client, run: &Run, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    loop {
        match c.prepare(sql).await {
            Err(e) if e.code().is_some_and(|c| c.code() == "53400") && Instant::now() < run.deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}

async fn noisy_neighbour(run: Run) -> Measured {
    let flooders = 8;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..flooders {
        let run = run.clone();
        set.spawn(async move {
            let mut t = Tally::default();
            let c = match connect(&run.config(FLOOD)).await {
                Ok(c) => c,
                Err(e) => {
                    t.fail(format!("connect: {}", describe(&e)));
                    return t;
                }
            };
            let scan = match prepare_limited(&c, &run, "SELECT count(*), sum(amount) FROM orders WHERE amount > $1").await {
                Ok(s) => s,
                Err(e) => {
                    t.fail(describe(&e));
                    return t;
                }
            };
            while run.next() {
                let floor: f64 = rand::thread_rng().gen_range(0.0..50.0);
                let t0 = Instant::now();
                let r = timeout(REQUEST_TIMEOUT, c.query_one(&scan, &[&floor])).await;
                let limited = t.limited;
                t.record(&run, t0, r);
                if t.limited > limited {
                    // Refused by the rate limit: back off a little, as a well-behaved client would.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            t
        });
    }
    // The worker: one client of `demo`, one point lookup after another.
    let worker = {
        let run = run.clone();
        tokio::spawn(async move {
            let mut t = Tally::default();
            let c = match connect(&run.config(APP)).await {
                Ok(c) => c,
                Err(e) => {
                    t.fail(format!("connect: {}", describe(&e)));
                    return t;
                }
            };
            let one = match c.prepare("SELECT id, title, price::float8 FROM books WHERE id = $1").await {
                Ok(s) => s,
                Err(e) => {
                    t.fail(describe(&e));
                    return t;
                }
            };
            while run.next() {
                let id: i32 = rand::thread_rng().gen_range(1..=BOOKS as i32);
                let t0 = Instant::now();
                let r = timeout(REQUEST_TIMEOUT, c.query_opt(&one, &[&id])).await;
                t.record(&run, t0, r);
            }
            t
        })
    };
    let tally = worker.await.unwrap_or_else(|e| {
        let mut t = Tally::default();
        t.fail(format!("worker task failed: {e}"));
        t
    });
    let flooder = join(set).await;
    let mut m = Measured { window: started.elapsed(), clients: flooders + 1, ..Default::default() };
    m.tally = tally;
    // The flooder's real errors are errors of the run; its rate-limit refusals are the limit working.
    m.tally.errors += flooder.errors;
    if m.tally.first_error.is_none() {
        m.tally.first_error = flooder.first_error.clone();
    }
    m.flooder = Some(flooder);
    m
}
