//! Several upstream hosts, as libpq lists them: which one a server connection may use (`target_session_attrs`,
//! with libpq's meanings), decided from what the server said at login or from one query. Pure, no I/O.

use std::fmt;

/// libpq's `target_session_attrs`: what a server must be for pgsurge to keep a connection to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    /// The first host that accepts the login.
    #[default]
    Any,
    /// Accepts read-write transactions by default: not a hot standby, `default_transaction_read_only` off.
    ReadWrite,
    /// The opposite of read-write.
    ReadOnly,
    /// Not in recovery.
    Primary,
    /// In recovery (a hot standby).
    Standby,
    /// A standby if any host is one, else any host.
    PreferStandby,
}

impl TargetSessionAttrs {
    pub fn parse(s: &str) -> Option<TargetSessionAttrs> {
        Some(match s {
            "any" => Self::Any,
            "read-write" => Self::ReadWrite,
            "read-only" => Self::ReadOnly,
            "primary" => Self::Primary,
            "standby" => Self::Standby,
            "prefer-standby" => Self::PreferStandby,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Any => "any",
            Self::ReadWrite => "read-write",
            Self::ReadOnly => "read-only",
            Self::Primary => "primary",
            Self::Standby => "standby",
            Self::PreferStandby => "prefer-standby",
        }
    }

    /// What has to be known of a server to judge it (None: nothing, take it).
    pub fn needs(self) -> Option<Fact> {
        match self {
            Self::Any => None,
            Self::ReadWrite | Self::ReadOnly => Some(Fact::ReadOnly),
            Self::Primary | Self::Standby | Self::PreferStandby => Some(Fact::InRecovery),
        }
    }

    /// Whether a server of which `fact` is `value` will do (in the first pass, for prefer-standby).
    pub fn accepts(self, value: bool) -> bool {
        match self {
            Self::Any => true,
            Self::ReadWrite | Self::Primary => !value,
            Self::ReadOnly | Self::Standby | Self::PreferStandby => value,
        }
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fact about a server that `target_session_attrs` depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fact {
    /// The session is read-only by default: a hot standby, or `default_transaction_read_only` on.
    ReadOnly,
    /// The server is in recovery (`pg_is_in_recovery()`).
    InRecovery,
}

impl Fact {
    /// The answer from the ParameterStatus messages of the login: Postgres 14 and later report `in_hot_standby`
    /// and `default_transaction_read_only` (libpq relies on them too). None: an older server, ask it.
    pub fn from_params(self, reported: &[(String, String)]) -> Option<bool> {
        let get = |k: &str| reported.iter().find(|(n, _)| n == k).map(|(_, v)| v == "on");
        let standby = get("in_hot_standby")?;
        match self {
            Fact::InRecovery => Some(standby),
            Fact::ReadOnly => Some(standby || get("default_transaction_read_only")?),
        }
    }

    /// The query that answers it on an older server (one row, one boolean column).
    pub fn query(self) -> &'static str {
        match self {
            Fact::ReadOnly => "SHOW transaction_read_only",
            Fact::InRecovery => "SELECT pg_catalog.pg_is_in_recovery()",
        }
    }

    /// Reads the query's one value (`on`/`off` or `t`/`f`).
    pub fn parse_answer(v: &str) -> Option<bool> {
        match v {
            "on" | "t" | "true" => Some(true),
            "off" | "f" | "false" => Some(false),
            _ => None,
        }
    }

    /// How a server that did not do is described in the error naming every host tried.
    pub fn describe(self, value: bool) -> &'static str {
        match (self, value) {
            (Fact::ReadOnly, true) => "is read-only",
            (Fact::ReadOnly, false) => "is read-write",
            (Fact::InRecovery, true) => "is a standby (in recovery)",
            (Fact::InRecovery, false) => "is a primary (not in recovery)",
        }
    }
}

/// The hosts of an upstream in libpq's order, written as a list (`h1:5432,h2:5433`) for messages.
pub fn list_addr<'a>(hosts: impl Iterator<Item = (&'a str, u16)>) -> String {
    hosts.map(|(h, p)| crate::net::display_addr(h, p)).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn libpq_meanings() {
        use TargetSessionAttrs as T;
        for name in ["any", "read-write", "read-only", "primary", "standby", "prefer-standby"] {
            assert_eq!(T::parse(name).unwrap().name(), name);
        }
        assert!(T::parse("master").is_none());
        assert_eq!(T::Any.needs(), None);
        assert_eq!(T::ReadWrite.needs(), Some(Fact::ReadOnly));
        assert!(T::ReadWrite.accepts(false) && !T::ReadWrite.accepts(true));
        assert!(T::ReadOnly.accepts(true) && !T::ReadOnly.accepts(false));
        assert!(T::Primary.accepts(false) && !T::Primary.accepts(true));
        assert!(T::PreferStandby.accepts(true) && !T::PreferStandby.accepts(false), "the first pass wants a standby");
    }

    #[test]
    fn login_parameters_answer_on_postgres_14_and_later() {
        let standby = params(&[("in_hot_standby", "on"), ("default_transaction_read_only", "off")]);
        let primary = params(&[("in_hot_standby", "off"), ("default_transaction_read_only", "off")]);
        let ro_primary = params(&[("in_hot_standby", "off"), ("default_transaction_read_only", "on")]);
        assert_eq!(Fact::ReadOnly.from_params(&standby), Some(true));
        assert_eq!(Fact::ReadOnly.from_params(&primary), Some(false));
        assert_eq!(Fact::ReadOnly.from_params(&ro_primary), Some(true));
        assert_eq!(Fact::InRecovery.from_params(&ro_primary), Some(false));
        assert_eq!(Fact::InRecovery.from_params(&standby), Some(true));
        assert_eq!(Fact::ReadOnly.from_params(&params(&[("server_version", "13.4")])), None, "an older server is asked");
        assert_eq!((Fact::parse_answer("on"), Fact::parse_answer("f"), Fact::parse_answer("?")), (Some(true), Some(false), None));
        assert_eq!(list_addr([("h1", 5432), ("::1", 5433)].into_iter()), "h1:5432,[::1]:5433");
    }
}
