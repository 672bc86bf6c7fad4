//! The gateway: accepts sessions from client agents and relays their
//! streams to the services' targets.
//!
//! A session outlives its control connection and its legs. When the client
//! agent's network changes it reconnects (resuming the session by id, after
//! proving its key again) and opens new legs that resume every stream at the
//! offsets each side reports. A session whose control connection has been
//! silent for the inactivity timeout is detached; one that stays detached
//! for the switch timeout is released with all its streams.
//!
//! Client services go the other way (a server here reaches a service on the
//! client's side): see the `expose` module for the addresses, listeners
//! and the streams the gateway opens itself.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use baton_proto::wire::{PREFACE_LEN, TAG_LEN};
use baton_proto::{
    Admission, ConnKind, ControlCipher, GatewayHandshake, LegKey, Message, Offset, Preface,
    RefuseReason, ResetCode, Role, StreamId, StreamTable,
};

mod expose;

use crate::config::GatewayConfig;
use crate::frame::{read_tagged, FrameCodec, RawFrame, CONTROL_READ_BUFFER};
use crate::shards::{current_index, Moving, Shards};
use crate::stream::{
    self, tombstone_messages, AckBatch, AckDue, InEvent, LegStart, OutEvent, StreamEnd,
    StreamLimits, StreamShared, ToSession, Tombstones,
};
use crate::util::{lock, sid};

/// The name of the gateway's session threads (`baton-session-N`).
const SESSION_THREAD: &str = "baton-session";

/// Counters a gateway keeps, for status and tests.
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Sessions accepted since start.
    pub sessions_accepted: AtomicU64,
    /// Sessions resumed on a new control connection since start.
    pub sessions_resumed: AtomicU64,
    /// Sessions refused (any reason) since start.
    pub sessions_refused: AtomicU64,
    /// Sessions released because their client was gone for too long.
    pub sessions_expired: AtomicU64,
    /// Streams opened since start.
    pub streams_opened: AtomicU64,
    /// Legs that resumed an existing stream.
    pub legs_resumed: AtomicU64,
    /// Legs refused (any reason) since start.
    pub legs_refused: AtomicU64,
    /// Connections closed for a protocol violation (garbage, forged tags).
    pub protocol_errors: AtomicU64,
    /// Sessions that moved to another address of the gateway.
    pub roams: AtomicU64,
    /// Go-to commands sent to client agents.
    pub gotos: AtomicU64,
    /// Addresses of the host seen going (removed, deprecated, interface
    /// down) while followed.
    pub address_losses: AtomicU64,
    /// UDP flows and datagrams.
    pub udp: Arc<crate::udp::UdpStats>,
    /// Connections passed on to the worker that owns them (`workers`).
    pub handed_off: AtomicU64,
    /// Connections other workers passed to this one.
    pub taken_over: AtomicU64,
    /// Datagrams passed on to the worker that owns their session.
    pub datagrams_passed: AtomicU64,
}

mod host;
mod multihome;
mod workers;

pub use host::{HostAddrState, HostAddrStatus};
pub use multihome::{GatewaySessionStatus, GoToReport};
pub use workers::{owner_of_client, WorkerSpec};

/// A running gateway.
#[derive(Debug, Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    local_addrs: Vec<SocketAddr>,
}

#[derive(Debug)]
struct Shared {
    config: GatewayConfig,
    rng: SystemRandom,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    /// Client services: assigned addresses and listeners per client id.
    exposures: Mutex<expose::Exposures>,
    stats: GatewayStats,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Addresses served now, and what stops serving each (multihome.rs).
    served: Mutex<Vec<(SocketAddr, CancellationToken)>>,
    /// The addresses advertised to client agents now.
    advertised: Mutex<Vec<SocketAddr>>,
    /// The host's addresses from the kernel's interface table (host.rs).
    host: Mutex<host::HostView>,
    /// The other workers of this gateway, when it has several (workers.rs).
    handoff: Option<Arc<baton_os::Handoff>>,
    /// Every UDP socket receiving probes and datagrams, by bound address:
    /// where a datagram another worker passed on is answered from.
    udp_sockets: Mutex<HashMap<SocketAddr, Arc<tokio::net::UdpSocket>>>,
    /// The session threads: every connection of a session is served on
    /// the one its client id hashes to (shards.rs).
    shards: Shards,
}

impl Shared {
    /// Whether the ports are shared with other workers (`SO_REUSEPORT`).
    fn shares_ports(&self) -> bool {
        self.handoff.is_some()
    }

    /// Listens on `addr`, sharing the port with the other workers if any.
    fn listen(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        listen(addr, self.shares_ports())
    }
}

#[derive(Debug)]
struct Session {
    id: u64,
    client_id: String,
    leg_key: LegKey,
    services: HashSet<String>,
    table: Mutex<StreamTable>,
    streams: Mutex<HashMap<StreamId, Arc<StreamShared>>>,
    /// Streams of client services waiting for the client's first leg, with
    /// their service: announced again on every reattach until it comes.
    incoming: Mutex<HashMap<StreamId, String>>,
    /// The control connection now attached, if any.
    control: Mutex<Option<Attached>>,
    /// Last frame from the client, or when the session was detached.
    last_heard: Mutex<Instant>,
    /// Wakes the session's task when its deadline may have come earlier (a
    /// detach: the switch timeout may be shorter than the inactivity one).
    deadline_moved: tokio::sync::Notify,
    /// Resets not yet known to be delivered: re-sent on every reattach.
    recent_resets: Mutex<VecDeque<(StreamId, ResetCode)>>,
    /// Recently finished streams, for a client that missed their end.
    finished: Mutex<Tombstones>,
    to_session: mpsc::UnboundedSender<ToSession>,
    /// Fires when the session is released: every stream resets and ends.
    released: CancellationToken,
    /// The session's UDP flows.
    udp: Arc<crate::udp::SessionUdp>,
    /// The session thread serving it (its client's).
    thread: usize,
}

#[derive(Debug)]
struct Attached {
    tx: mpsc::UnboundedSender<Message>,
    /// Fires to close this control connection (replaced or detached).
    close: CancellationToken,
    /// The gateway address the connection came to, and from where.
    local: SocketAddr,
    peer: SocketAddr,
}

/// Why a connection was closed early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Frame(#[from] crate::frame::FrameError),
    #[error("protocol: {0}")]
    Wire(#[from] baton_proto::WireError),
    #[error("handshake: {0}")]
    Crypto(#[from] baton_proto::CryptoError),
    #[error("timed out")]
    Timeout,
    #[error("connection closed")]
    Closed,
    #[error("unexpected message type {0:#04x}")]
    Unexpected(u8),
}

impl Gateway {
    /// Binds every listen address and starts serving. Stops when `shutdown`
    /// fires (then every session is released).
    pub async fn start(
        config: GatewayConfig,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        Self::start_worker(config, shutdown, None).await
    }

    /// Starts worker `worker.index` of a gateway made of `worker.count`
    /// processes (or tasks: tests run several in one process) sharing its
    /// ports; `None` is a gateway of one. Each worker holds its share of
    /// `max_sessions` and of `virtual_pool`.
    pub async fn start_worker(
        mut config: GatewayConfig,
        shutdown: CancellationToken,
        worker: Option<WorkerSpec>,
    ) -> std::io::Result<Self> {
        let handoff = match &worker {
            Some(w) if w.count > 1 => Some(Arc::new(baton_os::Handoff::bind(
                &w.group, w.index, w.count,
            )?)),
            _ => None,
        };
        if let Some(h) = &handoff {
            config.max_sessions = workers::share_of_sessions(config.max_sessions, h.count());
        }
        let mut listeners = Vec::new();
        for addr in &config.listen {
            let l = listen(*addr, handoff.is_some()).map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
            })?;
            listeners.push(l);
        }
        let local_addrs = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<Vec<_>, _>>()?;
        let threads = config.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let shards = Shards::start(threads, SESSION_THREAD)?;
        let share = handoff.as_ref().map_or((0, 1), |h| (h.index(), h.count()));
        let exposures = Mutex::new(expose::Exposures::new(config.virtual_pool.clone(), share));
        let shared = Arc::new(Shared {
            config,
            rng: SystemRandom::new(),
            sessions: Mutex::new(HashMap::new()),
            exposures,
            stats: GatewayStats::default(),
            shutdown,
            tasks: TaskTracker::new(),
            served: Mutex::new(Vec::new()),
            advertised: Mutex::new(Vec::new()),
            host: Mutex::new(host::HostView::default()),
            handoff: handoff.clone(),
            udp_sockets: Mutex::new(HashMap::new()),
            shards,
        });
        if let Some(h) = handoff {
            shared.tasks.spawn(workers::receive(shared.clone(), h));
        }
        for l in listeners {
            let shared2 = shared.clone();
            let stop = multihome::serving(&shared, l.local_addr()?);
            shared.tasks.spawn(accept_loop(shared2, l, stop));
        }
        for addr in &local_addrs {
            // Path probes come over UDP to the same address and port.
            let udp = bind_udp(*addr, addr.ip().is_unspecified(), shared.shares_ports()).map_err(
                |e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot listen for probes on udp {addr}: {e}"),
                    )
                },
            )?;
            crate::udp::tune(&udp);
            shared.tasks.spawn(answer_probes(
                shared.clone(),
                Arc::new(udp),
                multihome::serving(&shared, *addr),
            ));
        }
        host::start(&shared).await;
        multihome::advertise(&shared);
        let s2 = shared.clone();
        tokio::spawn(async move {
            s2.shutdown.cancelled().await;
            let all: Vec<_> = lock(&s2.sessions).values().cloned().collect();
            for s in all {
                release(&s2, &s, "gateway shutting down");
            }
        });
        info!(addrs = ?local_addrs, "gateway listening");
        if baton_os::fastopen::server_enabled() == Some(false) {
            info!(
                "TCP Fast Open is off for incoming connections (net.ipv4.tcp_fastopen \
                 lacks 2): a client's new legs take a round trip more after a network \
                 change; `sysctl net.ipv4.tcp_fastopen=3` turns it on"
            );
        }
        Ok(Self {
            shared,
            local_addrs,
        })
    }

    /// How many session threads serve the sessions (`threads`).
    pub fn session_threads(&self) -> usize {
        self.shared.shards.len()
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Sessions held now.
    pub fn session_count(&self) -> usize {
        lock(&self.shared.sessions).len()
    }

    /// Live streams over all sessions.
    pub fn stream_count(&self) -> usize {
        lock(&self.shared.sessions)
            .values()
            .map(|s| lock(&s.streams).len())
            .sum()
    }

    /// Client ids of the sessions held now.
    pub fn session_clients(&self) -> Vec<String> {
        lock(&self.shared.sessions)
            .values()
            .map(|s| s.client_id.clone())
            .collect()
    }

    /// The address assigned to a client agent whose client services are
    /// listening now.
    pub fn client_address(&self, client_id: &str) -> Option<std::net::IpAddr> {
        lock(&self.shared.exposures).address_of(client_id)
    }

    /// Every UDP flow of every session.
    pub fn udp_flows(&self) -> Vec<crate::udp::GatewayFlowStatus> {
        let sessions: Vec<_> = lock(&self.shared.sessions).values().cloned().collect();
        let mut out = Vec::new();
        for s in sessions {
            s.udp.status(&mut out);
        }
        out
    }

    /// The gateway's counters.
    pub fn stats(&self) -> &GatewayStats {
        &self.shared.stats
    }

    /// Waits until every task has ended after shutdown.
    pub async fn wait(&self) {
        self.shared.shutdown.cancelled().await;
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

/// A UDP socket for probes and datagrams. A wildcard one is bound with
/// `SO_REUSEADDR`, so that each address it stands for can get a socket of
/// its own beside it (host.rs), which answers from that address.
fn bind_udp(
    addr: SocketAddr,
    reuse: bool,
    share_port: bool,
) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse {
        s.set_reuse_address(true)?;
    }
    if share_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// Listens on `addr` (sharing the port with the other workers if
/// `share_port`), taking the first bytes of a new leg in its SYN (TCP Fast
/// Open) where the host allows it.
fn listen(addr: SocketAddr, share_port: bool) -> std::io::Result<TcpListener> {
    let l = baton_os::listen_shared(addr, share_port)?;
    if let Err(e) = baton_os::fastopen::accept_fast_open(&l, baton_os::LISTEN_BACKLOG) {
        warn!(%addr, "cannot enable TCP Fast Open: {e}");
    }
    Ok(l)
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        match &shared.handoff {
            // Peeking may wait for the client's first frame: not in this loop.
            Some(h) => {
                let (shared2, h) = (shared.clone(), h.clone());
                shared.tasks.spawn(async move {
                    if let Some(stream) = workers::route(&shared2, &h, stream, peer).await {
                        serve_logged(&shared2, stream, peer).await;
                    }
                });
            }
            None => spawn_serve(&shared, stream, peer),
        }
    }
}

/// Serves a new connection (control or leg) in a task of its own.
fn spawn_serve(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let shared2 = shared.clone();
    shared
        .tasks
        .spawn(async move { serve_logged(&shared2, stream, peer).await });
}

/// Serves a new connection, counting and logging how it ended early.
async fn serve_logged(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    log_end(shared, peer, serve_connection(shared, stream, peer).await);
}

/// Counts and logs how a connection ended early.
fn log_end(shared: &Shared, peer: SocketAddr, end: Result<(), ConnError>) {
    if let Err(e) = end {
        if matches!(
            e,
            ConnError::Wire(_) | ConnError::Frame(_) | ConnError::Unexpected(_)
        ) {
            shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
            warn!(%peer, "closing connection: {e}");
        } else {
            debug!(%peer, "connection ended: {e}");
        }
    }
}

/// Answers authenticated path probes with a reply of the same size, and
/// hands relayed datagrams of UDP services to their session; anything else
/// is dropped without an answer.
async fn answer_probes(
    shared: Arc<Shared>,
    udp: Arc<tokio::net::UdpSocket>,
    stop: CancellationToken,
) {
    let bound = udp.local_addr().ok();
    if let Some(a) = bound {
        lock(&shared.udp_sockets).insert(a, udp.clone());
    }
    let mut buf = vec![0u8; baton_proto::datagram::MAX_DATAGRAM + 1];
    loop {
        let (n, peer) = tokio::select! {
            r = udp.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
            _ = stop.cancelled() => break,
        };
        on_udp(&shared, &udp, bound, peer, &buf[..n]).await;
    }
    if let Some(a) = bound {
        let mut sockets = lock(&shared.udp_sockets);
        if sockets.get(&a).is_some_and(|s| Arc::ptr_eq(s, &udp)) {
            sockets.remove(&a);
        }
    }
}

/// One datagram that came to `udp` (bound to `bound`) from `peer`. `bound`
/// is `None` for a datagram another worker passed here: it is not passed
/// on again.
async fn on_udp(
    shared: &Arc<Shared>,
    udp: &Arc<tokio::net::UdpSocket>,
    bound: Option<SocketAddr>,
    peer: SocketAddr,
    data: &[u8],
) {
    use baton_proto::probe::Probe;
    let relayed = baton_proto::datagram::Header::peek_session(data);
    let Some(sid) = relayed.or_else(|| Probe::peek_session(data)) else {
        return;
    };
    if let (Some(h), Some(local)) = (&shared.handoff, bound) {
        let owner = workers::owner_of_session(sid, h.count());
        if owner != h.index() {
            if h.try_send_datagram(owner, local, peer, data).is_ok() {
                shared
                    .stats
                    .datagrams_passed
                    .fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    }
    // Bound first: the sessions lock must not be held while the datagram is handled.
    let session = lock(&shared.sessions).get(&sid).cloned();
    if relayed.is_some() {
        match session {
            Some(session) => session.udp.on_datagram(udp, peer, data),
            None => {
                shared.stats.udp.forged.fetch_add(1, Ordering::Relaxed);
            }
        }
        return;
    }
    let Some(session) = session else {
        return;
    };
    let Some(p) = Probe::open(data, &session.leg_key) else {
        return;
    };
    if p.reply {
        return;
    }
    let reply = Probe { reply: true, ..p }.seal(&session.leg_key);
    let _ = udp.send_to(&reply, peer).await;
}

async fn serve_connection(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Result<(), ConnError> {
    let timeout = shared.config.handshake_timeout;
    let mut preface = [0u8; PREFACE_LEN];
    tokio::time::timeout(timeout, stream.read_exact(&mut preface))
        .await
        .map_err(|_| ConnError::Timeout)??;
    let p = Preface::decode(&preface)?;
    if p.version != baton_proto::wire::VERSION {
        shared
            .stats
            .sessions_refused
            .fetch_add(1, Ordering::Relaxed);
        let detail = format!(
            "gateway speaks version {}, client {}",
            baton_proto::wire::VERSION,
            p.version
        );
        warn!(%peer, "refused: {detail}");
        let mut out = Vec::new();
        Message::Refused {
            reason: RefuseReason::Version,
            detail,
        }
        .encode(&mut out);
        stream.write_all(&out).await?;
        return Ok(());
    }
    match p.kind {
        ConnKind::Control => control(shared, stream, peer, preface).await,
        ConnKind::Leg => leg(shared, stream, peer).await,
    }
}

async fn refuse(
    stream: &mut TcpStream,
    shared: &Shared,
    reason: RefuseReason,
    detail: String,
) -> Result<(), ConnError> {
    shared
        .stats
        .sessions_refused
        .fetch_add(1, Ordering::Relaxed);
    let mut out = Vec::new();
    Message::Refused { reason, detail }.encode(&mut out);
    stream.write_all(&out).await?;
    stream.shutdown().await?;
    Ok(())
}

async fn next_frame(
    frames: &mut FramedRead<tokio::net::tcp::ReadHalf<'_>, FrameCodec>,
    timeout: Duration,
) -> Result<RawFrame, ConnError> {
    match tokio::time::timeout(timeout, frames.next()).await {
        Err(_) => Err(ConnError::Timeout),
        Ok(None) => Err(ConnError::Closed),
        Ok(Some(r)) => Ok(r?),
    }
}

fn capacity_detail(shared: &Shared) -> String {
    format!(
        "gateway holds its maximum of {} sessions",
        shared.config.max_sessions
    )
}

async fn control(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    preface: [u8; PREFACE_LEN],
) -> Result<(), ConnError> {
    let timeout = shared.config.handshake_timeout;
    let (hello, client_id, client_eph, resume) = {
        let (r, _) = stream.split();
        let mut frames = FramedRead::with_capacity(r, FrameCodec::default(), CONTROL_READ_BUFFER);
        let hello = next_frame(&mut frames, timeout).await?;
        if !frames.read_buffer().is_empty() {
            // The client must wait for the Challenge: anything more is a violation.
            return Err(ConnError::Unexpected(hello.ty()));
        }
        match hello.decode()? {
            Message::Hello {
                client_id,
                ephemeral,
                resume,
            } => (hello, client_id, ephemeral, resume),
            other => return Err(ConnError::Unexpected(other.ty())),
        }
    };
    let Some(entry) = shared.config.clients.get(&client_id).cloned() else {
        warn!(%peer, client = %client_id, "refused: unknown client");
        return refuse(
            &mut stream,
            shared,
            RefuseReason::UnknownClient,
            format!("no client {client_id:?}"),
        )
        .await;
    };
    // The rest (the handshake's crypto, then the session's life) runs on
    // the client's session thread, with its legs and streams. Nothing
    // follows the Hello until the Challenge: no byte is left behind.
    let thread = shared.shards.index_of(&client_id);
    let hello = Hello {
        frame: hello,
        client_id,
        client_eph,
        resume,
        entry,
    };
    hand_over(
        shared,
        thread,
        stream,
        peer,
        move |shared, stream| async move {
            control_on_thread(&shared, stream, peer, preface, hello, thread).await
        },
    )
}

/// Moves `conn` to session thread `thread`, where `serve` goes on with it
/// and how it ends is logged. Detached: the accepting task ends here, the
/// connection lives on its session's thread only.
fn hand_over<F, Fut>(
    shared: &Arc<Shared>,
    thread: usize,
    conn: TcpStream,
    peer: SocketAddr,
    serve: F,
) -> Result<(), ConnError>
where
    F: FnOnce(Arc<Shared>, TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), ConnError>> + Send + 'static,
{
    let moving = Moving::leave(conn)?;
    let shared2 = shared.clone();
    shared.tasks.spawn_on(
        async move {
            let end = match moving.arrive() {
                Ok(conn) => serve(shared2.clone(), conn).await,
                Err(e) => Err(e.into()),
            };
            log_end(&shared2, peer, end);
        },
        shared.shards.handle(thread),
    );
    Ok(())
}

/// A control connection's Hello, read on the accepting thread.
struct Hello {
    frame: RawFrame,
    client_id: String,
    client_eph: [u8; 32],
    resume: u64,
    entry: crate::config::ClientEntry,
}

/// [`control`] after the Hello, on the client's session thread `thread`.
async fn control_on_thread(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    preface: [u8; PREFACE_LEN],
    hello: Hello,
    thread: usize,
) -> Result<(), ConnError> {
    debug_assert_eq!(current_index(SESSION_THREAD), Some(thread));
    let timeout = shared.config.handshake_timeout;
    let Hello {
        frame: hello,
        client_id,
        client_eph,
        resume,
        entry,
    } = hello;
    // A resume names a session of this client; anything else gets a new id
    // (and the client learns its old session is gone).
    let existing = (resume != 0)
        .then(|| lock(&shared.sessions).get(&resume).cloned())
        .flatten()
        .filter(|s| s.client_id == client_id);
    if existing.is_none() && lock(&shared.sessions).len() >= shared.config.max_sessions {
        warn!(%peer, client = %client_id, "refused: capacity full");
        return refuse(
            &mut stream,
            shared,
            RefuseReason::CapacityFull,
            capacity_detail(shared),
        )
        .await;
    }
    let session_id = match &existing {
        Some(s) => s.id,
        None => new_session_id(shared)?,
    };
    // Keep-alives and acknowledgements are small and latency-bound.
    let _ = stream.set_nodelay(true);
    let (hs, challenge) =
        GatewayHandshake::on_hello(&preface, &hello.bytes, client_eph, session_id, &shared.rng)?;
    stream.write_all(&challenge).await?;

    let (r, mut w) = stream.split();
    let mut frames = FramedRead::with_capacity(r, FrameCodec::default(), CONTROL_READ_BUFFER);
    let auth = next_frame(&mut frames, timeout).await?;
    let keys = match hs.on_auth(&auth.bytes, &entry.key) {
        Ok(k) => k,
        Err(baton_proto::CryptoError::BadProof) => {
            warn!(%peer, client = %client_id, "refused: bad proof of key");
            drop(frames);
            let detail = "signature does not match the configured key".to_owned();
            return refuse(&mut stream, shared, RefuseReason::BadProof, detail).await;
        }
        Err(e) => return Err(e.into()),
    };
    let mut cipher = ControlCipher::new(&keys, Role::Gateway);
    let session = match existing {
        Some(s) => {
            shared
                .stats
                .sessions_resumed
                .fetch_add(1, Ordering::Relaxed);
            info!(%peer, client = %client_id, session = %sid(session_id), "session resumed");
            s
        }
        None => {
            let (to_session, from_streams) = mpsc::unbounded_channel();
            let session = Arc::new(Session {
                id: session_id,
                client_id: client_id.clone(),
                leg_key: keys.leg_key(),
                services: entry.services.iter().cloned().collect(),
                table: Mutex::new(StreamTable::new(shared.config.max_streams_per_session)),
                streams: Mutex::new(HashMap::new()),
                incoming: Mutex::new(HashMap::new()),
                control: Mutex::new(None),
                last_heard: Mutex::new(Instant::now()),
                deadline_moved: tokio::sync::Notify::new(),
                recent_resets: Mutex::new(VecDeque::new()),
                finished: Mutex::new(Tombstones::default()),
                to_session,
                released: shared.shutdown.child_token(),
                thread,
                udp: crate::udp::SessionUdp::new(
                    &shared.config,
                    &client_id,
                    &entry.services,
                    session_id,
                    keys.leg_key(),
                    shared.stats.udp.clone(),
                    shared.tasks.clone(),
                ),
            });
            let admitted = {
                let mut sessions = lock(&shared.sessions);
                let room = sessions.len() < shared.config.max_sessions;
                if room {
                    sessions.insert(session_id, session.clone());
                }
                room
            };
            if !admitted {
                drop(frames);
                return refuse(
                    &mut stream,
                    shared,
                    RefuseReason::CapacityFull,
                    capacity_detail(shared),
                )
                .await;
            }
            shared
                .stats
                .sessions_accepted
                .fetch_add(1, Ordering::Relaxed);
            info!(%peer, client = %client_id, session = %sid(session_id), "session up");
            shared
                .tasks
                .spawn(session_task(shared.clone(), session.clone(), from_streams));
            session.udp.start(session.released.clone());
            session
        }
    };
    let mut out = Vec::new();
    let inactivity_ms =
        u32::try_from(shared.config.inactivity_timeout.as_millis()).unwrap_or(u32::MAX);
    cipher.seal(
        &Message::Accepted {
            session_id,
            keepalive_ms: inactivity_ms / 3,
            inactivity_ms,
        },
        &mut out,
    );

    // Attach: this connection replaces any earlier one of the session.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let close = session.released.child_token();
    let local = w.local_addr()?;
    if let Some(old) = lock(&session.control).replace(Attached {
        tx: tx.clone(),
        close: close.clone(),
        local,
        peer,
    }) {
        old.close.cancel();
    }
    // The gateway's addresses, for the client to roam to (seed 003, Figure 9).
    let _ = tx.send(Message::Addresses {
        list: lock(&shared.advertised).clone(),
    });
    session.udp.attach(tx.clone());
    *lock(&session.last_heard) = Instant::now();
    // What the client may have missed while detached: half-closes, resets, acks.
    for s in lock(&session.streams).values() {
        if let Some(offset) = *lock(&s.fin_at) {
            cipher.seal(
                &Message::StreamFin {
                    stream: s.id,
                    offset,
                },
                &mut out,
            );
        }
        s.acked_to_peer.store(0, Ordering::Relaxed);
        let _ = session.to_session.send(ToSession::Ack {
            stream: s.id,
            due: AckDue::Soon,
        });
    }
    for (stream, code) in lock(&session.recent_resets).iter() {
        cipher.seal(
            &Message::StreamReset {
                stream: *stream,
                code: *code,
            },
            &mut out,
        );
    }
    // Connections to client services the client has not dialed a leg for
    // (it may never have heard of them while detached).
    for (stream, service) in lock(&session.incoming).iter() {
        cipher.seal(
            &Message::Incoming {
                stream: *stream,
                service: service.clone(),
            },
            &mut out,
        );
    }
    for m in lock(&session.finished).messages() {
        cipher.seal(&m, &mut out);
    }
    w.write_all(&out).await?;
    frames.decoder_mut().keyed = true;

    let result = loop {
        out.clear();
        tokio::select! {
            f = frames.next() => {
                let frame = match f {
                    None => break Err(ConnError::Closed),
                    Some(Err(e)) => break Err(e.into()),
                    Some(Ok(f)) => f,
                };
                let msg = match frame.open(&mut cipher) {
                    Ok(m) => m,
                    Err(e) => break Err(e.into()),
                };
                *lock(&session.last_heard) = Instant::now();
                if let Message::Expose { services } = msg {
                    let reply = expose::on_expose(shared, &session, services).await;
                    cipher.seal(&reply, &mut out);
                    if let Err(e) = w.write_all(&out).await {
                        break Err(e.into());
                    }
                    continue;
                }
                match on_control(shared, &session, msg, &mut cipher, &mut out) {
                    Ok(true) => {
                        let _ = w.write_all(&out).await;
                        break Ok(());
                    }
                    Ok(false) => {}
                    Err(e) => break Err(e),
                }
            }
            Some(msg) = rx.recv() => cipher.seal(&msg, &mut out),
            _ = close.cancelled() => break Ok(()),
        }
        if !out.is_empty() {
            if let Err(e) = w.write_all(&out).await {
                break Err(e.into());
            }
        }
    };
    // Detach, unless a newer connection already took over.
    let mut control = lock(&session.control);
    if control.as_ref().is_some_and(|a| a.tx.same_channel(&tx)) {
        *control = None;
        *lock(&session.last_heard) = Instant::now();
        session.deadline_moved.notify_one();
        debug!(session = %sid(session.id), "control connection detached");
    }
    result
}

/// Handles one authenticated control message; true when the session ended.
fn on_control(
    shared: &Shared,
    session: &Arc<Session>,
    msg: Message,
    cipher: &mut ControlCipher,
    out: &mut Vec<u8>,
) -> Result<bool, ConnError> {
    match msg {
        Message::Ping { seq } => cipher.seal(&Message::Pong { seq }, out),
        Message::Pong { .. } => {}
        Message::Acks { entries } => {
            let streams = lock(&session.streams);
            for (id, offset) in entries {
                if let Some(s) = streams.get(&id) {
                    let _ = s.out_tx.send(OutEvent::Ack(offset));
                }
            }
        }
        Message::StreamFin { stream, offset } => {
            if let Some(s) = lock(&session.streams).get(&stream) {
                let _ = s.in_tx.send(InEvent::Fin(offset));
            }
        }
        Message::StreamReset { stream, code } => {
            if code == ResetCode::Refused {
                info!(client = %session.client_id, %stream, "client service connection refused by the client agent (its target is unreachable)");
            } else {
                debug!(session = %sid(session.id), %stream, ?code, "stream reset by client");
            }
            if let Some(s) = lock(&session.streams).get(&stream) {
                s.abort.cancel();
            }
        }
        Message::Roam { from, to } => multihome::on_roam(shared, session, from, to),
        m @ (Message::FlowOpen { .. } | Message::FlowReply { .. } | Message::FlowClose { .. }) => {
            session.udp.on_control(m)
        }
        Message::Disconnect => {
            info!(client = %session.client_id, session = %sid(session.id), "session disconnected");
            release(shared, session, "client disconnected");
            cipher.seal(&Message::DisconnectAck, out);
            return Ok(true);
        }
        other => return Err(ConnError::Unexpected(other.ty())),
    }
    Ok(false)
}

fn new_session_id(shared: &Shared) -> Result<u64, ConnError> {
    loop {
        let mut b = [0u8; 8];
        shared
            .rng
            .fill(&mut b)
            .map_err(|_| baton_proto::CryptoError::Random)?;
        let mut id = u64::from_be_bytes(b);
        if let Some(h) = &shared.handoff {
            // The id names its worker: legs and datagrams find their way.
            id = workers::session_id_for(id, h.index(), h.count()).unwrap_or(0);
        }
        if id != 0 && !lock(&shared.sessions).contains_key(&id) {
            return Ok(id);
        }
    }
}

/// Sends to the attached control connection, if any.
fn send_control(session: &Session, msg: Message) -> bool {
    lock(&session.control)
        .as_ref()
        .is_some_and(|a| a.tx.send(msg).is_ok())
}

/// The session's own task: relays what its streams ask (acks, half-closes,
/// resets, broken legs) to the control connection, and decides when a
/// silent or detached session is released.
async fn session_task(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut from_streams: mpsc::UnboundedReceiver<ToSession>,
) {
    let mut acks = AckBatch::default();
    // The task sleeps until the session's next deadline rather than polling:
    // thousands of idle sessions then cost no wake-ups. The deadline only
    // moves later as frames come, so waking early just sleeps again.
    let expiry = tokio::time::sleep_until(next_deadline(&shared, &session));
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            m = from_streams.recv() => match m {
                None => return,
                Some(ToSession::Ack { stream, due }) => acks.request(stream, due),
                Some(ToSession::Control(msg)) => {
                    if let Message::StreamReset { stream, code } = msg {
                        let mut r = lock(&session.recent_resets);
                        r.push_back((stream, code));
                        while r.len() > RECENT_RESETS {
                            r.pop_front();
                        }
                    }
                    send_control(&session, msg);
                }
                Some(ToSession::LegLost(stream)) => {
                    debug!(session = %sid(session.id), %stream, "leg lost; asking the client for a new one");
                    send_control(&session, Message::Releg { stream });
                }
            },
            _ = acks.due() => {
                let connected = lock(&session.control).is_some();
                let frames = {
                    let streams = lock(&session.streams);
                    acks.take(connected, |id| streams.get(&id).and_then(|s| s.take_ack()))
                };
                for f in frames {
                    send_control(&session, f);
                }
            }
            _ = &mut expiry => {
                if expire_check(&shared, &session) {
                    return;
                }
                expiry.as_mut().reset(next_deadline(&shared, &session));
            }
            _ = session.deadline_moved.notified() => expiry.as_mut().reset(next_deadline(&shared, &session)),
            _ = session.released.cancelled() => return,
        }
    }
}

/// Resets remembered for re-sending after a reattach.
const RECENT_RESETS: usize = 1024;

/// When [`expire_check`] has something to do at the earliest: the
/// inactivity timeout after the last frame while attached, the switch
/// timeout after the detach while not.
fn next_deadline(shared: &Shared, session: &Session) -> Instant {
    let last = *lock(&session.last_heard);
    let timeout = if lock(&session.control).is_some() {
        shared.config.inactivity_timeout
    } else {
        shared.config.switch_timeout
    };
    // A timeout too long to add is as good as none.
    last.checked_add(timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86_400))
}

/// Detaches a silent control connection and releases a session detached for
/// longer than the switch timeout. True when released.
fn expire_check(shared: &Shared, session: &Session) -> bool {
    let silent = lock(&session.last_heard).elapsed();
    let mut control = lock(&session.control);
    match &*control {
        Some(a) if silent >= shared.config.inactivity_timeout => {
            info!(client = %session.client_id, session = %sid(session.id), "control connection silent for the inactivity timeout; detached");
            a.close.cancel();
            *control = None;
            *lock(&session.last_heard) = Instant::now();
            false
        }
        None if silent >= shared.config.switch_timeout => {
            drop(control);
            shared
                .stats
                .sessions_expired
                .fetch_add(1, Ordering::Relaxed);
            info!(client = %session.client_id, session = %sid(session.id), "session released: client gone longer than the switch timeout");
            release(shared, session, "switch timeout");
            true
        }
        _ => false,
    }
}

fn release(shared: &Shared, session: &Session, why: &str) {
    if lock(&shared.sessions).remove(&session.id).is_some() {
        debug!(session = %sid(session.id), "releasing session: {why}");
    }
    expose::on_release(shared, session);
    session.released.cancel();
}

/// A stream's relay ended: remember a finished one for a client that missed
/// its end, and forget it.
fn stream_ended(session: &Session, s: &StreamShared, end: StreamEnd) {
    let stream_id = s.id;
    if matches!(end, StreamEnd::Finished) {
        lock(&session.finished).push(s.tombstone());
    }
    lock(&session.streams).remove(&stream_id);
    lock(&session.incoming).remove(&stream_id);
    lock(&session.table).close(stream_id);
    let (up, down) = (
        s.delivered.load(Ordering::Relaxed),
        s.taken.load(Ordering::Relaxed),
    );
    if s.compression != baton_proto::Compression::None {
        info!(stream = %stream_id, ratio = format!("{:.2}", s.compression_ratio()), wire = s.wire_bytes(), "compressed stream ended");
    }
    match end {
        StreamEnd::Finished => debug!(stream = %stream_id, up, down, "stream finished"),
        other => info!(stream = %stream_id, up, down, "stream closed: {other}"),
    }
}

async fn leg(shared: &Arc<Shared>, mut leg: TcpStream, peer: SocketAddr) -> Result<(), ConnError> {
    let frame = tokio::time::timeout(shared.config.handshake_timeout, read_tagged(&mut leg))
        .await
        .map_err(|_| ConnError::Timeout)??;
    let (session_id, stream_id, generation, received, service, handover, compression) =
        match frame.decode()? {
            Message::LegOpen {
                session_id,
                stream,
                generation,
                received,
                service,
                handover,
                compression,
            } => (
                session_id,
                stream,
                generation,
                received,
                service,
                handover,
                compression,
            ),
            other => return Err(ConnError::Unexpected(other.ty())),
        };
    let Some(session) = lock(&shared.sessions).get(&session_id).cloned() else {
        // Without the session's keys no reply can be authenticated: just close.
        shared.stats.legs_refused.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, session = %sid(session_id), "leg for unknown session");
        return Ok(());
    };
    // The rest runs on the session's thread, where its streams live.
    let thread = session.thread;
    let open = LegOpen {
        frame,
        peer,
        session,
        stream_id,
        generation,
        received,
        service,
        handover,
        compression,
    };
    hand_over(shared, thread, leg, peer, move |shared, leg| async move {
        leg_on_thread(&shared, leg, open).await
    })
}

/// A leg's preamble, read on the accepting thread.
struct LegOpen {
    frame: RawFrame,
    peer: SocketAddr,
    session: Arc<Session>,
    stream_id: StreamId,
    generation: u32,
    received: Offset,
    service: String,
    handover: bool,
    compression: baton_proto::Compression,
}

/// [`leg`] after the preamble, on the session's thread.
async fn leg_on_thread(
    shared: &Arc<Shared>,
    mut leg: TcpStream,
    open: LegOpen,
) -> Result<(), ConnError> {
    let LegOpen {
        frame,
        peer,
        session,
        stream_id,
        generation,
        received,
        service,
        handover,
        compression,
    } = open;
    debug_assert_eq!(current_index(SESSION_THREAD), Some(session.thread));
    let tag: [u8; TAG_LEN] = frame.tag.expect("read_tagged always reads a tag");
    if !session.leg_key.verify_open(&frame.bytes, &tag) {
        shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, session = %sid(session.id), "leg preamble failed authentication");
        return Ok(());
    }
    let reply = |result: Result<Offset, RefuseReason>, detail: String| {
        let mut out = Vec::new();
        session
            .leg_key
            .seal_reply(&Message::LegReply { result, detail }, &tag, &mut out);
        out
    };
    let refused = |reason: RefuseReason, detail: String| {
        shared.stats.legs_refused.fetch_add(1, Ordering::Relaxed);
        warn!(client = %session.client_id, stream = %stream_id, service = %service, "leg refused: {reason}: {detail}");
        reply(Err(reason), detail)
    };
    let tomb = lock(&session.finished).find(stream_id);
    if let Some(t) = tomb {
        // The stream finished here; the client missed its end. Tell it
        // everything arrived, and how this side ended.
        leg.write_all(&reply(Ok(t.delivered), String::new()))
            .await?;
        for m in tombstone_messages(&t) {
            send_control(&session, m);
        }
        return Ok(());
    }
    let admitted = lock(&session.table).admit(stream_id, generation);
    let admission = match admitted {
        Ok(a) => a,
        Err(e) => {
            leg.write_all(&refused(RefuseReason::BadStream, e.to_string()))
                .await?;
            return Ok(());
        }
    };
    let _ = baton_os::tune_relay(&leg);
    if admission == Admission::Resume {
        // A new leg for a live stream: resume both directions. (The first
        // leg of a client service's stream too: the server's bytes wait in
        // the replay buffer from offset 0.)
        let Some(s) = lock(&session.streams).get(&stream_id).cloned() else {
            leg.write_all(&refused(
                RefuseReason::BadStream,
                "stream already ended".into(),
            ))
            .await?;
            return Ok(());
        };
        let have = Offset(s.delivered.load(Ordering::Acquire));
        leg.write_all(&reply(Ok(have), String::new())).await?;
        s.generation.store(generation, Ordering::Relaxed);
        let start = if handover {
            LegStart::Continue
        } else {
            LegStart::Rewind
        };
        s.attach_leg(leg, received, start, session.released.child_token());
        if lock(&session.incoming).remove(&stream_id).is_none() {
            shared.stats.legs_resumed.fetch_add(1, Ordering::Relaxed);
        }
        debug!(client = %session.client_id, stream = %stream_id, generation, resume_in = have.0, resume_out = received.0, "leg resumed");
        return Ok(());
    }
    let tcp = shared
        .config
        .services
        .get(&service)
        .is_some_and(|s| s.protocol == crate::config::Protocol::Tcp);
    if !session.services.contains(&service) || !tcp {
        lock(&session.table).close(stream_id);
        leg.write_all(&refused(
            RefuseReason::ServiceNotAllowed,
            format!("service {service:?} is not allowed"),
        ))
        .await?;
        return Ok(());
    }
    // The stream is registered before the target is reached, so that what
    // the client sends about it meanwhile (a half-close) is not lost.
    // The client chooses the stream's compression when it opens; resumed
    // legs keep it.
    let limits = StreamLimits {
        replay_buffer: shared.config.replay_buffer,
        compression,
        size_send_buffers: shared.config.send_buffers,
    };
    let (s, inbox) = StreamShared::new(stream_id, limits, session.released.child_token());
    lock(&session.streams).insert(stream_id, s.clone());
    let target = &shared.config.services[&service].target;
    let connect = tokio::time::timeout(
        shared.config.connect_timeout,
        TcpStream::connect((target.host.as_str(), target.port)),
    );
    let upstream = tokio::select! {
        r = connect => match r {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(format!("{target}: {e}")),
            Err(_) => Err(format!("{target}: no answer within {:?}", shared.config.connect_timeout)),
        },
        _ = session.released.cancelled() => Err("session released".to_owned()),
    };
    let upstream = match upstream {
        Ok(s) => s,
        Err(detail) => {
            lock(&session.streams).remove(&stream_id);
            lock(&session.table).close(stream_id);
            leg.write_all(&refused(RefuseReason::TargetUnreachable, detail))
                .await?;
            return Ok(());
        }
    };
    let _ = baton_os::tune_relay(&upstream);
    leg.write_all(&reply(Ok(Offset(0)), String::new())).await?;
    shared.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    debug!(client = %session.client_id, stream = %stream_id, service = %service, "stream open");

    s.attach_leg(
        leg,
        received,
        LegStart::Rewind,
        session.released.child_token(),
    );
    let end = stream::run(
        upstream,
        s.clone(),
        inbox,
        limits,
        session.to_session.clone(),
    )
    .await;
    stream_ended(&session, &s, end);
    Ok(())
}
