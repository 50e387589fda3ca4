//! What a reload may change: the keys that need a restart keep their running values (and are named in the
//! notes), and a database whose upstream moved is noted (new clients get a pool at the new upstream).

use super::{keys, Config};

/// What a reload could not apply as the file says.
#[derive(Debug, Default)]
pub struct Unapplied {
    /// Keys that need a restart, said in a sentence each.
    pub notes: Vec<String>,
    /// Databases whose upstream (host, port or dbname) changed: their open pools are retired.
    pub moved: Vec<String>,
}

/// Turns `new` into the configuration a reload applies over `old`.
pub fn prepare(old: &Config, new: &mut Config) -> Unapplied {
    let mut notes = vec![];
    for ((key, before, _, live), (_, after, _, _)) in keys::rows(old).iter().zip(&keys::rows(new)) {
        if !live && before != after {
            notes.push(format!("{key} changed in the file but needs a restart; the running value stays"));
        }
    }
    (new.listen, new.admin_listen, new.workers, new.own_session, new.log_format) =
        (old.listen.clone(), old.admin_listen.clone(), old.workers, old.own_session, old.log_format);
    new.cache = old.cache.clone();
    (new.unix_socket_dir, new.logfile, new.pidfile) = (old.unix_socket_dir.clone(), old.logfile.clone(), old.pidfile.clone());
    new.redis = old.redis.clone();
    let moved = new
        .databases
        .iter()
        .filter(|(name, db)| {
            old.databases.get(*name).is_some_and(|o| {
                (&o.host, o.port, &o.more_hosts, o.target_session_attrs, &o.dbname)
                    != (&db.host, db.port, &db.more_hosts, db.target_session_attrs, &db.dbname)
            })
        })
        .map(|(name, _)| name.clone())
        .collect();
    Unapplied { notes, moved }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn config(extra: &str) -> Config {
        let file: Settings = toml::from_str(extra).unwrap();
        Config::build(Settings { upstream: Some("postgres://app:pw@127.0.0.1:5433/app".into()), ..Default::default() }.layer(file)).unwrap()
    }

    #[test]
    fn restart_keys_keep_their_running_values_and_are_named() {
        let old = config("pool_size = 5");
        let mut new = config("pool_size = 7\nlisten = \"127.0.0.1:7000\"\n[cache]\ndefault_ttl = \"30s\"");
        let notes = prepare(&old, &mut new).notes;
        assert_eq!(new.pool_size, 7, "applies live");
        assert_eq!(new.listen, old.listen);
        assert_eq!(new.cache.default_ttl, old.cache.default_ttl);
        assert!(notes.iter().any(|n| n.starts_with("listen ")), "{notes:?}");
        assert!(notes.iter().any(|n| n.starts_with("cache.default_ttl ")), "{notes:?}");
        assert!(!notes.iter().any(|n| n.starts_with("pool_size")), "{notes:?}");
    }
}
