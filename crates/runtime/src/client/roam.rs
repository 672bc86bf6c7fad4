//! A multihomed gateway, seen from the client agent (seed 003).
//!
//! - **The connection algorithm** (Figure 8): the gateway's addresses are
//!   tried in order (the static ones, every address of every configured
//!   name, then those the gateway advertised), each up to `retries` times
//!   with `retry_delay` between attempts, before the next. What failed in
//!   one search is forgotten when the next begins. When every address
//!   fails the user is told (log, `gateway_unreachable` event, status).
//! - **Both ends multihomed**: an attempt at an address races the usable
//!   interfaces, preferred first, each next one joining after
//!   [`STAGGER`] or as soon as the one before fails; the first TCP
//!   connection made carries the handshake. So a dead gateway address and a
//!   dead interface both cost one attempt, not one attempt per pair.
//! - **Roam**: when the path fails while the interface is still up, its
//!   gateway address is tried last in the next search, so the session moves
//!   to another address of the gateway (and possibly another interface at
//!   the same time), as an unexpected switch. `baton roam`, and the
//!   decision engine when a path to another address is better (its
//!   candidates are every (interface, gateway address) pair), move it as a
//!   planned switch. The gateway is told with `Roam` once the session is on
//!   the new address.
//! - **Go-to**: the gateway directs the session to one of its addresses, or
//!   lets the agent choose; the agent moves make-before-break, like a
//!   planned interface switch, starting with the address named and going on
//!   with the others if it fails.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use baton_proto::Message;

use super::{
    handshake_on, AddressStatus, Client, Core, Established, Link, LinkState, Route, SessionError,
    Shared, SwitchRecord, SwitchRequest,
};
use crate::path::{connect_via, Path, LOOPBACK};
use crate::util::lock;

/// How long an attempt waits for the interface before trying the next one
/// in parallel.
const STAGGER: Duration = Duration::from_millis(250);

/// Which gateway address a planned switch goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AddrChoice {
    /// The current one (an interface switch); others only if it fails.
    Keep,
    /// This one first, then the others (a go-to, `baton roam ADDR`).
    To(SocketAddr),
    /// Any but the current one (a go-to without address, `baton roam`).
    Other,
}

/// A gateway's addresses as `baton status` shows them, per session.
#[derive(Debug, Clone, Serialize)]
pub struct AddressBookStatus {
    /// Every address known, in the order a search tries them.
    pub addresses: Vec<AddressStatus>,
    /// The addresses the gateway advertised last.
    pub advertised: Vec<String>,
    /// Searches in a row in which every address failed (0 when connected).
    pub failed_searches: u32,
    /// How long the last successful search took, from its start to the
    /// session up on an address, in ms.
    pub last_search_ms: Option<u64>,
}

/// Resolves the static entries: every address of every name, in the
/// resolver's order (`/etc/hosts`, DNS).
async fn resolve(shared: &Shared, link: &Link) {
    let statics = lock(&link.book).statics();
    let mut entries = Vec::with_capacity(statics.len());
    for hp in statics {
        let r = match hp.host.parse::<IpAddr>() {
            Ok(ip) => Ok(vec![SocketAddr::new(ip, hp.port)]),
            Err(_) => {
                let lookup = tokio::net::lookup_host((hp.host.as_str(), hp.port));
                match tokio::time::timeout(shared.config.connect_timeout, lookup).await {
                    Ok(Ok(found)) => {
                        let mut v: Vec<SocketAddr> = Vec::new();
                        for a in found {
                            if !v.contains(&a) {
                                v.push(a);
                            }
                        }
                        if v.is_empty() {
                            Err("the name has no address".to_owned())
                        } else {
                            Ok(v)
                        }
                    }
                    Ok(Err(e)) => Err(format!("name lookup failed: {e}")),
                    Err(_) => Err("name lookup timed out".to_owned()),
                }
            }
        };
        entries.push((hp, r));
    }
    lock(&link.book).set_resolved(entries);
}

/// The connection algorithm: tries the gateway's addresses over `paths`
/// until a control connection is established. `first` is tried first,
/// `exclude` not at all. With `connecting` (keeping the session, not a
/// planned move) a search in which everything failed is told to the user.
pub(super) async fn search(
    shared: &Shared,
    link: &Link,
    resume: u64,
    paths: &[Path],
    first: Option<SocketAddr>,
    exclude: Option<SocketAddr>,
    connecting: bool,
) -> Result<Established, SessionError> {
    let began = Instant::now();
    let (retries, delay) = shared
        .config
        .gateways
        .get(&link.gateway)
        .map_or((1, Duration::ZERO), |g| (g.retries.max(1), g.retry_delay));
    // Names are resolved again at each search, but not before `first`
    // (the current address on an interface switch, a go-to's target) has
    // been tried: a planned switch need not wait for DNS.
    let mut resolved = first.is_none();
    if resolved {
        resolve(shared, link).await;
    }
    let mut order = {
        let mut b = lock(&link.book);
        b.begin_search();
        b.order(first, exclude)
    };
    let mut last = SessionError::Unreachable("no address of the gateway to try".into());
    let mut tried: Vec<SocketAddr> = Vec::new();
    loop {
        let next = order.iter().copied().find(|a| !tried.contains(a));
        if !resolved && (next.is_none() || !tried.is_empty()) {
            // `first` failed: now the names, and the order they give.
            resolved = true;
            resolve(shared, link).await;
            order = lock(&link.book).order(first, exclude);
            continue;
        }
        let Some(addr) = next else { break };
        tried.push(addr);
        // Only the interfaces that can reach it: its address family, and the
        // loopback device for this host's addresses alone.
        let fit: Vec<Path> = paths
            .iter()
            .filter(|p| p.source.is_none_or(|s| s.is_ipv4() == addr.is_ipv4()))
            .filter(|p| p.device.is_none() || (p.name == LOOPBACK) == addr.ip().is_loopback())
            .cloned()
            .collect();
        if fit.is_empty() {
            lock(&link.book).failed(addr, "no interface can reach it".into());
            continue;
        }
        for n in 1..=retries {
            lock(&link.book).attempt(addr);
            match attempt(shared, &fit, addr, resume).await {
                Ok(est) => {
                    let took = began.elapsed();
                    let failed_before = lock(&link.book).connected(addr, took);
                    if failed_before > 0 {
                        info!(gateway = %link.gateway, %addr, "gateway reachable again after {failed_before} failed search(es)");
                    }
                    debug!(gateway = %link.gateway, %addr, path = %est.route.path.name, attempt = n, ms = took.as_millis() as u64, "connected");
                    return Ok(est);
                }
                Err(e @ SessionError::Refused { .. }) => {
                    // The gateway's own answer: another address reaches the same gateway.
                    lock(&link.book).failed(addr, e.to_string());
                    return Err(e);
                }
                Err(e) => {
                    debug!(gateway = %link.gateway, %addr, attempt = n, of = retries, "attempt failed: {e}");
                    lock(&link.book).failed(addr, e.to_string());
                    last = e;
                    if n < retries {
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }
    if connecting {
        let told = {
            let mut b = lock(&link.book);
            b.search_failed(std::time::Instant::now())
                .then(|| (b.failed_searches(), b.failures()))
        };
        if let Some((n, what)) = told {
            let names: Vec<&str> = paths.iter().map(|p| p.name.as_str()).collect();
            warn!(gateway = %link.gateway, interfaces = ?names, "every address of the gateway failed ({n} search(es) in a row): {what}");
            let reason = format!(
                "{}: every address failed over {}: {what}",
                link.gateway,
                names.join(", ")
            );
            shared
                .events
                .publish("gateway_unreachable", None, reason, true);
        }
    }
    Err(last)
}

/// One attempt at `target`: a TCP connection raced over the interfaces,
/// then the session handshake on the first one made.
async fn attempt(
    shared: &Shared,
    paths: &[Path],
    target: SocketAddr,
    resume: u64,
) -> Result<Established, SessionError> {
    let (stream, path, rtt) = race(paths, target, shared.config.connect_timeout)
        .await
        .map_err(|e| SessionError::Unreachable(format!("{target}: {e}")))?;
    handshake_on(shared, &path, target, stream, rtt, resume).await
}

/// Connects to `target` over the first of `paths` to succeed: the preferred
/// one at once, each next one after [`STAGGER`] or when the one before
/// failed. Returns the connection, its path and how long it took.
async fn race(
    paths: &[Path],
    target: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, Path, Duration), String> {
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    let mut errors = Vec::new();
    loop {
        if pending.is_empty() {
            let Some(p) = paths.get(next) else {
                return Err(errors.join("; "));
            };
            pending.push(dial(p.clone(), target, timeout));
            next += 1;
        }
        tokio::select! {
            Some(r) = pending.next() => match r {
                Ok(won) => return Ok(won),
                Err(e) => errors.push(e),
            },
            _ = tokio::time::sleep(STAGGER), if next < paths.len() => {
                pending.push(dial(paths[next].clone(), target, timeout));
                next += 1;
            }
        }
    }
}

async fn dial(
    path: Path,
    target: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, Path, Duration), String> {
    let began = Instant::now();
    match connect_via(target, &path, timeout, false).await {
        Ok(s) => Ok((s, path, began.elapsed())),
        Err(e) => Err(format!("via {}: {e}", path.name)),
    }
}

/// A planned move, make before break: to another interface (keeping the
/// gateway address if it works there), to another gateway address, or
/// both. `Ok(None)`: the session already is where it was asked to go.
pub(super) async fn planned(
    shared: &Arc<Shared>,
    link: &Link,
    core: &Arc<Core>,
    route: &Route,
    req: &SwitchRequest,
) -> Result<Option<Established>, String> {
    let here = route.gateway_addr;
    let same_iface = req.to == route.path.name;
    let (first, exclude) = match req.addr {
        AddrChoice::Keep => (Some(here), None),
        // On the same interface, falling back to the current address would
        // be no move at all.
        AddrChoice::To(a) => (Some(a), same_iface.then_some(here)),
        AddrChoice::Other => (None, Some(here)),
    };
    if same_iface && first == Some(here) {
        return Ok(None);
    }
    let Some(path) = shared.paths.get(&req.to) else {
        return Err(format!("interface {:?} is not known or not up", req.to));
    };
    if req.addr == AddrChoice::Other && lock(&link.book).order(None, exclude).is_empty() {
        return Err(format!(
            "gateway {} has no address but {here}",
            link.gateway
        ));
    }
    let target = match req.addr {
        AddrChoice::Keep => req.to.clone(),
        AddrChoice::To(a) => format!("{a} via {}", req.to),
        AddrChoice::Other => format!("another address via {}", req.to),
    };
    match search(shared, link, core.id, &[path], first, exclude, false).await {
        Ok(new) if new.session_id == core.id => Ok(Some(new)),
        Ok(_) => Err(format!(
            "cannot switch to {target}: the gateway no longer holds the session"
        )),
        Err(e) => Err(format!("cannot switch to {target}: {e}")),
    }
}

/// The path to the session's gateway address failed. If the interface is
/// still up, the address may be what failed: the next search tries it last
/// (the seed's roam). An interface that is gone says nothing about it.
pub(super) fn path_failed(shared: &Shared, link: &Link, path: &str) {
    if shared.paths.is_usable(path) {
        lock(&link.book).suspect_current();
    }
}

/// Tells the gateway, on a control connection just up, that the session
/// moved to another of its addresses.
pub(super) fn announce(link: &Link, core: &Core) {
    if let Some((from, to)) = lock(&link.pending_roam).take() {
        if let Some(tx) = &*lock(&core.control) {
            let _ = tx.send(Message::Roam { from, to });
        }
    }
}

/// Takes the multihomed gateway's messages; hands every other one back.
pub(super) fn on_message(
    shared: &Arc<Shared>,
    link: &Link,
    route: &Route,
    msg: Message,
) -> Option<Message> {
    match msg {
        Message::Addresses { list } => {
            if lock(&link.book).set_advertised(list.clone()) {
                info!(gateway = %link.gateway, addresses = ?list, "the gateway advertises its addresses");
            }
            None
        }
        Message::GoTo { addr } => {
            info!(gateway = %link.gateway, to = ?addr, "the gateway directs the session to another of its addresses (go-to)");
            let choice = addr.map_or(AddrChoice::Other, AddrChoice::To);
            let reason = match addr {
                Some(a) => format!("go-to {a} from the gateway"),
                None => "go-to from the gateway".to_owned(),
            };
            let rx = request(link, route.path.name.clone(), choice, reason);
            let (events, gateway) = (shared.events.clone(), link.gateway.clone());
            shared.tasks.spawn(async move {
                match rx.await {
                    Ok(Ok(Some(r))) => {
                        debug!(gateway = %gateway, to = %r.gateway_addr_to, "go-to done")
                    }
                    Ok(Ok(None)) => {
                        debug!(gateway = %gateway, "go-to: the session already is there")
                    }
                    Ok(Err(e)) => {
                        warn!(gateway = %gateway, "go-to failed: {e}");
                        events.publish("go_to_failed", None, format!("{gateway}: {e}"), false);
                    }
                    Err(_) => {}
                }
            });
            None
        }
        other => Some(other),
    }
}

/// Queues a planned move of the link's session; resolves when done.
fn request(
    link: &Link,
    to: String,
    addr: AddrChoice,
    reason: String,
) -> oneshot::Receiver<Result<Option<SwitchRecord>, String>> {
    let (done, rx) = oneshot::channel();
    // If the control loop is gone the sender drops and `rx` says so.
    let _ = link.switch_tx.send(SwitchRequest {
        to,
        addr,
        reason,
        done,
    });
    rx
}

impl Client {
    /// The addresses of `gateway` as status shows them.
    pub fn gateway_addresses(&self, gateway: &str) -> Option<AddressBookStatus> {
        let link = self.shared.links.get(gateway)?;
        let b = lock(&link.book);
        Some(AddressBookStatus {
            addresses: b.status(),
            advertised: b.advertised().iter().map(ToString::to_string).collect(),
            failed_searches: b.failed_searches(),
            last_search_ms: b.last_search().map(|d| d.as_millis() as u64),
        })
    }

    /// Planned move of the sessions (of `gateway`, or every gateway) to the
    /// gateway address `to`, or to another address of theirs, on the
    /// interface they use: seed 003's roam, asked by the user.
    pub async fn roam(
        &self,
        gateway: Option<&str>,
        to: Option<SocketAddr>,
        reason: &str,
    ) -> Result<Vec<SwitchRecord>, String> {
        let links: Vec<&Arc<Link>> = match gateway {
            Some(g) => vec![self
                .shared
                .links
                .get(g)
                .ok_or_else(|| format!("no gateway {g:?}"))?],
            None => {
                let mut v: Vec<_> = self.shared.links.values().collect();
                v.sort_by(|a, b| a.gateway.cmp(&b.gateway));
                v
            }
        };
        if to.is_some() && links.len() > 1 {
            return Err("an address belongs to one gateway: name it".into());
        }
        let mut waits = Vec::new();
        for link in links {
            let LinkState::Up(info) = link.state.borrow().clone() else {
                return Err(format!("the session with {} is not up", link.gateway));
            };
            let choice = to.map_or(AddrChoice::Other, AddrChoice::To);
            waits.push(request(link, info.path, choice, reason.to_owned()));
        }
        let mut records = Vec::new();
        for rx in waits {
            if let Some(r) = rx.await.map_err(|_| "client stopped".to_owned())?? {
                records.push(r);
            }
        }
        Ok(records)
    }

    /// The gateway's addresses other than `current`, in search order, for
    /// the decision engine to measure: the first gateway's (the one probes
    /// go to), static and advertised.
    pub(crate) fn probe_targets(&self, current: SocketAddr) -> Vec<SocketAddr> {
        let mut names: Vec<_> = self.shared.links.keys().collect();
        names.sort();
        let Some(link) = names.first().map(|n| &self.shared.links[*n]) else {
            return Vec::new();
        };
        let mut order = lock(&link.book).order(None, Some(current));
        order.truncate(baton_policy::MAX_TARGETS);
        order
    }

    /// A planned move decided by the engine: every session to interface
    /// `to`, and with `addr` the first gateway's session (the one the
    /// engine measures) to that gateway address at the same time; the
    /// other sessions keep their address.
    pub(crate) async fn switch_path(
        &self,
        to: &str,
        addr: Option<SocketAddr>,
        reason: &str,
    ) -> Result<Vec<SwitchRecord>, String> {
        let Some(addr) = addr else {
            return self.switch_now(to, reason).await;
        };
        if !self.shared.paths.is_usable(to) {
            return Err(format!("interface {to:?} is not known or not up"));
        }
        let mut names: Vec<_> = self.shared.links.keys().cloned().collect();
        names.sort();
        let mut waits = Vec::new();
        for (n, name) in names.iter().enumerate() {
            let choice = if n == 0 {
                AddrChoice::To(addr)
            } else {
                AddrChoice::Keep
            };
            waits.push(request(
                &self.shared.links[name],
                to.to_owned(),
                choice,
                reason.to_owned(),
            ));
        }
        let mut records = Vec::new();
        for rx in waits {
            if let Some(r) = rx.await.map_err(|_| "client stopped".to_owned())?? {
                records.push(r);
            }
        }
        Ok(records)
    }
}
