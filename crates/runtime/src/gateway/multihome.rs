//! A multihomed gateway (seed 003): the addresses it serves, the ones it
//! advertises to client agents, and the go-to that directs a client agent
//! to another of them.
//!
//! The advertised list is `advertise` from the configuration when set, else
//! every address served, a wildcard standing for the host's usable
//! addresses when they are followed (host.rs; otherwise it is left out). It is sent on every control
//! connection once the session is up, and to every session again whenever
//! it changes: `baton listen add ADDR` serves a new address at run time,
//! `baton listen remove ADDR` gives one up after directing the sessions on
//! it elsewhere (the seed's server that "determines that the original
//! connection point is congested", or an address about to be lost).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use baton_proto::Message;

use super::{accept_loop, answer_probes, send_control, Gateway, Session, Shared};
use crate::util::{lock, sid};

/// One session as the gateway's status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct GatewaySessionStatus {
    /// The client agent's id.
    pub client: String,
    /// The session id.
    pub session_id: String,
    /// The gateway address its control connection came to (null while the
    /// client agent is switching).
    pub gateway_addr: Option<String>,
    /// Where the control connection comes from.
    pub peer: Option<String>,
    /// Live streams.
    pub streams: usize,
    /// The session thread serving its connections (0 to `threads` - 1).
    pub thread: usize,
}

/// What a go-to achieved for one session.
#[derive(Debug, Clone, Serialize)]
pub struct GoToReport {
    /// The client agent's id.
    pub client: String,
    /// The session id.
    pub session_id: String,
    /// The gateway address the session was on.
    pub from: Option<String>,
    /// Where it is now (after the wait).
    pub to: Option<String>,
    /// It came back on another address within the wait.
    pub moved: bool,
    /// From the go-to to the session's control connection on the new
    /// address, in ms.
    pub ms: u64,
}

/// Registers an address as served; the token stops serving it.
pub(super) fn serving(shared: &Shared, addr: SocketAddr) -> CancellationToken {
    let mut served = lock(&shared.served);
    if let Some((_, t)) = served.iter().find(|(a, _)| *a == addr) {
        return t.clone();
    }
    let t = shared.shutdown.child_token();
    served.push((addr, t.clone()));
    t
}

/// Recomputes the advertised addresses; sends them to every session if they
/// changed.
pub(super) fn advertise(shared: &Shared) {
    let list: Vec<SocketAddr> = match &shared.config.advertise {
        Some(fixed) => fixed.clone(),
        None => {
            let host = lock(&shared.host);
            let mut v: Vec<SocketAddr> = Vec::new();
            for (a, _) in lock(&shared.served).iter() {
                // A wildcard stands for the host's addresses when they are
                // followed (host.rs); otherwise it cannot be announced.
                let these = if !a.ip().is_unspecified() {
                    vec![*a]
                } else if host.watching {
                    host.expand(*a)
                } else {
                    Vec::new()
                };
                for a in these {
                    if !v.contains(&a) {
                        v.push(a);
                    }
                }
            }
            v.truncate(baton_proto::wire::MAX_ADDRESSES);
            v
        }
    };
    {
        let mut adv = lock(&shared.advertised);
        if *adv == list {
            return;
        }
        adv.clone_from(&list);
    }
    info!(addresses = ?list, "advertising");
    let sessions: Vec<_> = lock(&shared.sessions).values().cloned().collect();
    for s in sessions {
        send_control(&s, Message::Addresses { list: list.clone() });
    }
}

/// A client agent says its session moved from one of our addresses to another.
pub(super) fn on_roam(shared: &Shared, session: &Session, from: SocketAddr, to: SocketAddr) {
    shared.stats.roams.fetch_add(1, Ordering::Relaxed);
    info!(client = %session.client_id, session = %sid(session.id), %from, %to, "client roamed to another address of the gateway");
}

/// The sessions whose control connection is on the gateway address `ip`
/// (any port).
pub(super) fn sessions_on(shared: &Shared, ip: std::net::IpAddr) -> Vec<Arc<Session>> {
    lock(&shared.sessions)
        .values()
        .filter(|s| on_addr(s).is_some_and(|a| a.ip() == ip))
        .cloned()
        .collect()
}

/// The gateway address a session's control connection is on, if attached.
fn on_addr(session: &Session) -> Option<SocketAddr> {
    lock(&session.control).as_ref().map(|a| a.local)
}

/// Sends a go-to to `sessions` and waits, at most `wait`, until each is
/// attached on another address (`to`, when given).
pub(super) async fn direct(
    shared: &Shared,
    sessions: Vec<Arc<Session>>,
    to: Option<SocketAddr>,
    wait: Duration,
) -> Vec<GoToReport> {
    let began = Instant::now();
    let mut waiting = Vec::new();
    for s in sessions {
        let from = on_addr(&s);
        shared.stats.gotos.fetch_add(1, Ordering::Relaxed);
        info!(client = %s.client_id, session = %sid(s.id), from = ?from, to = ?to, "go-to");
        send_control(&s, Message::GoTo { addr: to });
        waiting.push((s, from));
    }
    let deadline = began + wait;
    let mut reports: Vec<Option<GoToReport>> = vec![None; waiting.len()];
    loop {
        for (i, (s, from)) in waiting.iter().enumerate() {
            if reports[i].is_some() {
                continue;
            }
            let now_on = on_addr(s);
            let arrived = now_on.is_some() && now_on != *from && (to.is_none() || now_on == to);
            if arrived || Instant::now() >= deadline {
                reports[i] = Some(GoToReport {
                    client: s.client_id.clone(),
                    session_id: sid(s.id),
                    from: from.map(|a| a.to_string()),
                    to: now_on.map(|a| a.to_string()),
                    moved: arrived,
                    ms: began.elapsed().as_millis() as u64,
                });
            }
        }
        if reports.iter().all(Option::is_some) {
            return reports.into_iter().flatten().collect();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// True if `addr` is served, exactly or by a wildcard on its port.
fn serves(shared: &Shared, addr: SocketAddr) -> bool {
    lock(&shared.served).iter().any(|(a, _)| {
        *a == addr
            || (a.ip().is_unspecified() && a.port() == addr.port() && a.is_ipv4() == addr.is_ipv4())
    })
}

impl Gateway {
    /// The addresses served now.
    pub fn listening(&self) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = Vec::new();
        for (a, _) in lock(&self.shared.served).iter() {
            if !v.contains(a) {
                v.push(*a);
            }
        }
        v
    }

    /// The host's addresses as followed in the kernel's interface table
    /// (`None` when they are not followed: `watch_addresses = false`, or
    /// rtnetlink unavailable).
    pub fn host_addresses(&self) -> Option<Vec<super::HostAddrStatus>> {
        let v = lock(&self.shared.host);
        v.watching.then(|| v.addrs.clone())
    }

    /// The addresses advertised to client agents now.
    pub fn advertised(&self) -> Vec<SocketAddr> {
        lock(&self.shared.advertised).clone()
    }

    /// Every session, with the address it is on.
    pub fn sessions(&self) -> Vec<GatewaySessionStatus> {
        let mut v: Vec<_> = lock(&self.shared.sessions)
            .values()
            .map(|s| {
                let control = lock(&s.control);
                GatewaySessionStatus {
                    client: s.client_id.clone(),
                    session_id: sid(s.id),
                    gateway_addr: control.as_ref().map(|a| a.local.to_string()),
                    peer: control.as_ref().map(|a| a.peer.to_string()),
                    streams: lock(&s.streams).len(),
                    thread: s.thread,
                }
            })
            .collect();
        v.sort_by(|a, b| {
            a.client
                .cmp(&b.client)
                .then(a.session_id.cmp(&b.session_id))
        });
        v
    }

    /// Serves one more address (TCP for sessions and legs, UDP for probes)
    /// and advertises it. Returns the address bound (port 0 picks one).
    pub async fn listen_add(&self, addr: SocketAddr) -> Result<SocketAddr, String> {
        let shared = &self.shared;
        if lock(&shared.served).iter().any(|(a, _)| *a == addr) {
            return Err(format!("already listening on {addr}"));
        }
        let l = shared
            .listen(addr)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let bound = l.local_addr().map_err(|e| e.to_string())?;
        let udp = super::bind_udp(bound, bound.ip().is_unspecified(), shared.shares_ports())
            .map_err(|e| format!("cannot listen for probes on udp {bound}: {e}"))?;
        let stop = serving(shared, bound);
        shared
            .tasks
            .spawn(accept_loop(shared.clone(), l, stop.clone()));
        crate::udp::tune(&udp);
        shared
            .tasks
            .spawn(answer_probes(shared.clone(), Arc::new(udp), stop));
        info!(addr = %bound, "listening on a new address");
        advertise(shared);
        super::host::refresh_sockets(shared).await;
        Ok(bound)
    }

    /// Gives up an address: it is no longer advertised, the sessions on it
    /// are directed elsewhere (go-to, the client agent chooses) and given
    /// at most `wait` to move, then it is no longer served. Connections
    /// still on it are not cut: a session that did not move keeps working
    /// until its path fails, and then roams.
    pub async fn listen_remove(
        &self,
        addr: SocketAddr,
        wait: Duration,
    ) -> Result<Vec<GoToReport>, String> {
        let shared = &self.shared;
        let stop = {
            let mut served = lock(&shared.served);
            let Some(i) = served.iter().position(|(a, _)| *a == addr) else {
                return Err(format!("not listening on {addr}"));
            };
            if served.len() == 1 {
                return Err(format!(
                    "{addr} is the only address served: the gateway would be unreachable"
                ));
            }
            served.remove(i).1
        };
        advertise(shared);
        let on_it: Vec<_> = lock(&shared.sessions)
            .values()
            .filter(|s| {
                on_addr(s).is_some_and(|a| {
                    a == addr || (addr.ip().is_unspecified() && a.port() == addr.port())
                })
            })
            .cloned()
            .collect();
        info!(%addr, sessions = on_it.len(), "giving up an address: directing its sessions elsewhere");
        let reports = direct(shared, on_it, None, wait).await;
        for r in reports.iter().filter(|r| !r.moved) {
            warn!(client = %r.client, session = %r.session_id, %addr, "the session did not leave the address within {wait:?}");
        }
        stop.cancel();
        super::host::refresh_sockets(shared).await;
        info!(%addr, "no longer listening");
        Ok(reports)
    }

    /// Directs the sessions of `client` to the gateway address `to`, or
    /// (`None`) to another address of the client agent's choice, and waits
    /// at most `wait` for them to arrive.
    pub async fn goto(
        &self,
        client: &str,
        to: Option<SocketAddr>,
        wait: Duration,
    ) -> Result<Vec<GoToReport>, String> {
        let shared = &self.shared;
        if let Some(a) = to {
            if !serves(shared, a) {
                return Err(format!("{a} is not an address this gateway listens on"));
            }
        }
        let sessions: Vec<_> = lock(&shared.sessions)
            .values()
            .filter(|s| s.client_id == client)
            .cloned()
            .collect();
        if sessions.is_empty() {
            return Err(format!("no session of client {client:?}"));
        }
        Ok(direct(shared, sessions, to, wait).await)
    }
}
