//! Limit settings as written (flat keys and the `[limits]` table), and their validated form.
//!
//! Flat keys (flag, `PGSURGE_…` env var and top-level TOML key): `limit_qps_per_user`, `limit_qps_per_address`,
//! `limit_burst`, `limit_max_delay`, `max_db_connections`, `max_user_connections`, `query_timeout`,
//! `query_cancel_timeout`, `idle_transaction_timeout`, `fairness`. Everything else lives in the file's `[limits]` table; see README.md.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, Dur, Settings};

/// One set of limits for one scope (global, per user, per address, per database, or one override).
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleSettings {
    /// Queries per second (one per Query, or per extended-protocol run up to Sync).
    pub qps: Option<u32>,
    /// Tokens that may be spent at once above the steady rate (default: `limits.burst`, else the rate itself).
    pub burst: Option<u32>,
    /// Transactions per second (one per request that starts outside a transaction).
    pub tps: Option<u32>,
    /// New client connections per second.
    pub connections_per_second: Option<u32>,
    /// Concurrent client connections.
    pub max_connections: Option<usize>,
    /// With `redis_url`: `max_connections` counts the connections of every instance (else each instance's own).
    pub global: Option<bool>,
}

/// `[limits.address_groups.NAME]`: clients from these networks share one set of address limits.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupSettings {
    pub cidrs: Vec<String>,
    #[serde(flatten)]
    pub rule: RuleSettings,
}

/// The `[limits]` table (file only).
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// All clients together.
    #[serde(default)]
    pub global: RuleSettings,
    /// Each user (overridden by `users.NAME`).
    #[serde(default)]
    pub per_user: RuleSettings,
    /// Each client address, or each address group its address falls in.
    #[serde(default)]
    pub per_address: RuleSettings,
    /// Each client-visible database (overridden by `databases.NAME`).
    #[serde(default)]
    pub per_database: RuleSettings,
    #[serde(default)]
    pub users: BTreeMap<String, RuleSettings>,
    #[serde(default)]
    pub databases: BTreeMap<String, RuleSettings>,
    #[serde(default)]
    pub address_groups: BTreeMap<String, GroupSettings>,
}

/// A validated rate: `per_second` tokens a second, at most `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// A validated rule.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Rule {
    pub qps: Option<Rate>,
    pub tps: Option<Rate>,
    pub cps: Option<Rate>,
    pub max_connections: Option<usize>,
    /// `max_connections` is counted across instances through Redis.
    pub global_connections: bool,
}

impl Rule {
    pub fn is_empty(&self) -> bool {
        self == &Rule::default()
    }
}

/// An IP network written `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() { max } else { p.trim().parse::<u8>().map_err(|e| format!("{s:?}: {e}"))? };
        if prefix > max {
            return Err(format!("{s:?}: prefix longer than {max}"));
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let (a, b, bits) = match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
            _ => return false,
        };
        let shift = bits - self.prefix as u32;
        shift >= bits || (a >> shift) == (b >> shift)
    }
}

/// Which clients a shared connection budget serves in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fairness {
    User,
    Address,
}

/// Everything the limiter needs, validated. Part of `Config`; applies on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitConfig {
    pub global: Rule,
    pub per_user: Rule,
    pub per_address: Rule,
    pub per_database: Rule,
    pub users: BTreeMap<String, Rule>,
    pub databases: BTreeMap<String, Rule>,
    /// In order: the first group whose network contains a client's address is its group.
    pub groups: Vec<(String, Vec<Cidr>, Rule)>,
    pub max_delay: Duration,
    pub fairness: Fairness,
    /// Server connections all pools of one database may hold together (0: no cap).
    pub max_db_connections: usize,
    /// Server connections all pools of one user may hold together (0: no cap).
    pub max_user_connections: usize,
    /// pgsurge cancels a statement running longer than this (zero: off).
    pub query_timeout: Duration,
    /// After query_timeout's cancel, how long the server has to end the statement before its connection is closed.
    pub query_cancel_timeout: Duration,
    /// A client idle inside a transaction longer than this is disconnected (zero: off).
    pub idle_transaction_timeout: Duration,
}

impl Default for LimitConfig {
    fn default() -> Self {
        LimitConfig {
            global: Rule::default(),
            per_user: Rule::default(),
            per_address: Rule::default(),
            per_database: Rule::default(),
            users: BTreeMap::new(),
            databases: BTreeMap::new(),
            groups: vec![],
            max_delay: Duration::from_millis(100),
            fairness: Fairness::User,
            max_db_connections: 0,
            max_user_connections: 0,
            query_timeout: Duration::ZERO,
            query_cancel_timeout: Duration::from_secs(1),
            idle_transaction_timeout: Duration::ZERO,
        }
    }
}

fn bad(msg: String) -> ConfigError {
    ConfigError(msg)
}

impl LimitConfig {
    pub fn build(s: &Settings) -> Result<LimitConfig, ConfigError> {
        let l = &s.limits;
        let burst = s.limit_burst;
        if burst == Some(0) {
            return Err(bad("limit_burst must be at least 1".into()));
        }
        let rule = |name: &str, r: &RuleSettings| -> Result<Rule, ConfigError> {
            let rate = |what: &str, v: Option<u32>| -> Result<Option<Rate>, ConfigError> {
                match v {
                    None | Some(0) => Ok(None),
                    Some(n) => {
                        let b = r.burst.or(burst).unwrap_or(n);
                        if b == 0 {
                            return Err(bad(format!("limits.{name}.burst must be at least 1 (for {what})")));
                        }
                        Ok(Some(Rate { per_second: n, burst: b }))
                    }
                }
            };
            Ok(Rule {
                qps: rate("qps", r.qps)?,
                tps: rate("tps", r.tps)?,
                cps: rate("connections_per_second", r.connections_per_second)?,
                max_connections: r.max_connections.filter(|&n| n > 0),
                global_connections: r.global.unwrap_or(false),
            })
        };
        let mut per_user = l.per_user.clone();
        if let Some(q) = s.limit_qps_per_user {
            per_user.qps = Some(q);
        }
        let mut per_address = l.per_address.clone();
        if let Some(q) = s.limit_qps_per_address {
            per_address.qps = Some(q);
        }
        let mut groups = vec![];
        for (name, g) in &l.address_groups {
            let cidrs = g
                .cidrs
                .iter()
                .map(|c| Cidr::parse(c).map_err(|e| bad(format!("limits.address_groups.{name}.cidrs: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            if cidrs.is_empty() {
                return Err(bad(format!("limits.address_groups.{name}: cidrs is empty")));
            }
            groups.push((name.clone(), cidrs, rule(&format!("address_groups.{name}"), &g.rule)?));
        }
        let fairness = match s.fairness.as_deref().unwrap_or("user") {
            "user" => Fairness::User,
            "address" => Fairness::Address,
            o => return Err(bad(format!("fairness must be user or address, not {o:?}"))),
        };
        Ok(LimitConfig {
            global: rule("global", &l.global)?,
            per_user: rule("per_user", &per_user)?,
            per_address: rule("per_address", &per_address)?,
            per_database: rule("per_database", &l.per_database)?,
            users: l.users.iter().map(|(k, r)| Ok((k.clone(), rule(&format!("users.{k}"), r)?))).collect::<Result<_, ConfigError>>()?,
            databases: l
                .databases
                .iter()
                .map(|(k, r)| Ok((k.clone(), rule(&format!("databases.{k}"), r)?)))
                .collect::<Result<_, ConfigError>>()?,
            groups,
            max_delay: s.limit_max_delay.map(|d: Dur| d.0).unwrap_or(Duration::from_millis(100)),
            fairness,
            max_db_connections: s.max_db_connections.unwrap_or(0),
            max_user_connections: s.max_user_connections.unwrap_or(0),
            query_timeout: s.query_timeout.map(|d| d.0).unwrap_or(Duration::ZERO),
            query_cancel_timeout: match s.query_cancel_timeout.map(|d| d.0) {
                Some(d) if d.is_zero() => return Err(bad("query_cancel_timeout must be more than 0".into())),
                d => d.unwrap_or(Duration::from_secs(1)),
            },
            idle_transaction_timeout: s.idle_transaction_timeout.map(|d| d.0).unwrap_or(Duration::ZERO),
        })
    }

    /// The address group of `ip`, if any.
    pub fn group_of(&self, ip: IpAddr) -> Option<usize> {
        self.groups.iter().position(|(_, cidrs, _)| cidrs.iter().any(|c| c.contains(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_match_their_networks_only() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.200.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.9".parse().unwrap()), "v4-mapped v6 is the v4 address");
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("192.168.1.1".parse().unwrap()));
        assert!(Cidr::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope/8").is_err());
    }

    #[test]
    fn flags_fill_the_common_rules_and_the_table_the_rest() {
        let file: Settings = toml::from_str(
            r#"
            fairness = "address"
            [limits.per_database]
            max_connections = 50
            [limits.users.batch]
            qps = 5
            burst = 2
            [limits.address_groups.office]
            cidrs = ["10.0.0.0/8"]
            connections_per_second = 3
            "#,
        )
        .unwrap();
        let flags = Settings { limit_qps_per_user: Some(200), limit_burst: Some(20), ..Default::default() };
        let c = LimitConfig::build(&flags.layer(file)).unwrap();
        assert_eq!(c.per_user.qps, Some(Rate { per_second: 200, burst: 20 }));
        assert_eq!(c.per_database.max_connections, Some(50));
        assert_eq!(c.users["batch"].qps, Some(Rate { per_second: 5, burst: 2 }));
        assert_eq!(c.groups[0].2.cps, Some(Rate { per_second: 3, burst: 20 }));
        assert_eq!(c.group_of("10.9.9.9".parse().unwrap()), Some(0));
        assert_eq!(c.fairness, Fairness::Address);
        assert_eq!(c.max_delay, Duration::from_millis(100));
    }

    #[test]
    fn nonsense_names_the_key() {
        let e = LimitConfig::build(&Settings { fairness: Some("loudest".into()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("fairness"), "{e}");
        let e = toml::from_str::<Settings>("[limits.per_user]\nqsp = 3").unwrap_err();
        assert!(e.to_string().contains("qsp"), "{e}");
    }
}
