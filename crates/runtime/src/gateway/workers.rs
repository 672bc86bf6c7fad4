//! A gateway as several worker processes (`workers = N`).
//!
//! One process can hold at most `RLIMIT_NOFILE` descriptors, and every
//! session, leg and connection to a target is one. Beyond that the gateway
//! runs as N workers sharing its ports (`SO_REUSEPORT`); each client id
//! belongs to one worker (a hash of the id), every session id a worker hands
//! out is congruent to its index modulo N, and so every connection and
//! datagram names its owner: a control connection by the client id in its
//! Hello, a leg and a datagram by their session id. The kernel spreads them
//! by address instead; a worker that receives one it does not own passes it
//! on (`baton_os::handoff`): a connection after only peeking at its first
//! frame, so the owner reads it from the start as if it had accepted it.
//!
//! Everything about a client then lives in one worker: its sessions, its
//! client-service listeners (each worker hands out its own share of
//! `virtual_pool`), its UDP flows. `max_sessions` is shared out evenly,
//! with a margin (`share_of_sessions`).

use std::hash::Hasher as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use baton_os::{Handed, Handoff};
use baton_proto::wire::{FrameHeader, FRAME_HEADER_LEN, MAX_PAYLOAD, PREFACE_LEN};
use baton_proto::{ConnKind, Message, Preface};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::Shared;
use crate::util::lock;

/// Which worker of how many this gateway is, and the group its hand-off
/// sockets are named after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    /// This worker, from 0.
    pub index: usize,
    /// Workers in the gateway.
    pub count: usize,
    /// Unique on the host while the gateway runs (the supervisor's pid).
    pub group: String,
}

impl WorkerSpec {
    /// Parses `INDEX/COUNT/GROUP`, as the supervisor passes it to a worker.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.splitn(3, '/');
        let index = it.next()?.parse().ok()?;
        let count = it.next()?.parse().ok()?;
        let group = it.next()?.to_owned();
        (index < count && !group.is_empty() && !group.contains('/')).then_some(Self {
            index,
            count,
            group,
        })
    }
}

impl WorkerSpec {
    /// Whether the sessions of `client_id` live in this worker.
    pub fn owns_client(&self, client_id: &str) -> bool {
        owner_of_client(client_id, self.count) == self.index
    }
}

impl std::fmt::Display for WorkerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.index, self.count, self.group)
    }
}

/// The worker a client id belongs to. FNV-1a: stable across processes and
/// builds, unlike the standard library's randomly keyed hasher.
pub fn owner_of_client(client_id: &str, count: usize) -> usize {
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    h.write(client_id.as_bytes());
    (h.finish() % count as u64) as usize
}

/// Sessions one of `count` workers may hold when the gateway may hold
/// `max`: an even share, plus 15% and 16 more because clients hash unevenly
/// (10,000 clients over 12 workers: 834 each on average, one standard
/// deviation 28; the cap is 976). The gateway as a whole may then exceed
/// `max` a little, never a worker its share by much.
pub(super) fn share_of_sessions(max: usize, count: usize) -> usize {
    let even = max.div_ceil(count);
    even.saturating_add(even.saturating_mul(15).div_ceil(100))
        .saturating_add(16)
        .min(max)
}

/// The worker a session id belongs to.
pub(super) fn owner_of_session(session_id: u64, count: usize) -> usize {
    (session_id % count as u64) as usize
}

/// A random id made congruent to `index` modulo `count`; `None` when that
/// would overflow or be 0 (draw again).
pub(super) fn session_id_for(random: u64, index: usize, count: usize) -> Option<u64> {
    let count = count as u64;
    let id = (random - random % count).checked_add(index as u64)?;
    (id != 0).then_some(id)
}

struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// What the first bytes of a connection say about its owner.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route {
    /// Owned by this worker, or not a well-formed start: served here (and
    /// refused here if it is garbage).
    Here,
    /// Owned by worker N.
    To(usize),
    /// Closed or silent before its first frame was complete.
    Gone,
}

/// The owner named by a connection's first bytes, or `None` if more bytes
/// are needed.
pub(super) fn route_of(bytes: &[u8], me: usize, count: usize) -> Option<Route> {
    let preface = bytes.get(..PREFACE_LEN)?;
    let Ok(preface) = <[u8; PREFACE_LEN]>::try_from(preface) else {
        return Some(Route::Here);
    };
    let Ok(p) = Preface::decode(&preface) else {
        return Some(Route::Here);
    };
    if p.version != baton_proto::wire::VERSION {
        return Some(Route::Here);
    }
    let header = bytes.get(PREFACE_LEN..PREFACE_LEN + FRAME_HEADER_LEN)?;
    let Ok(header) = <[u8; FRAME_HEADER_LEN]>::try_from(header) else {
        return Some(Route::Here);
    };
    let Ok(h) = FrameHeader::decode(&header) else {
        return Some(Route::Here);
    };
    let start = PREFACE_LEN + FRAME_HEADER_LEN;
    let payload = bytes.get(start..start + h.len)?;
    let owner = match (p.kind, Message::decode(h.ty, payload)) {
        (ConnKind::Control, Ok(Message::Hello { client_id, .. })) => {
            owner_of_client(&client_id, count)
        }
        (ConnKind::Leg, Ok(Message::LegOpen { session_id, .. })) => {
            owner_of_session(session_id, count)
        }
        _ => return Some(Route::Here),
    };
    Some(if owner == me {
        Route::Here
    } else {
        Route::To(owner)
    })
}

/// Peeks at a new connection until its first frame is in, and passes it on
/// if another worker owns it. Returns the connection if it is served here.
pub(super) async fn route(
    shared: &Arc<Shared>,
    handoff: &Handoff,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<TcpStream> {
    let mut buf = vec![0u8; PREFACE_LEN + FRAME_HEADER_LEN + MAX_PAYLOAD];
    let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
    let mut pause = Duration::from_millis(1);
    let route = loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break Route::Gone,
            Ok(Ok(n)) => n,
        };
        if let Some(r) = route_of(&buf[..n], handoff.index(), handoff.count()) {
            break r;
        }
        // Part of the first frame is in: peeking again at once would find
        // the same bytes (the socket stays readable), so wait a little.
        if tokio::time::Instant::now() + pause > deadline {
            break Route::Gone;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    match route {
        Route::Here => Some(stream),
        Route::Gone => {
            debug!(%peer, "connection closed or silent before its first frame");
            None
        }
        Route::To(owner) => {
            match handoff.send_conn(owner, &stream).await {
                Ok(()) => {
                    shared.stats.handed_off.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => warn!(%peer, "cannot pass a connection to worker {owner}: {e}"),
            }
            None
        }
    }
}

/// Serves what the other workers pass to this one.
pub(super) async fn receive(shared: Arc<Shared>, handoff: Arc<Handoff>) {
    let mut buf = vec![0u8; baton_os::handoff::MAX_HANDOFF];
    loop {
        let handed = tokio::select! {
            r = handoff.recv(&mut buf) => r,
            _ = shared.shutdown.cancelled() => return,
        };
        match handed {
            Ok(Handed::Conn(conn)) => {
                let conn = conn
                    .set_nonblocking(true)
                    .and_then(|()| TcpStream::from_std(conn));
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("a connection passed on cannot be served: {e}");
                        continue;
                    }
                };
                let Ok(peer) = conn.peer_addr() else {
                    continue; // Already closed by its client.
                };
                shared.stats.taken_over.fetch_add(1, Ordering::Relaxed);
                super::spawn_serve(&shared, conn, peer);
            }
            Ok(Handed::Datagram { local, peer, data }) => {
                let socket = lock(&shared.udp_sockets).get(&local).cloned();
                match socket {
                    Some(s) => super::on_udp(&shared, &s, None, peer, &data).await,
                    None => debug!(%local, "datagram passed on for an address not served here"),
                }
            }
            Err(e) => {
                warn!("hand-off socket: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proto::wire::Preface;

    fn first_frame(kind: ConnKind, msg: &Message) -> Vec<u8> {
        let mut out = Preface::new(kind).encode().to_vec();
        msg.encode(&mut out);
        out
    }

    #[test]
    fn session_ids_name_their_worker() {
        for count in [1usize, 2, 3, 7, 12] {
            for index in 0..count {
                for r in [0u64, 1, 12345, u64::MAX, u64::MAX - 3] {
                    if let Some(id) = session_id_for(r, index, count) {
                        assert_ne!(id, 0);
                        assert_eq!(owner_of_session(id, count), index);
                    }
                }
            }
        }
        assert_eq!(session_id_for(0, 0, 4), None);
    }

    #[test]
    fn a_worker_holds_its_share_of_sessions_and_some_margin() {
        assert_eq!(share_of_sessions(10_000, 1), 10_000);
        assert_eq!(share_of_sessions(10_000, 12), 976);
        assert_eq!(share_of_sessions(10, 2), 10, "never more than the whole");
        // 10,000 clients over 12 workers: none is refused for its worker's share.
        let mut per = [0usize; 12];
        for i in 0..10_000 {
            per[owner_of_client(&format!("c{i:05}"), 12)] += 1;
        }
        assert!(
            per.iter().all(|&n| n <= share_of_sessions(10_000, 12)),
            "{per:?}"
        );
    }

    #[test]
    fn clients_spread_over_workers_and_stay_put() {
        let mut per = [0usize; 4];
        for i in 0..4000 {
            per[owner_of_client(&format!("c{i:05}"), 4)] += 1;
        }
        assert!(per.iter().all(|&n| (800..1200).contains(&n)), "{per:?}");
        assert_eq!(owner_of_client("m", 4), owner_of_client("m", 4));
    }

    #[test]
    fn the_first_frame_names_the_owner() {
        let hello = Message::Hello {
            client_id: "c00042".into(),
            ephemeral: [7; 32],
            resume: 0,
        };
        let bytes = first_frame(ConnKind::Control, &hello);
        let owner = owner_of_client("c00042", 3);
        let other = (owner + 1) % 3;
        assert_eq!(route_of(&bytes, owner, 3), Some(Route::Here));
        assert_eq!(route_of(&bytes, other, 3), Some(Route::To(owner)));
        // Not yet complete: more bytes needed.
        for cut in [0, 5, PREFACE_LEN, PREFACE_LEN + 2, bytes.len() - 1] {
            assert_eq!(route_of(&bytes[..cut], other, 3), None, "cut at {cut}");
        }
        // Garbage and other versions are served (and refused) where they land.
        assert_eq!(route_of(b"GET / HTTP/1.1\r\n", 1, 3), Some(Route::Here));
        let mut old = bytes.clone();
        old[5] = old[5].wrapping_add(1);
        assert_eq!(route_of(&old, other, 3), Some(Route::Here));
    }

    #[test]
    fn worker_specs_parse_and_print() {
        let w = WorkerSpec::parse("2/4/1234").expect("parse");
        assert_eq!((w.index, w.count, w.group.as_str()), (2, 4, "1234"));
        assert_eq!(w.to_string(), "2/4/1234");
        for bad in ["4/4/g", "1/2/", "x/2/g", "1/2", ""] {
            assert_eq!(WorkerSpec::parse(bad), None, "{bad}");
        }
    }
}
