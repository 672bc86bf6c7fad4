//! Client services at the gateway (server → client: push, publish/subscribe).
//!
//! A client agent declares the services it serves ([`Message::Expose`]) on
//! each control connection. The gateway gives the agent an address of its
//! own from `virtual_pool` (the same one for the same client id while the
//! gateway runs: seed 000's virtual IPs, so that many agents can expose the
//! same port) and listens on `address:port` for each service the
//! configuration allows it. A server's connection there becomes a stream
//! with an id from the gateway's space; the gateway announces it
//! ([`Message::Incoming`]) and the client agent dials its leg, as it does for
//! every leg: the gateway never needs to reach the agent. From there on the
//! stream is relayed, and survives switches, exactly like the streams the
//! agent opens.
//!
//! A UDP client service (`protocol = "udp"`) gets a datagram socket on the
//! same address and port instead: each server address that sends to it is a
//! flow of the owning session's UDP side, opened from the gateway's side
//! (see [`crate::udp`]), and its datagrams go the way an agent's UDP flows
//! do, back to the server from the same socket.
//!
//! The listeners belong to the client id, not to a session: a client agent
//! that restarts (new session, same id) takes them over, and they close when
//! the session that owns them is released.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use baton_proto::{Message, RefuseReason, ResetCode};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{send_control, stream_ended, Session, Shared};
use crate::config::{AddrBlock, Protocol};
use crate::shards::Moving;
use crate::stream::{self, StreamEnd, StreamLimits, StreamShared};
use crate::util::{lock, sid};

/// The gateway's client services: the address book and, per client id,
/// what listens for it.
#[derive(Debug)]
pub(super) struct Exposures {
    pool: AddressBook,
    by_client: HashMap<String, ClientExposure>,
}

#[derive(Debug)]
struct ClientExposure {
    addr: IpAddr,
    /// The session incoming connections go to: the client's latest session
    /// that declared its services.
    owner: u64,
    /// Services listened for, with the address servers connect to.
    listening: HashMap<String, SocketAddr>,
    /// Fires to close every listener of the client.
    stop: CancellationToken,
}

impl Exposures {
    /// `share`: (this worker, workers): a worker hands out only the pool
    /// positions congruent to its index, so that no two workers give one
    /// address to two clients.
    pub(super) fn new(blocks: Vec<AddrBlock>, share: (usize, usize)) -> Self {
        let mut pool = AddressBook::new(blocks);
        pool.share = share;
        Self {
            pool,
            by_client: HashMap::new(),
        }
    }

    /// The address assigned to a client with services listening now.
    pub(super) fn address_of(&self, client: &str) -> Option<IpAddr> {
        self.by_client.get(client).map(|e| e.addr)
    }
}

/// Hands out pool addresses to client ids. The same client gets the same
/// address again, as long as the gateway runs and the pool is not so short
/// that its address went to another client while it was away; fresh
/// addresses are used before any is taken back, and then the one unused the
/// longest.
#[derive(Debug)]
pub(super) struct AddressBook {
    blocks: Vec<AddrBlock>,
    /// Next never-assigned position in the blocks.
    next_fresh: u64,
    remembered: HashMap<String, IpAddr>,
    owner_of: HashMap<IpAddr, String>,
    active: HashSet<String>,
    /// Clients not holding their address now, longest away first.
    away: VecDeque<String>,
    /// (this worker, workers): the positions this book may hand out.
    share: (usize, usize),
}

impl AddressBook {
    pub(super) fn new(blocks: Vec<AddrBlock>) -> Self {
        Self {
            blocks,
            next_fresh: 0,
            remembered: HashMap::new(),
            owner_of: HashMap::new(),
            active: HashSet::new(),
            away: VecDeque::new(),
            share: (0, 1),
        }
    }

    /// The address of `client`, assigning one if needed. `None`: every
    /// address is held by a connected client.
    pub(super) fn assign(&mut self, client: &str) -> Option<IpAddr> {
        if let Some(a) = self.remembered.get(client).copied() {
            self.away.retain(|c| c != client);
            self.active.insert(client.to_owned());
            return Some(a);
        }
        let addr = match self.fresh() {
            Some(a) => a,
            None => {
                let from = self.away.pop_front()?;
                let a = self.remembered.remove(&from)?;
                self.owner_of.remove(&a);
                a
            }
        };
        self.remembered.insert(client.to_owned(), addr);
        self.owner_of.insert(addr, client.to_owned());
        self.active.insert(client.to_owned());
        Some(addr)
    }

    /// `client` no longer holds its address; it is still remembered for it.
    pub(super) fn free(&mut self, client: &str) {
        if self.active.remove(client) {
            self.away.push_back(client.to_owned());
        }
    }

    fn fresh(&mut self) -> Option<IpAddr> {
        loop {
            let mut i = self.next_fresh;
            let mut found = None;
            for b in &self.blocks {
                if i < b.usable() {
                    found = b.nth(i);
                    break;
                }
                i -= b.usable();
            }
            let a = found?;
            let position = self.next_fresh;
            self.next_fresh += 1;
            if position % self.share.1 as u64 != self.share.0 as u64 {
                continue; // Another worker's.
            }
            // Overlapping blocks may name an address twice.
            if !self.owner_of.contains_key(&a) {
                return Some(a);
            }
        }
    }
}

/// How long a bind waits for listeners of the same address that are closing
/// (the client's previous session, released a moment ago).
const BIND_RETRY: Duration = Duration::from_millis(1000);

/// Answers a client's [`Message::Expose`]: listens for each service the
/// configuration allows it, on the client's address.
pub(super) async fn on_expose(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    services: Vec<String>,
) -> Message {
    let client = session.client_id.clone();
    let allowed = shared
        .config
        .clients
        .get(&client)
        .map(|c| c.exposes.clone())
        .unwrap_or_default();
    let mut asked = Vec::new();
    let mut seen = BTreeSet::new();
    for s in services {
        if seen.insert(s.clone()) {
            asked.push(s);
        }
    }
    let mut results: HashMap<String, Result<SocketAddr, RefuseReason>> = HashMap::new();
    let mut to_bind = Vec::new();
    let (addr, stop) = {
        let mut ex = lock(&shared.exposures);
        let ex = &mut *ex;
        let wanted: Vec<&String> = asked.iter().filter(|s| allowed.contains(s)).collect();
        for s in asked.iter().filter(|s| !allowed.contains(s)) {
            warn!(client = %client, service = %s, "client service refused: not in clients.{client}.exposes");
            results.insert(s.clone(), Err(RefuseReason::ServiceNotAllowed));
        }
        if wanted.is_empty() {
            return reply(&asked, results);
        }
        if !ex.by_client.contains_key(&client) {
            let Some(addr) = ex.pool.assign(&client) else {
                warn!(client = %client, "client services refused: every address of virtual_pool is held by a connected client");
                for s in wanted {
                    results.insert(s.clone(), Err(RefuseReason::CapacityFull));
                }
                return reply(&asked, results);
            };
            let exposure = ClientExposure {
                addr,
                owner: session.id,
                listening: HashMap::new(),
                stop: shared.shutdown.child_token(),
            };
            ex.by_client.insert(client.clone(), exposure);
        }
        let Some(entry) = ex.by_client.get_mut(&client) else {
            // Inserted just above, under the same lock.
            return reply(&asked, results);
        };
        // The latest session of the client gets the incoming connections (a
        // restarted agent's earlier session is dead even if not yet released).
        entry.owner = session.id;
        for s in wanted {
            match entry.listening.get(s) {
                Some(a) => {
                    results.insert(s.clone(), Ok(*a));
                }
                None => to_bind.push(s.clone()),
            }
        }
        (entry.addr, entry.stop.clone())
    };
    let mut bound = Vec::new();
    for s in to_bind {
        let e = &shared.config.exposed[&s];
        let at = SocketAddr::new(addr, e.port);
        match bind(at, e.protocol).await {
            Ok(l) => bound.push((s, at, l)),
            Err(e) => {
                warn!(client = %client, service = %s, "cannot listen on {at} for the client service: {e}");
                results.insert(s, Err(RefuseReason::ListenFailed));
            }
        }
    }
    let opened = !bound.is_empty();
    {
        let mut ex = lock(&shared.exposures);
        // Released meanwhile: the listeners are simply dropped.
        let entry = ex
            .by_client
            .get_mut(&client)
            .filter(|e| !e.stop.is_cancelled() && e.addr == addr);
        match entry {
            Some(entry) => {
                for (s, at, l) in bound {
                    entry.listening.insert(s.clone(), at);
                    results.insert(s.clone(), Ok(at));
                    match l {
                        Listener::Tcp(l) => shared.tasks.spawn(accept_loop(
                            shared.clone(),
                            client.clone(),
                            s,
                            l,
                            stop.clone(),
                        )),
                        Listener::Udp(u) => shared.tasks.spawn(datagram_loop(
                            shared.clone(),
                            client.clone(),
                            s,
                            u,
                            stop.clone(),
                        )),
                    };
                }
            }
            None => {
                for (s, ..) in bound {
                    results.insert(s, Err(RefuseReason::UnknownSession));
                }
            }
        }
    }
    let listening: Vec<String> = asked
        .iter()
        .filter_map(|s| {
            results
                .get(s)
                .and_then(|r| r.as_ref().ok())
                .map(|a| format!("{s}={a}"))
        })
        .collect();
    // Logged when listeners open, not on every reconnect of the agent.
    if opened {
        info!(client = %client, session = %sid(session.id), address = %addr, services = %listening.join(" "), "client services listening");
    }
    reply(&asked, results)
}

fn reply(
    asked: &[String],
    mut results: HashMap<String, Result<SocketAddr, RefuseReason>>,
) -> Message {
    let entries = asked
        .iter()
        .map(|s| {
            (
                s.clone(),
                results
                    .remove(s)
                    .unwrap_or(Err(RefuseReason::ServiceNotAllowed)),
            )
        })
        .collect();
    Message::Exposed { entries }
}

/// What listens for a client service.
enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

async fn bind(at: SocketAddr, protocol: Protocol) -> std::io::Result<Listener> {
    let deadline = tokio::time::Instant::now() + BIND_RETRY;
    loop {
        let r = match protocol {
            Protocol::Tcp => baton_os::listen(at).map(Listener::Tcp),
            Protocol::Udp => UdpSocket::bind(at).await.map(Listener::Udp),
        };
        match r {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            r => return r,
        }
    }
}

/// The session is released: if it owns its client's listeners, they close
/// and the address goes back to the pool (still remembered for the client).
pub(super) fn on_release(shared: &Shared, session: &Session) {
    let mut ex = lock(&shared.exposures);
    let owned = ex
        .by_client
        .get(&session.client_id)
        .is_some_and(|e| e.owner == session.id);
    if !owned {
        return;
    }
    if let Some(e) = ex.by_client.remove(&session.client_id) {
        e.stop.cancel();
        ex.pool.free(&session.client_id);
        info!(client = %session.client_id, address = %e.addr, "client services closed");
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    client: String,
    service: String,
    listener: TcpListener,
    stop: CancellationToken,
) {
    loop {
        let (conn, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(client = %client, service = %service, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let owner = lock(&shared.exposures)
            .by_client
            .get(&client)
            .map(|e| e.owner);
        let session = owner.and_then(|id| lock(&shared.sessions).get(&id).cloned());
        let Some(session) = session else {
            debug!(client = %client, %peer, "client service connection while the session ends: reset");
            baton_os::reset(conn);
            continue;
        };
        open_stream(&shared, &session, &service, conn, peer);
    }
}

/// Reads what servers send to a UDP client service and hands it to the
/// session that owns the client's services now, until `stop`.
async fn datagram_loop(
    shared: Arc<Shared>,
    client: String,
    service: String,
    socket: UdpSocket,
    stop: CancellationToken,
) {
    crate::udp::tune(&socket);
    let socket = Arc::new(socket);
    // One byte more than a relayable payload: a datagram that fills it was
    // larger (the kernel truncates to the buffer).
    let mut buf = vec![0u8; baton_proto::datagram::MAX_PAYLOAD + 1];
    let mut owner: Option<Arc<Session>> = None;
    loop {
        let (n, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    debug!(client = %client, service = %service, "udp receive: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        // The owner changes when the agent restarts (a new session).
        let id = lock(&shared.exposures)
            .by_client
            .get(&client)
            .map(|e| e.owner);
        if owner.as_ref().map(|s| s.id) != id {
            owner = id.and_then(|id| lock(&shared.sessions).get(&id).cloned());
        }
        match &owner {
            Some(session) => {
                session
                    .udp
                    .on_server_datagram(&service, &socket, &stop, from, &buf[..n])
            }
            None => {
                debug!(client = %client, %from, "client service datagram while the session ends: dropped")
            }
        }
    }
}

/// A server connected to a client service: the stream starts at once, the
/// server's bytes wait in the replay buffer until the client agent's leg
/// arrives (or the agent resets the stream).
fn open_stream(
    shared: &Arc<Shared>,
    session: &Arc<Session>,
    service: &str,
    conn: TcpStream,
    peer: SocketAddr,
) {
    let id = match lock(&session.table).open_gateway() {
        Ok(id) => id,
        Err(e) => {
            warn!(client = %session.client_id, service, %peer, "client service connection refused: {e}");
            baton_os::reset(conn);
            return;
        }
    };
    let _ = baton_os::tune_relay(&conn);
    let limits = StreamLimits {
        replay_buffer: shared.config.replay_buffer,
        size_send_buffers: shared.config.send_buffers,
        ..StreamLimits::default()
    };
    let (s, inbox) = StreamShared::new(id, limits, session.released.child_token());
    lock(&session.streams).insert(id, s.clone());
    lock(&session.incoming).insert(id, service.to_owned());
    // While the session is detached the announcement waits for the next
    // control connection (see `control`).
    send_control(
        session,
        Message::Incoming {
            stream: id,
            service: service.to_owned(),
        },
    );
    shared.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    debug!(client = %session.client_id, stream = %id, service, %peer, "client service stream open");
    // The stream is relayed on the session's thread, with its legs.
    let thread = session.thread;
    let session = session.clone();
    let moving = Moving::leave(conn);
    shared.tasks.spawn_on(
        async move {
            let end = match moving.and_then(Moving::arrive) {
                Ok(conn) => {
                    debug_assert_eq!(
                        crate::shards::current_index(super::SESSION_THREAD),
                        Some(thread)
                    );
                    stream::run(conn, s.clone(), inbox, limits, session.to_session.clone()).await
                }
                Err(e) => {
                    warn!(client = %session.client_id, stream = %id, "client service connection lost moving to its session thread: {e}");
                    send_control(
                        &session,
                        Message::StreamReset {
                            stream: id,
                            code: ResetCode::Peer,
                        },
                    );
                    StreamEnd::LocalReset(e)
                }
            };
            stream_ended(&session, &s, end);
        },
        shared.shards.handle(thread),
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn book(blocks: &[&str]) -> AddressBook {
        AddressBook::new(blocks.iter().map(|b| b.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_client_keeps_its_address() {
        let mut b = book(&["10.0.0.0/30", "10.0.1.7"]);
        assert_eq!(b.assign("a"), Some(ip("10.0.0.1")));
        assert_eq!(b.assign("b"), Some(ip("10.0.0.2")));
        assert_eq!(b.assign("a"), Some(ip("10.0.0.1")), "a second session of a");
        b.free("a");
        assert_eq!(b.assign("c"), Some(ip("10.0.1.7")), "fresh addresses first");
        assert_eq!(
            b.assign("a"),
            Some(ip("10.0.0.1")),
            "a comes back to its address"
        );
    }

    #[test]
    fn a_short_pool_takes_back_the_longest_unused_address() {
        let mut b = book(&["10.0.0.0/30"]);
        b.assign("a");
        b.assign("b");
        assert_eq!(b.assign("c"), None, "every address held");
        b.free("b");
        b.free("a");
        assert_eq!(b.assign("c"), Some(ip("10.0.0.2")), "b was away longest");
        assert_eq!(b.assign("b"), Some(ip("10.0.0.1")));
        assert_eq!(b.assign("a"), None);
    }

    #[test]
    fn workers_share_the_pool_without_overlap() {
        let mut w0 = book(&["10.0.0.0/29"]);
        let mut w1 = book(&["10.0.0.0/29"]);
        w0.share = (0, 2);
        w1.share = (1, 2);
        let a: Vec<_> = ["a", "b", "c", "d"].iter().map(|c| w0.assign(c)).collect();
        let b: Vec<_> = ["e", "f", "g", "h"].iter().map(|c| w1.assign(c)).collect();
        assert_eq!(
            a,
            vec![
                Some(ip("10.0.0.1")),
                Some(ip("10.0.0.3")),
                Some(ip("10.0.0.5")),
                None
            ]
        );
        assert_eq!(
            b,
            vec![
                Some(ip("10.0.0.2")),
                Some(ip("10.0.0.4")),
                Some(ip("10.0.0.6")),
                None
            ]
        );
    }

    #[test]
    fn overlapping_blocks_never_give_one_address_twice() {
        let mut b = book(&["10.0.0.1", "10.0.0.0/30"]);
        let got: Vec<_> = ["a", "b", "c"].iter().map(|c| b.assign(c)).collect();
        assert_eq!(got, vec![Some(ip("10.0.0.1")), Some(ip("10.0.0.2")), None]);
    }
}
