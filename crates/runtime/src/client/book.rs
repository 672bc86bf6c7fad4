//! The client agent's table of a gateway's addresses (seed 003, Figures 7,
//! 8 and 11): the static ones from the configuration, each host name
//! resolved to every address it has, and the dynamic ones the gateway
//! advertises once a session is up. Plain state, no I/O: the search that
//! dials them is in `roam.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::HostPort;

/// How often the user is told again that a gateway stays unreachable.
const RETELL: Duration = Duration::from_secs(60);

/// One address as `baton status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AddressStatus {
    /// `ip:port`.
    pub addr: String,
    /// `config` (an address literal), `dns NAME:PORT` (resolved from a
    /// configured name), `advertised` (announced by the gateway) or `go_to`
    /// (named by the gateway's go-to only).
    pub origin: String,
    /// `current` (the session is on it), `ok` (reached in the last search),
    /// `failed` (every attempt of the last search failed), `untried`.
    pub state: &'static str,
    /// Attempts made in the last search.
    pub attempts: u32,
    /// Why the last attempt failed, if it did.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Config,
    Dns(String),
    Advertised,
    GoTo,
}

impl Origin {
    fn label(&self) -> String {
        match self {
            Self::Config => "config".into(),
            Self::Dns(name) => format!("dns {name}"),
            Self::Advertised => "advertised".into(),
            Self::GoTo => "go_to".into(),
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Tried {
    attempts: u32,
    error: Option<String>,
    ok: bool,
}

/// A gateway's addresses and how the last search fared with each.
#[derive(Debug)]
pub(crate) struct Book {
    statics: Vec<HostPort>,
    /// The static addresses as last resolved, in order.
    resolved: Vec<(SocketAddr, Origin)>,
    /// Names that did not resolve in the last search, with why.
    unresolved: Vec<(HostPort, String)>,
    advertised: Vec<SocketAddr>,
    /// Named by a go-to without being otherwise known.
    extra: Vec<SocketAddr>,
    /// Per address, the last search's attempts: cleared when a search
    /// begins, as the seed asks, so an address that failed once is tried
    /// again next time.
    tried: HashMap<SocketAddr, Tried>,
    current: Option<SocketAddr>,
    /// The address whose path just failed: tried last in the next search.
    suspect: Option<SocketAddr>,
    /// Searches in a row in which every address failed.
    failed_searches: u32,
    last_told: Option<Instant>,
    last_search: Option<Duration>,
}

impl Book {
    pub(crate) fn new(statics: Vec<HostPort>) -> Self {
        // Literals are known before any lookup: status shows them at once.
        let resolved = statics
            .iter()
            .filter_map(|hp| {
                hp.host
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .map(|ip| (SocketAddr::new(ip, hp.port), Origin::Config))
            })
            .collect();
        Self {
            statics,
            resolved,
            unresolved: Vec::new(),
            advertised: Vec::new(),
            extra: Vec::new(),
            tried: HashMap::new(),
            current: None,
            suspect: None,
            failed_searches: 0,
            last_told: None,
            last_search: None,
        }
    }

    /// The configured entries, to be resolved before a search.
    pub(crate) fn statics(&self) -> Vec<HostPort> {
        self.statics.clone()
    }

    /// What the static entries resolved to, in configuration order, each
    /// name's addresses in the resolver's order; and the names that failed.
    pub(crate) fn set_resolved(
        &mut self,
        entries: Vec<(HostPort, Result<Vec<SocketAddr>, String>)>,
    ) {
        self.resolved.clear();
        self.unresolved.clear();
        for (hp, r) in entries {
            let literal = hp.host.parse::<std::net::IpAddr>().is_ok();
            match r {
                Ok(addrs) => {
                    let origin = if literal {
                        Origin::Config
                    } else {
                        Origin::Dns(hp.to_string())
                    };
                    self.resolved
                        .extend(addrs.into_iter().map(|a| (a, origin.clone())));
                }
                Err(e) => self.unresolved.push((hp, e)),
            }
        }
    }

    /// Replaces the advertised addresses; true if they changed.
    pub(crate) fn set_advertised(&mut self, list: Vec<SocketAddr>) -> bool {
        let changed = self.advertised != list;
        self.advertised = list;
        changed
    }

    pub(crate) fn advertised(&self) -> &[SocketAddr] {
        &self.advertised
    }

    /// Every address known, in the order of seed 003's Figure 8: `first`
    /// (a go-to's target, or the current address on a planned interface
    /// switch), then the static addresses, then the advertised ones; the
    /// suspect address last and `exclude` not at all.
    pub(crate) fn order(
        &mut self,
        first: Option<SocketAddr>,
        exclude: Option<SocketAddr>,
    ) -> Vec<SocketAddr> {
        if let Some(f) = first {
            if !self.known(f) {
                // Bounded like the advertised list: the oldest goes.
                if self.extra.len() >= baton_proto::wire::MAX_ADDRESSES {
                    self.extra.remove(0);
                }
                self.extra.push(f);
            }
        }
        let mut out: Vec<SocketAddr> = Vec::new();
        let all = first
            .into_iter()
            .chain(self.resolved.iter().map(|(a, _)| *a))
            .chain(self.advertised.iter().copied())
            .chain(self.extra.iter().copied());
        for a in all {
            if !out.contains(&a) && Some(a) != exclude {
                out.push(a);
            }
        }
        if let Some(s) = self.suspect.filter(|s| Some(*s) != first) {
            if let Some(i) = out.iter().position(|a| *a == s) {
                let a = out.remove(i);
                out.push(a);
            }
        }
        out
    }

    fn known(&self, a: SocketAddr) -> bool {
        self.resolved.iter().any(|(r, _)| *r == a)
            || self.advertised.contains(&a)
            || self.extra.contains(&a)
    }

    /// A new search: the failures of the last one are forgotten.
    pub(crate) fn begin_search(&mut self) {
        self.tried.clear();
    }

    pub(crate) fn attempt(&mut self, a: SocketAddr) {
        self.tried.entry(a).or_default().attempts += 1;
    }

    pub(crate) fn failed(&mut self, a: SocketAddr, why: String) {
        self.tried.entry(a).or_default().error = Some(why);
    }

    /// The session is on `a` now. Returns how many searches had failed in a
    /// row before this one (to tell the user it is over).
    pub(crate) fn connected(&mut self, a: SocketAddr, took: Duration) -> u32 {
        let t = self.tried.entry(a).or_default();
        t.ok = true;
        t.error = None;
        self.current = Some(a);
        self.suspect = None;
        self.last_search = Some(took);
        self.last_told = None;
        std::mem::take(&mut self.failed_searches)
    }

    /// The path to the current address failed: in the next search it is
    /// tried last, after the gateway's other addresses.
    pub(crate) fn suspect_current(&mut self) {
        self.suspect = self.current;
    }

    /// A search failed at every address. Returns true when the user should
    /// be told: the first time, then once a minute while it lasts.
    pub(crate) fn search_failed(&mut self, now: Instant) -> bool {
        self.failed_searches += 1;
        let tell = self
            .last_told
            .is_none_or(|t| now.duration_since(t) >= RETELL);
        if tell {
            self.last_told = Some(now);
        }
        tell
    }

    pub(crate) fn failed_searches(&self) -> u32 {
        self.failed_searches
    }

    pub(crate) fn last_search(&self) -> Option<Duration> {
        self.last_search
    }

    /// One line per address that failed in the last search, for the log.
    pub(crate) fn failures(&self) -> String {
        let mut v: Vec<String> = self
            .unresolved
            .iter()
            .map(|(hp, e)| format!("{hp}: {e}"))
            .chain(self.tried.iter().filter_map(|(a, t)| {
                t.error
                    .as_ref()
                    .map(|e| format!("{a} ({} attempts): {e}", t.attempts))
            }))
            .collect();
        v.sort();
        v.join("; ")
    }

    /// Every address, in search order, as status shows it.
    pub(crate) fn status(&self) -> Vec<AddressStatus> {
        let mut out: Vec<AddressStatus> = Vec::new();
        let all = self
            .resolved
            .iter()
            .cloned()
            .chain(self.advertised.iter().map(|a| (*a, Origin::Advertised)))
            .chain(self.extra.iter().map(|a| (*a, Origin::GoTo)));
        for (a, origin) in all {
            let addr = a.to_string();
            if out.iter().any(|s| s.addr == addr) {
                continue;
            }
            let t = self.tried.get(&a).cloned().unwrap_or_default();
            let state = if self.current == Some(a) {
                "current"
            } else if t.ok {
                "ok"
            } else if t.error.is_some() {
                "failed"
            } else {
                "untried"
            };
            out.push(AddressStatus {
                addr,
                origin: origin.label(),
                state,
                attempts: t.attempts,
                error: t.error,
            });
        }
        for (hp, e) in &self.unresolved {
            out.push(AddressStatus {
                addr: hp.to_string(),
                origin: "config".into(),
                state: "failed",
                attempts: 1,
                error: Some(e.clone()),
            });
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn hp(s: &str) -> HostPort {
        s.parse().unwrap()
    }

    fn book() -> Book {
        let mut b = Book::new(vec![hp("gw.test:7700"), hp("10.89.1.2:7700")]);
        b.set_resolved(vec![
            (
                hp("gw.test:7700"),
                Ok(vec![sa("10.91.1.2:7700"), sa("10.92.1.2:7700")]),
            ),
            (hp("10.89.1.2:7700"), Ok(vec![sa("10.89.1.2:7700")])),
        ]);
        b
    }

    #[test]
    fn static_then_advertised_without_duplicates() {
        let mut b = book();
        assert!(b.set_advertised(vec![sa("10.89.1.2:7700"), sa("10.90.1.2:7700")]));
        assert!(!b.set_advertised(vec![sa("10.89.1.2:7700"), sa("10.90.1.2:7700")]));
        let order = b.order(None, None);
        assert_eq!(
            order,
            [
                "10.91.1.2:7700",
                "10.92.1.2:7700",
                "10.89.1.2:7700",
                "10.90.1.2:7700"
            ]
            .map(sa)
        );
        let st = b.status();
        assert_eq!(st[0].origin, "dns gw.test:7700");
        assert_eq!(st[2].origin, "config");
        assert_eq!(st[3].origin, "advertised");
        assert!(st.iter().all(|s| s.state == "untried"));
    }

    #[test]
    fn a_failed_address_goes_last_and_a_go_to_target_first() {
        let mut b = book();
        b.connected(sa("10.91.1.2:7700"), Duration::ZERO);
        b.suspect_current();
        assert_eq!(b.order(None, None).last(), Some(&sa("10.91.1.2:7700")));
        // A go-to names its target first, even one the table did not have.
        let order = b.order(Some(sa("10.93.1.2:7700")), None);
        assert_eq!(order[0], sa("10.93.1.2:7700"));
        assert!(b.status().iter().any(|s| s.origin == "go_to"));
        // "Client chooses": every address but the current one.
        let order = b.order(None, Some(sa("10.91.1.2:7700")));
        assert!(!order.contains(&sa("10.91.1.2:7700")));
        assert_eq!(order[0], sa("10.92.1.2:7700"));
    }

    #[test]
    fn failures_are_cleared_before_each_search_and_the_user_told_once_a_minute() {
        let mut b = book();
        let t0 = Instant::now();
        b.begin_search();
        for a in b.order(None, None) {
            b.attempt(a);
            b.attempt(a);
            b.failed(a, "refused".into());
        }
        assert!(b
            .status()
            .iter()
            .all(|s| s.state == "failed" && s.attempts == 2));
        assert!(b.search_failed(t0));
        assert!(!b.search_failed(t0 + Duration::from_secs(5)));
        assert!(b.search_failed(t0 + Duration::from_secs(61)));
        assert_eq!(b.failed_searches(), 3);
        b.begin_search();
        assert!(b
            .status()
            .iter()
            .all(|s| s.state == "untried" && s.attempts == 0));
        b.attempt(sa("10.92.1.2:7700"));
        assert_eq!(
            b.connected(sa("10.92.1.2:7700"), Duration::from_millis(800)),
            3
        );
        assert_eq!(b.failed_searches(), 0);
        assert_eq!(b.status()[1].state, "current");
        assert!(
            b.search_failed(t0 + Duration::from_secs(62)),
            "a new outage is told at once"
        );
    }

    #[test]
    fn names_that_do_not_resolve_are_shown_failed() {
        let mut b = Book::new(vec![hp("nowhere.test:7700")]);
        b.set_resolved(vec![(hp("nowhere.test:7700"), Err("no such host".into()))]);
        assert!(b.order(None, None).is_empty());
        let st = b.status();
        assert_eq!(
            (st[0].state, st[0].error.as_deref()),
            ("failed", Some("no such host"))
        );
        assert!(b.failures().contains("nowhere.test:7700: no such host"));
    }
}
