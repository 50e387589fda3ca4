//! A pool of server connections for one (database, user): a FIFO semaphore bounds checkouts, idle connections
//! wait in a stack (warmest first), and failed connects back off so a restarting Postgres is not stormed. Slow
//! statements check out through the pool's slow lane (lane.rs), which caps their share and queues them apart.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::checkout::Checkout;
use super::server::{ServerConn, ServerTarget, UpstreamCredential};
use super::stats::Waiting;
pub use super::stats::{PoolStats, ServerInfo, WAIT_BUCKETS_US};
use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

/// Timeouts a pool applies; replaced on reload.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub size: usize,
    pub min_size: usize,
    pub connect_timeout: Duration,
    pub lifetime: Duration,
    pub idle_timeout: Duration,
    pub check_delay: Duration,
    /// The slow lane (backend/lane.rs): `slow_query_threshold` (zero: off) and `slow_pool_share`.
    pub slow_threshold: Duration,
    pub slow_share: f64,
    /// Extra connections a client may get once it has waited `reserve_timeout` (PgBouncer's reserve pool).
    pub reserve_size: usize,
    pub reserve_timeout: Duration,
    /// Keepalive and TCP_USER_TIMEOUT of new server connections.
    pub tcp: super::socket::TcpOpts,
}

struct Backoff {
    failing: bool,
    delay: Duration,
    next_attempt: Instant,
    last_error: Option<String>,
}

pub struct Pool {
    pub key: PoolKey,
    /// Unique for the life of the process (never reused): what cache and batch keys say instead of the names.
    pub id: u32,
    target: Mutex<ServerTarget>,
    settings: Mutex<PoolSettings>,
    /// Boxed: a connection (TLS state included) is large, and it moves idle -> checkout -> session -> idle
    /// every transaction; a box moves as a pointer.
    #[allow(clippy::vec_box)]
    idle: Mutex<Vec<Box<ServerConn>>>,
    permits: Arc<Semaphore>,
    /// The reserve pool's permits, and how many it owns now.
    reserve: Arc<Semaphore>,
    reserve_size: AtomicUsize,
    /// Permits currently owned by the pool (its size); the semaphore is grown or shrunk to match on reload.
    size: AtomicUsize,
    /// While connects fail, only the holder of this gate tries; the others wait for its verdict.
    connect_gate: tokio::sync::Mutex<()>,
    backoff: Mutex<Backoff>,
    /// The settings the last session logged in with, shared with the next session that has the same ones.
    shared_settings: Mutex<Arc<crate::state::Settings>>,
    /// ParameterStatus values clients receive at login, learned from the first server connection.
    login_params: Mutex<Option<Vec<(String, String)>>>,
    /// Where server connection ids come from: shared with the client registry, so a client and a server never
    /// share an id (SHOW SOCKETS lists both, as PgBouncer numbers them).
    next_id: Arc<AtomicU64>,
    /// Shared caps this pool also draws from (`max_db_connections`, `max_user_connections`), if any.
    budgets: arc_swap::ArcSwapOption<crate::limit::Budgets>,
    pub total_servers: AtomicUsize,
    pub stats: PoolStats,
    /// Slow statements' share of the pool and their own queue, and the estimates that say which are slow.
    pub lane: Arc<super::lane::Lane>,
    /// `PAUSE`: while true, new checkouts wait (they do not fail).
    paused: tokio::sync::watch::Sender<bool>,
    servers: Mutex<std::collections::BTreeMap<u64, ServerInfo>>,
    /// `RECONNECT`: server connections with an id below this are closed when next idle.
    reconnect_below: AtomicU64,
}

/// A connection idle at least this long is peeked at before reuse, whatever `server_check_delay` says.
const PEEK_AFTER_IDLE: Duration = Duration::from_millis(50);

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_millis(500);

impl Pool {
    /// `id`: unique among the pools of this process, never reused (the owner counts them).
    pub fn new(id: u32, key: PoolKey, mut target: ServerTarget, settings: PoolSettings, ids: Arc<AtomicU64>) -> Arc<Pool> {
        let (size, reserve) = (settings.size, settings.reserve_size);
        target.tcp = settings.tcp;
        let lane = super::lane::Lane::new(size, settings.slow_share, settings.slow_threshold);
        Arc::new(Pool {
            lane,
            key,
            id,
            target: Mutex::new(target),
            settings: Mutex::new(settings),
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size)),
            reserve: Arc::new(Semaphore::new(reserve)),
            reserve_size: AtomicUsize::new(reserve),
            size: AtomicUsize::new(size),
            connect_gate: tokio::sync::Mutex::new(()),
            backoff: Mutex::new(Backoff { failing: false, delay: BACKOFF_START, next_attempt: Instant::now(), last_error: None }),
            login_params: Mutex::new(None),
            shared_settings: Default::default(),
            next_id: ids,
            budgets: Default::default(),
            total_servers: AtomicUsize::new(0),
            stats: PoolStats::default(),
            paused: tokio::sync::watch::channel(false).0,
            servers: Mutex::new(Default::default()),
            reconnect_below: AtomicU64::new(0),
        })
    }

    pub fn settings(&self) -> PoolSettings {
        self.settings.lock().clone()
    }

    /// Applies new settings; a size change takes effect at once for new checkouts.
    pub fn update_settings(&self, s: PoolSettings) {
        resize(&self.permits, &self.size, s.size);
        resize(&self.reserve, &self.reserve_size, s.reserve_size);
        self.lane.configure(s.size, s.slow_share, s.slow_threshold);
        self.target.lock().tcp = s.tcp;
        *self.settings.lock() = s;
    }

    /// Replaces the credential (SCRAM passthrough learns client keys at a client's login).
    pub fn set_credential(&self, c: UpstreamCredential) {
        self.target.lock().credential = c;
    }

    pub fn has_credential(&self) -> bool {
        !matches!(self.target.lock().credential, UpstreamCredential::None)
    }

    pub fn target(&self) -> ServerTarget {
        self.target.lock().clone()
    }

    /// An `Arc` of `settings`, the same one other sessions with equal settings hold (the most recent kind is kept).
    pub fn share_settings(&self, settings: &crate::state::Settings) -> Arc<crate::state::Settings> {
        let mut last = self.shared_settings.lock();
        if **last != *settings {
            *last = Arc::new(settings.clone());
        }
        last.clone()
    }

    pub fn login_params(&self) -> Option<Vec<(String, String)>> {
        self.login_params.lock().clone()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().len()
    }

    /// A checkout now would not queue: more permits free than checkouts already waiting (the batcher's test).
    pub fn has_free_server(&self) -> bool {
        self.permits.available_permits() > self.stats.waiting.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.send_replace(paused);
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Server connections open now, with the ids of the idle ones.
    pub fn servers(&self) -> (Vec<ServerInfo>, std::collections::HashSet<u64>) {
        let idle = self.idle.lock().iter().map(|c| c.id).collect();
        (self.servers.lock().values().cloned().collect(), idle)
    }

    /// Shared server-connection budgets this pool also draws from (None: none).
    pub fn set_budgets(&self, b: Option<Arc<crate::limit::Budgets>>) {
        self.budgets.store(b);
    }

    /// Waits (FIFO) up to `wait` for a server connection. While the pool is paused the wait does not count.
    pub async fn checkout(self: &Arc<Self>, wait: Duration) -> Result<Checkout> {
        self.checkout_for(Instant::now(), wait, None, None, false).await
    }

    /// Waits up to `wait` for a server connection: FIFO within this pool, then, if the pool shares a budget,
    /// round-robin across `fair` keys (default: this pool's user). While the pool is paused the wait does not
    /// count. `started`: now (the caller has read the clock already). `timer`: a sleep the caller keeps across
    /// checkouts (a session's): moving its deadline later is an atomic store, where a fresh sleep is inserted into
    /// and removed from the timer wheel every time (`None`: a fresh one). `slow`: a slow statement's checkout,
    /// which waits in the slow lane's own queue instead of the pool's (backend/lane.rs).
    pub async fn checkout_for(
        self: &Arc<Self>,
        started: Instant,
        wait: Duration,
        fair: Option<&crate::limit::Key>,
        timer: Option<std::pin::Pin<&mut tokio::time::Sleep>>,
        slow: bool,
    ) -> Result<Checkout> {
        let queue = if slow { None } else { Some(Waiting::new(&self.stats.waiting)) };
        let mut deadline = started + wait;
        if self.is_paused() {
            let _ = self.paused.subscribe().wait_for(|p| !*p).await;
            deadline = Instant::now() + wait;
        }
        let mut fresh = None;
        let mut timer = match timer {
            Some(t) => t,
            None => fresh.insert(Box::pin(tokio::time::sleep_until(deadline))).as_mut(),
        };
        timer.as_mut().reset(deadline);
        let (permit, slot) = if slow {
            match self.lane.acquire(&self.permits, &self.stats.waiting, timer).await {
                Some((p, slot)) => (p, Some(slot)),
                None => return Err(self.lane_timeout(wait)),
            }
        } else {
            let (reserve_size, reserve_at) = {
                let s = self.settings.lock();
                (s.reserve_size, started + s.reserve_timeout)
            };
            let permit = tokio::select! {
                biased;
                p = self.permits.clone().acquire_owned() => p.ok(),
                p = async {
                    tokio::time::sleep_until(reserve_at).await;
                    self.reserve.clone().acquire_owned().await
                }, if reserve_size > 0 => {
                    tracing::info!(pool = %self.key.database, user = %self.key.user, "taking connection from reserve_pool");
                    p.ok()
                }
                _ = timer => None,
            };
            drop(queue);
            self.lane.wake(); // one fast checkout fewer waiting: a slow one may go
            (permit.ok_or_else(|| self.wait_error(wait))?, None)
        };
        let got = self.finish_checkout(permit, started, deadline, wait, fair).await;
        if got.is_err() {
            self.lane.wake(); // its permit was given back
        }
        let mut co = got?;
        if slot.is_some() {
            let waited = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.lane.stats.checkouts.fetch_add(1, Ordering::Relaxed);
            self.lane.stats.wait_us_total.fetch_add(waited, Ordering::Relaxed);
        }
        co.lane = slot;
        Ok(co)
    }

    /// After the permit: units of the shared budget, if any, then an idle connection or a new one.
    async fn finish_checkout(
        self: &Arc<Self>,
        permit: tokio::sync::OwnedSemaphorePermit,
        started: Instant,
        deadline: Instant,
        wait: Duration,
        fair: Option<&crate::limit::Key>,
    ) -> Result<Checkout> {
        let budget = match self.budgets.load_full() {
            None => None,
            Some(b) => {
                let own;
                let key = match fair {
                    Some(k) => k,
                    None => {
                        own = crate::limit::Key::from(self.key.user.as_str());
                        &own
                    }
                };
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
                let got = b.acquire(key, deadline).await;
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                Some(got.ok_or_else(|| self.wait_error(wait))?)
            }
        };
        let conn = match self.take_idle() {
            Some(c) => c,
            None => self.connect_until(deadline, wait).await?,
        };
        let mut co = self.hand_out(conn, permit, started.elapsed().as_micros() as u64);
        co.budget = budget;
        Ok(co)
    }

    /// A checkout that needs no waiting: nobody queued ahead (FIFO), a permit free, no shared budget to wait on,
    /// and an idle connection ready. The common case of a pool that is not saturated, without the wait
    /// machinery (queue registration, timer) that `checkout_for` sets up.
    pub fn try_checkout_now(self: &Arc<Self>) -> Option<Checkout> {
        if self.stats.waiting.load(Ordering::Relaxed) > 0 || self.is_paused() || self.budgets.load().is_some() {
            return None;
        }
        let permit = self.permits.clone().try_acquire_owned().ok()?;
        let Some(conn) = self.take_idle() else {
            drop(permit);
            self.lane.wake();
            return None;
        };
        Some(self.hand_out(conn, permit, 0))
    }

    /// Counts a checkout (and how long it waited) and wraps the connection in its guard.
    fn hand_out(self: &Arc<Self>, conn: Box<ServerConn>, permit: tokio::sync::OwnedSemaphorePermit, waited_us: u64) -> Checkout {
        self.stats.record_wait(waited_us);
        self.stats.checkouts.fetch_add(1, Ordering::Relaxed);
        Checkout::new(conn, self.clone(), permit)
    }

    /// Pops the warmest idle connection that is still good; closes the ones that are not.
    fn take_idle(&self) -> Option<Box<ServerConn>> {
        let s = self.settings.lock().clone();
        loop {
            let mut c = self.idle.lock().pop()?;
            let now = Instant::now();
            let expired = now.duration_since(c.created) >= s.lifetime;
            // A peek catches a server that said goodbye while idle (a restarting Postgres sends FATAL 57P01).
            let stale = now.duration_since(c.last_used) >= s.check_delay.min(PEEK_AFTER_IDLE) && !c.looks_alive();
            if expired || stale {
                self.forget(c);
                continue;
            }
            return Some(c);
        }
    }

    /// A slow checkout that waited `wait` in the slow lane in vain.
    fn lane_timeout(&self, wait: Duration) -> Error {
        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
        self.lane.stats.timeouts.fetch_add(1, Ordering::Relaxed);
        Error::SlowLaneTimeout { wait, cap: self.lane.cap(), size: self.size() }
    }

    fn wait_error(&self, wait: Duration) -> Error {
        self.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
        let b = self.backoff.lock();
        match (&b.last_error, b.failing) {
            (Some(reason), true) => Error::UpstreamConnect { addr: self.target.lock().addr(), reason: reason.clone() },
            _ => Error::WaitTimeout(wait),
        }
    }

    /// Connects, retrying transient failures with a capped backoff until `deadline`.
    async fn connect_until(&self, deadline: Instant, wait: Duration) -> Result<Box<ServerConn>> {
        loop {
            let failing = self.backoff.lock().failing;
            // While failing, one prober at a time; the others queue behind the gate instead of storming.
            let _gate = if failing {
                match tokio::time::timeout_at(deadline, self.connect_gate.lock()).await {
                    Ok(g) => Some(g),
                    Err(_) => return Err(self.wait_error(wait)),
                }
            } else {
                None
            };
            let next = self.backoff.lock().next_attempt;
            if next > Instant::now() {
                if next >= deadline {
                    tokio::time::sleep_until(deadline).await;
                    return Err(self.wait_error(wait));
                }
                tokio::time::sleep_until(next).await;
            }
            let target = self.target();
            let timeout =
                self.settings.lock().connect_timeout.min(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
            let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            // Each host gets `timeout`; all of them together get what is left of the wait.
            let attempt = tokio::time::timeout_at(deadline.max(Instant::now() + timeout), ServerConn::connect(id, &target, timeout));
            let result = attempt.await.unwrap_or_else(|_| {
                Err(Error::UpstreamConnect { addr: target.addr(), reason: format!("no host answered within {}ms", wait.as_millis()) })
            });
            match result {
                Ok(c) => {
                    let mut b = self.backoff.lock();
                    b.failing = false;
                    b.delay = BACKOFF_START;
                    b.last_error = None;
                    drop(b);
                    self.stats.connects.fetch_add(1, Ordering::Relaxed);
                    self.total_servers.fetch_add(1, Ordering::Relaxed);
                    self.login_params.lock().get_or_insert_with(|| c.reported.clone());
                    let info = ServerInfo {
                        id: c.id,
                        connect_time: std::time::SystemTime::now(),
                        local_addr: c.stream.local_addr().ok(),
                        remote: c.addr(),
                        host: c.cancel_target.host.clone(),
                        port: c.cancel_target.port,
                        backend_pid: c.cancel_target.pid,
                        tls: c.stream.is_tls(),
                    };
                    self.servers.lock().insert(c.id, info);
                    return Ok(Box::new(c));
                }
                Err(e) => {
                    self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    if !transient(&e) {
                        return Err(e);
                    }
                    let mut b = self.backoff.lock();
                    b.failing = true;
                    b.next_attempt = Instant::now() + b.delay;
                    b.delay = (b.delay * 2).min(BACKOFF_CAP);
                    // An attempt the wait's end cut short says less than the full ones before it ("timed out
                    // after 21ms" instead of "is read-only"): the client is told why those failed.
                    if b.last_error.is_none() || Instant::now() < deadline {
                        b.last_error = Some(match &e {
                            Error::UpstreamConnect { reason, .. } => reason.clone(),
                            other => other.to_string(),
                        });
                    }
                    drop(b);
                    tracing::warn!(pool = %self.key.database, user = %self.key.user, error = %e, "server connect failed; retrying");
                    if Instant::now() >= deadline {
                        return Err(self.wait_error(wait));
                    }
                }
            }
        }
    }

    /// Takes back a clean connection (called by the checkout guard).
    pub(super) fn checkin(&self, mut c: Box<ServerConn>) {
        let s = self.settings.lock().clone();
        let now = Instant::now();
        if now.duration_since(c.created) >= s.lifetime || self.idle.lock().len() >= s.size || self.must_reconnect(c.id) {
            self.forget(c);
            return;
        }
        c.last_used = now;
        self.idle.lock().push(c);
    }

    /// After a server connection died (Postgres restarting?), closes the idle ones that are dead too.
    pub fn purge_dead_idle(&self) {
        let dead: Vec<Box<ServerConn>> = {
            let mut idle = self.idle.lock();
            let (alive, dead): (Vec<_>, Vec<_>) = idle.drain(..).partition(|c| c.stream.looks_alive());
            *idle = alive;
            dead
        };
        for c in dead {
            self.forget(c);
        }
    }

    /// `RECONNECT`: every server connection open now is closed when next idle (idle ones at once); new ones
    /// are opened as needed.
    pub fn reconnect(&self) {
        self.reconnect_below.store(self.next_id.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
        let old: Vec<Box<ServerConn>> = {
            let mut idle = self.idle.lock();
            let (old, keep): (Vec<_>, Vec<_>) = idle.drain(..).partition(|c| self.must_reconnect(c.id));
            *idle = keep;
            old
        };
        for c in old {
            self.forget(c);
        }
    }

    fn must_reconnect(&self, id: u64) -> bool {
        id < self.reconnect_below.load(Ordering::Relaxed)
    }

    /// Server connections still open that `RECONNECT` asked to close (what `WAIT_CLOSE` waits for).
    pub fn closing_count(&self) -> usize {
        self.servers.lock().keys().filter(|id| self.must_reconnect(**id)).count()
    }

    /// Closes a server connection for good.
    pub(super) fn forget(&self, c: Box<ServerConn>) {
        self.closed(c.id);
        drop(c);
    }

    /// Accounts for a server connection that is gone.
    pub(super) fn closed(&self, id: u64) {
        self.total_servers.fetch_sub(1, Ordering::Relaxed);
        self.servers.lock().remove(&id);
    }

    /// Periodic upkeep: closes connections idle too long and opens up to `min_pool_size`.
    pub async fn maintain(self: &Arc<Self>) {
        let s = self.settings();
        let now = Instant::now();
        let stale: Vec<Box<ServerConn>> = {
            let mut idle = self.idle.lock();
            let (old, keep): (Vec<_>, Vec<_>) = idle.drain(..).partition(|c| {
                now.duration_since(c.last_used) >= s.idle_timeout
                    || now.duration_since(c.created) >= s.lifetime
                    || self.must_reconnect(c.id)
            });
            *idle = keep;
            old
        };
        for c in stale {
            self.forget(c);
        }
        while self.total_servers.load(Ordering::Relaxed) < s.min_size && self.has_credential() {
            let Ok(permit) = self.permits.clone().try_acquire_owned() else { break };
            match self.connect_until(Instant::now() + s.connect_timeout, s.connect_timeout).await {
                Ok(c) => {
                    self.checkin(c);
                    drop(permit);
                    self.lane.wake();
                }
                Err(_) => break,
            }
        }
    }
}

/// Grows a semaphore to `new` permits at once, or shrinks it by taking permits back as checkouts end.
fn resize(sem: &Arc<Semaphore>, size: &AtomicUsize, new: usize) {
    let old = size.swap(new, Ordering::SeqCst);
    if new > old {
        sem.add_permits(new - old);
    } else if new < old {
        let sem = sem.clone();
        tokio::spawn(async move {
            if let Ok(p) = sem.acquire_many_owned((old - new) as u32).await {
                p.forget();
            }
        });
    }
}

/// Failures worth retrying: the server is unreachable, starting up, or out of connection slots.
fn transient(e: &Error) -> bool {
    match e {
        Error::UpstreamConnect { .. } | Error::UpstreamLost(_) | Error::Io(_) => true,
        Error::Server(v) => matches!(v.code.as_str(), "57P03" | "53300" | "57P01" | "08006" | "08001"),
        _ => false,
    }
}
