//! The client agent: keeps a session with each configured gateway, listens
//! for applications on each service's address, and relays every accepted
//! connection as a stream over legs to the service's gateway.
//!
//! The session, its streams and the applications' connections survive the
//! network under them. A **planned switch** (`baton switch IFACE`) opens the
//! control connection and new legs on the new interface while the old ones
//! still carry data; each stream moves over at an exact offset. An
//! **unexpected switch** (the path failed) reconnects over another
//! interface, resumes the session and opens new legs that resume each
//! direction where the other side says it stopped. With no interface at all
//! everything is held (bounded by the replay buffers) until one comes back,
//! for at most the switch timeout.
//!
//! The agent also serves client services (server → client) that it exposes
//! through a gateway: see the `expose` module.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use ring::rand::SystemRandom;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use baton_proto::wire::{ConnKind, Preface, TAG_LEN};
use baton_proto::{
    ClientHandshake, ClientKey, ControlCipher, LegKey, Liveness, LivenessAction, Message, Offset,
    RefuseReason, Role, StreamId,
};

mod expose;

pub use expose::{ExposedState, ExposedStatus};

use crate::config::ClientConfig;
use crate::frame::{read_tagged, FrameCodec};
use crate::path::{connect_via, Path, Paths};
use crate::shards::{Moving, Shards};
use crate::stream::{
    self, AckBatch, AckDue, InEvent, LegStart, OutEvent, StreamEnd, StreamInbox, StreamLimits,
    StreamShared, ToSession, Tombstones,
};
use crate::util::{lock, sid};

/// The name of the agent's session threads (`baton-link-N`, one per
/// gateway up to `threads`).
const SESSION_THREAD: &str = "baton-link";

mod book;
mod roam;

pub use book::AddressStatus;
use roam::AddrChoice;
pub use roam::AddressBookStatus;

/// Why a session with a gateway could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The gateway answered REFUSED.
    #[error("refused by gateway: {reason} ({detail})")]
    Refused {
        /// The gateway's reason.
        reason: RefuseReason,
        /// The gateway's explanation.
        detail: String,
    },
    /// No address of the gateway could be reached, or the connection failed
    /// during the handshake.
    #[error("cannot reach gateway: {0}")]
    Unreachable(String),
    /// The gateway broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl SessionError {
    /// Refusals that retrying cannot fix: the configuration must change.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Refused {
                reason: RefuseReason::UnknownClient
                    | RefuseReason::BadProof
                    | RefuseReason::Version,
                ..
            }
        )
    }
}

/// The state of the session with one gateway.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// Connecting for the first time.
    Connecting,
    /// The session is up on a path.
    Up(SessionInfo),
    /// The path failed; reconnecting (streams held) since the given time.
    Switching(SessionInfo),
    /// The last attempt failed; retrying after a pause.
    Failed(SessionError),
}

/// A session as seen from outside.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    /// The gateway's id for the session.
    pub id: u64,
    /// The gateway's name in the configuration.
    pub gateway: String,
    /// The gateway address in use.
    pub gateway_addr: SocketAddr,
    /// The interface (path) in use.
    pub path: String,
}

/// Kind of a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchKind {
    /// Asked for while the old path still worked (make-before-break).
    Planned,
    /// The old path failed.
    Unexpected,
}

/// One switch, as recorded for `baton status`.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchRecord {
    /// Planned or unexpected.
    pub kind: SwitchKind,
    /// The gateway whose session moved.
    pub gateway: String,
    /// Interface before.
    pub from: String,
    /// Interface after.
    pub to: String,
    /// Gateway address before (`ip:port`).
    pub gateway_addr_from: String,
    /// Gateway address after: different from before when the session
    /// roamed to another address of the gateway.
    pub gateway_addr_to: String,
    /// When the switch started (Unix time, milliseconds).
    pub at_unix_ms: u64,
    /// From the start (or from the failure) to every stream resumed, in ms.
    pub duration_ms: u64,
    /// Longest pause in delivery any stream saw around the switch, in ms.
    pub longest_stall_ms: u64,
    /// Bytes sent a second time because the old path lost them.
    pub bytes_resent: u64,
    /// Streams moved.
    pub streams: usize,
    /// Why.
    pub reason: String,
}

/// One stream as seen from outside.
#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    /// The gateway's name.
    pub gateway: String,
    /// Stream id within the session.
    pub id: u64,
    /// Service name.
    pub service: String,
    /// Opened from the gateway's side: a connection to a client service
    /// (its id has [`StreamId::GATEWAY`] set).
    pub incoming: bool,
    /// Bytes taken from the application.
    pub sent: u64,
    /// Of those, bytes the gateway confirmed (the rest is held for replay).
    pub confirmed: u64,
    /// Bytes delivered to the application.
    pub received: u64,
    /// Bytes sent twice because a path lost them.
    pub resent: u64,
    /// Bytes put on legs without a copy in user space (spliced from the
    /// kernel pipes a busy stream keeps them in).
    pub sent_spliced: u64,
    /// Bytes delivered to the application without a copy in user space
    /// (spliced from the leg through a pipe while the stream is busy).
    pub received_spliced: u64,
    /// The send buffer baton set on the stream's current leg, sized to its
    /// path (`send_buffers`); `None` while the kernel sizes it.
    pub leg_send_buffer: Option<usize>,
    /// The same for the connection to the application.
    pub app_send_buffer: Option<usize>,
    /// Legs used so far.
    pub legs: u32,
    /// `zstd` or `none`.
    pub compress: &'static str,
    /// Bytes the stream took on its legs, both directions (compressed if it is).
    pub wire_bytes: u64,
    /// The application's bytes carried for each byte on the legs (1 when
    /// not compressed; higher is better).
    pub compression_ratio: f64,
    /// Memory held now for the stream's read and replay buffers (none once
    /// it has been idle for a few seconds with everything confirmed).
    pub buffer_bytes: usize,
}

/// A running client agent.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
    service_addrs: HashMap<String, SocketAddr>,
}

#[derive(Debug)]
struct Shared {
    config: ClientConfig,
    key: ClientKey,
    rng: SystemRandom,
    links: HashMap<String, Arc<Link>>,
    paths: Arc<Paths>,
    switches: Mutex<Vec<SwitchRecord>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    limits: StreamLimits,
    events: Arc<crate::decide::Events>,
    decider: mpsc::UnboundedSender<crate::decide::Command>,
    /// Where each link's streams run (shards.rs): the tasks of one session
    /// wake each other on one thread, while legs are opened on any.
    session_threads: Shards,
}

impl Shared {
    /// The session thread of `link`.
    fn thread_of(&self, link: &Link) -> &tokio::runtime::Handle {
        self.session_threads.handle(link.thread)
    }
}

/// The session with one gateway.
#[derive(Debug)]
struct Link {
    gateway: String,
    state: watch::Sender<LinkState>,
    core: Mutex<Option<Arc<Core>>>,
    switch_tx: mpsc::UnboundedSender<SwitchRequest>,
    switch_rx: Mutex<Option<mpsc::UnboundedReceiver<SwitchRequest>>>,
    /// The gateway's addresses: static, resolved and advertised.
    book: Mutex<book::Book>,
    /// A move to another gateway address, to announce on the next control
    /// connection (`Roam`).
    pending_roam: Mutex<Option<(SocketAddr, SocketAddr)>>,
    /// Client services through this gateway and what it said of them.
    exposed: Mutex<Vec<ExposedStatus>>,
    /// The UDP services relayed by this gateway, and their flows.
    udp: Arc<crate::udp::ClientUdp>,
    /// The session thread its streams and session task run on.
    thread: usize,
}

#[derive(Debug)]
struct SwitchRequest {
    to: String,
    /// Which gateway address to move to.
    addr: AddrChoice,
    /// Why (recorded with the switch).
    reason: String,
    /// `None`: the session already was on `to`.
    done: oneshot::Sender<Result<Option<SwitchRecord>, String>>,
}

/// A session that exists at the gateway (it may be between control connections).
#[derive(Debug)]
struct Core {
    id: u64,
    leg_key: LegKey,
    /// Where new legs go and what they are bound to; changes on a switch.
    route: Mutex<Route>,
    streams: Mutex<HashMap<StreamId, Arc<ClientStream>>>,
    next_stream: AtomicU64,
    control: Mutex<Option<mpsc::UnboundedSender<Message>>>,
    /// Recently finished streams, for a gateway that missed their end.
    finished: Mutex<Tombstones>,
    /// When the gateway was last heard on the control connection.
    last_heard: Mutex<std::time::Instant>,
    /// Set while the control connection is up; cleared during an outage.
    up: watch::Sender<bool>,
    to_session: mpsc::UnboundedSender<ToSession>,
    released: CancellationToken,
    /// The link's UDP flows, which move with this session.
    udp: Arc<crate::udp::ClientUdp>,
    /// The session thread its streams run on.
    thread: tokio::runtime::Handle,
}

#[derive(Debug, Clone)]
struct Route {
    path: Path,
    gateway_addr: SocketAddr,
    cut: CancellationToken,
}

#[derive(Debug)]
struct ClientStream {
    shared: Arc<StreamShared>,
    service: String,
    /// A new leg is being opened: further "leg lost" reports are covered by it.
    releg_busy: AtomicBool,
    generation: AtomicU32,
    /// When the current leg was opened.
    leg_opened: Mutex<Option<std::time::Instant>>,
}

impl Client {
    /// Binds every service listener and starts the sessions. Stops when
    /// `shutdown` fires, sending DISCONNECT to every gateway first.
    pub async fn start(
        config: ClientConfig,
        key: ClientKey,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let mut listeners = Vec::new();
        for (name, svc) in &config.services {
            if svc.protocol == crate::config::Protocol::Udp {
                continue;
            }
            let l = baton_os::listen(svc.listen).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("service {name}: cannot listen on {}: {e}", svc.listen),
                )
            })?;
            listeners.push((name.clone(), l));
        }
        let tasks = TaskTracker::new();
        let mut udp = HashMap::new();
        for name in config.gateways.keys() {
            udp.insert(
                name.clone(),
                crate::udp::ClientUdp::bind(name, &config, tasks.clone(), shutdown.clone()).await?,
            );
        }
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let session_threads = Shards::start(
            config
                .gateways
                .len()
                .min(config.threads.unwrap_or(cores))
                .max(1),
            SESSION_THREAD,
        )?;
        let links = config
            .gateways
            .iter()
            .enumerate()
            .map(|(i, (name, g))| {
                let (switch_tx, switch_rx) = mpsc::unbounded_channel();
                let link = Link {
                    gateway: name.clone(),
                    state: watch::channel(LinkState::Connecting).0,
                    core: Mutex::new(None),
                    switch_tx,
                    switch_rx: Mutex::new(Some(switch_rx)),
                    book: Mutex::new(book::Book::new(g.addresses.clone())),
                    pending_roam: Mutex::new(None),
                    exposed: Mutex::new(expose::initial(&config, name)),
                    udp: udp[name].clone(),
                    thread: i % session_threads.len(),
                };
                (name.clone(), Arc::new(link))
            })
            .collect();
        let paths = Arc::new(Paths::from_config(&config));
        if paths.kernel {
            if let Some(task) = crate::path::follow_kernel(paths.clone(), shutdown.clone()).await {
                // Detached on purpose: it ends with `shutdown`.
                drop(task);
            }
        }
        let limits = StreamLimits {
            replay_buffer: config.replay_buffer,
            size_send_buffers: config.send_buffers,
            ..StreamLimits::default()
        };
        let (decider, decider_rx) = mpsc::unbounded_channel();
        let engine = baton_policy::Engine::new(config.policy.clone());
        let shared = Arc::new(Shared {
            config,
            key,
            rng: SystemRandom::new(),
            links,
            paths,
            switches: Mutex::new(Vec::new()),
            shutdown,
            tasks,
            limits,
            events: Arc::new(crate::decide::Events::new()),
            decider,
            session_threads,
        });
        for link in shared.links.values() {
            shared
                .tasks
                .spawn(maintain_link(shared.clone(), link.clone()));
        }
        let mut service_addrs = HashMap::new();
        for link in shared.links.values() {
            service_addrs.extend(link.udp.service_addrs());
            link.udp.start();
        }
        for (name, l) in listeners {
            service_addrs.insert(name.clone(), l.local_addr()?);
            info!(service = %name, addr = %l.local_addr()?, "service listening");
            shared.tasks.spawn(serve_service(shared.clone(), name, l));
        }
        let client = Self {
            shared: shared.clone(),
            service_addrs,
        };
        shared.tasks.spawn(crate::decide::run(
            client.clone(),
            engine,
            decider_rx,
            shared.shutdown.clone(),
        ));
        Ok(client)
    }

    /// Where a service listens (useful with port 0).
    pub fn service_addr(&self, service: &str) -> Option<SocketAddr> {
        self.service_addrs.get(service).copied()
    }

    /// The current state of the session with `gateway`.
    pub fn link_state(&self, gateway: &str) -> Option<LinkState> {
        self.shared
            .links
            .get(gateway)
            .map(|l| l.state.borrow().clone())
    }

    /// Waits until the session with `gateway` is up, or its first attempt
    /// fails permanently.
    pub async fn wait_up(&self, gateway: &str) -> Result<SessionInfo, SessionError> {
        let link = self
            .shared
            .links
            .get(gateway)
            .ok_or_else(|| SessionError::Protocol(format!("no gateway {gateway}")))?;
        let mut rx = link.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                LinkState::Up(s) => return Ok(s.clone()),
                LinkState::Failed(e) if e.is_permanent() => return Err(e.clone()),
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(SessionError::Unreachable("client stopped".into()));
            }
        }
    }

    /// The interfaces (paths) the agent knows, in order of preference.
    pub fn paths(&self) -> Vec<crate::path::PathStatus> {
        self.shared.paths.status()
    }

    /// Every switch so far, oldest first.
    pub fn switches(&self) -> Vec<SwitchRecord> {
        lock(&self.shared.switches).clone()
    }

    /// Names of the configured gateways.
    pub fn gateway_names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.shared.links.keys().cloned().collect();
        v.sort();
        v
    }

    /// Live streams of the session with `gateway`.
    pub fn stream_count_for(&self, gateway: &str) -> usize {
        self.shared
            .links
            .get(gateway)
            .and_then(|l| lock(&l.core).clone())
            .map_or(0, |c| lock(&c.streams).len())
    }

    /// The interface the sessions use now (the first session's, if they differ).
    pub fn current_path(&self) -> Option<String> {
        let mut names: Vec<_> = self.shared.links.keys().collect();
        names.sort();
        names
            .into_iter()
            .find_map(|g| match &*self.shared.links[g].state.borrow() {
                LinkState::Up(i) => Some(i.path.clone()),
                _ => None,
            })
    }

    /// Every live stream.
    pub fn streams(&self) -> Vec<StreamStatus> {
        let mut out = Vec::new();
        for (g, link) in &self.shared.links {
            let Some(core) = lock(&link.core).clone() else {
                continue;
            };
            for s in lock(&core.streams).values() {
                out.push(StreamStatus {
                    gateway: g.clone(),
                    id: s.shared.id.0,
                    service: s.service.clone(),
                    incoming: s.shared.id.is_gateway_opened(),
                    sent: s.shared.taken.load(Ordering::Relaxed),
                    confirmed: s.shared.peer_acked.load(Ordering::Relaxed),
                    received: s.shared.delivered.load(Ordering::Relaxed),
                    resent: s.shared.resent.load(Ordering::Relaxed),
                    sent_spliced: s.shared.spliced_out.load(Ordering::Relaxed),
                    received_spliced: s.shared.spliced_in.load(Ordering::Relaxed),
                    leg_send_buffer: Some(s.shared.leg_sndbuf.load(Ordering::Relaxed))
                        .filter(|&b| b > 0),
                    app_send_buffer: Some(s.shared.local_sndbuf.load(Ordering::Relaxed))
                        .filter(|&b| b > 0),
                    legs: s.generation.load(Ordering::Relaxed),
                    compress: match s.shared.compression {
                        baton_proto::Compression::None => "none",
                        baton_proto::Compression::Zstd => "zstd",
                    },
                    wire_bytes: s.shared.wire_bytes(),
                    compression_ratio: s.shared.compression_ratio(),
                    buffer_bytes: s.shared.buffer_bytes(),
                });
            }
        }
        out.sort_by(|a, b| a.gateway.cmp(&b.gateway).then(a.id.cmp(&b.id)));
        out
    }

    /// The client services this agent exposes, with where each gateway
    /// listens for them.
    pub fn exposed(&self) -> Vec<ExposedStatus> {
        let mut names: Vec<_> = self.shared.links.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|g| lock(&self.shared.links[g].exposed).clone())
            .collect()
    }

    /// UDP services, flows and their counters.
    pub fn udp_status(&self) -> crate::udp::UdpStatus {
        let mut out = crate::udp::UdpStatus::default();
        for g in self.gateway_names() {
            self.shared.links[&g].udp.status(&mut out);
        }
        out.flows
            .sort_by(|a, b| a.gateway.cmp(&b.gateway).then(a.flow.cmp(&b.flow)));
        out
    }

    /// Live streams over all sessions.
    pub fn stream_count(&self) -> usize {
        self.shared
            .links
            .values()
            .filter_map(|l| lock(&l.core).clone())
            .map(|c| lock(&c.streams).len())
            .sum()
    }

    /// User-initiated switch of every session to the interface `to`,
    /// through the decision engine (which refuses unknown, down or
    /// never-use interfaces). Resolves with the switches made.
    pub async fn switch(&self, to: &str) -> Result<Vec<SwitchRecord>, String> {
        let before = lock(&self.shared.switches).len();
        let (tx, rx) = oneshot::channel();
        self.shared
            .decider
            .send(crate::decide::Command::Switch(to.to_owned(), tx))
            .map_err(|_| "client stopped".to_owned())?;
        rx.await.map_err(|_| "client stopped".to_owned())??;
        Ok(lock(&self.shared.switches)[before..].to_vec())
    }

    /// Planned switch of every session to `to`, make before break, without
    /// asking the engine (the engine's own decisions come here).
    pub(crate) async fn switch_now(
        &self,
        to: &str,
        reason: &str,
    ) -> Result<Vec<SwitchRecord>, String> {
        if !self.shared.paths.is_usable(to) {
            return Err(format!("interface {to:?} is not known or not up"));
        }
        let mut waits = Vec::new();
        for link in self.shared.links.values() {
            let (done, rx) = oneshot::channel();
            link.switch_tx
                .send(SwitchRequest {
                    to: to.to_owned(),
                    addr: AddrChoice::Keep,
                    reason: reason.to_owned(),
                    done,
                })
                .map_err(|_| "client stopped".to_owned())?;
            waits.push(rx);
        }
        let mut records = Vec::new();
        for rx in waits {
            if let Some(r) = rx.await.map_err(|_| "client stopped".to_owned())?? {
                records.push(r);
            }
        }
        Ok(records)
    }

    /// Sets the decision mode.
    pub async fn set_mode(&self, mode: baton_policy::Mode) -> Result<String, String> {
        self.ask(|tx| crate::decide::Command::SetMode(mode, tx))
            .await
    }

    /// Approves the engine's pending proposal (manual mode).
    pub async fn approve(&self) -> Result<String, String> {
        self.ask(crate::decide::Command::Approve).await
    }

    /// Declines the engine's pending proposal (manual mode).
    pub async fn decline(&self) -> Result<String, String> {
        self.ask(crate::decide::Command::Decline).await
    }

    async fn ask(
        &self,
        cmd: impl FnOnce(oneshot::Sender<Result<String, String>>) -> crate::decide::Command,
    ) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .decider
            .send(cmd(tx))
            .map_err(|_| "client stopped".to_owned())?;
        rx.await.map_err(|_| "client stopped".to_owned())?
    }

    /// The decision engine's view: mode, proposal, interfaces with their
    /// measurements, scores and health.
    pub async fn engine_status(&self) -> serde_json::Value {
        let (tx, rx) = oneshot::channel();
        if self
            .shared
            .decider
            .send(crate::decide::Command::Status(tx))
            .is_err()
        {
            return serde_json::Value::Null;
        }
        rx.await.unwrap_or(serde_json::Value::Null)
    }

    /// Events of the decision engine and the switches, as they happen.
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<crate::decide::Event> {
        self.shared.events.subscribe()
    }

    /// The most recent events, oldest first.
    pub fn recent_events(&self) -> Vec<crate::decide::Event> {
        self.shared.events.recent()
    }

    pub(crate) fn events(&self) -> Arc<crate::decide::Events> {
        self.shared.events.clone()
    }

    pub(crate) fn paths_changed(&self) -> watch::Receiver<u64> {
        self.shared.paths.subscribe()
    }

    pub(crate) fn policy_table(&self) -> Vec<baton_policy::Interface> {
        self.shared.paths.policy_table()
    }

    pub(crate) fn path(&self, name: &str) -> Option<Path> {
        self.shared.paths.get(name)
    }

    /// The state of the first gateway's session (the one probes go to).
    pub(crate) fn first_link_state(&self) -> watch::Receiver<LinkState> {
        let mut names: Vec<_> = self.shared.links.keys().collect();
        names.sort();
        self.shared.links[names[0]].state.subscribe()
    }

    /// How long the first gateway's control connection has been silent
    /// beyond its keep-alive interval: the current path's stall. A far
    /// application that stops reading is not a stall: the gateway still
    /// answers keep-alives.
    pub(crate) fn path_stall(&self) -> Duration {
        let mut names: Vec<_> = self.shared.links.keys().collect();
        names.sort();
        let Some(core) = lock(&self.shared.links[names[0]].core).clone() else {
            return Duration::ZERO;
        };
        let silent = lock(&core.last_heard).elapsed();
        silent.saturating_sub(self.shared.config.keepalive + Duration::from_millis(250))
    }

    /// Session id, leg key and gateway address for path probes.
    pub(crate) fn probe_identity(&self) -> Option<(u64, LegKey, SocketAddr)> {
        let mut names: Vec<_> = self.shared.links.keys().collect();
        names.sort();
        let link = &self.shared.links[names[0]];
        let core = lock(&link.core).clone()?;
        let addr = lock(&core.route).gateway_addr;
        Some((core.id, core.leg_key.clone(), addr))
    }

    /// Marks an interface down or up, as the kernel's link events do. Down
    /// cuts every connection using it at once (an unexpected switch follows).
    pub fn set_path_up(&self, name: &str, up: bool) -> Result<(), String> {
        self.shared.paths.set_up(name, up)
    }

    /// Waits until every task has ended after shutdown.
    pub async fn wait(&self) {
        self.shared.shutdown.cancelled().await;
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Established {
    session_id: u64,
    /// Connection set-up to the gateway's first answer: the path's round trip.
    rtt: Duration,
    leg_key: LegKey,
    cipher: ControlCipher,
    keepalive: Duration,
    frames: FramedRead<OwnedReadHalf, FrameCodec>,
    writer: OwnedWriteHalf,
    route: Route,
}

/// Keeps the session with one gateway: connects, runs the control
/// connection, switches when asked or when the path fails, and releases the
/// session when no path works for the switch timeout.
async fn maintain_link(shared: Arc<Shared>, link: Arc<Link>) {
    let Some(mut switch_rx) = lock(&link.switch_rx).take() else {
        return;
    };
    let mut backoff = Duration::from_millis(50);
    // Set while the path is lost: (when, from which interface, why, from
    // which gateway address).
    let mut outage: Option<(Instant, SystemTime, String, String, SocketAddr)> = None;
    let mut preferred: Option<String> = None;
    // A switch asked for when the interface under the session was already
    // gone: answered once the session has resumed, as after a failure.
    let mut waiting: Option<SwitchRequest> = None;
    loop {
        let core = lock(&link.core).clone();
        let resume = core.as_ref().map_or(0, |c| c.id);
        if let (Some(c), Some((since, ..))) = (&core, &outage) {
            if since.elapsed() >= shared.config.switch_timeout {
                warn!(gateway = %link.gateway, session = %sid(c.id), "no path for the switch timeout: releasing the session");
                release_core(&link, c, "switch timeout passed");
                if let Some(req) = waiting.take() {
                    let _ = req.done.send(Err(
                        "no path for the switch timeout: the session was released".into(),
                    ));
                }
                outage = None;
                continue;
            }
        }
        let result = tokio::select! {
            r = connect_any(&shared, &link, resume, preferred.as_deref()) => r,
            _ = shared.shutdown.cancelled() => return,
        };
        let est = match result {
            Ok(est) => est,
            Err(e) => {
                let pause = if e.is_permanent() {
                    Duration::from_secs(30)
                } else {
                    backoff
                };
                if core.is_none() {
                    warn!(gateway = %link.gateway, "session failed: {e}; retrying in {pause:?}");
                    link.state.send_replace(LinkState::Failed(e));
                } else {
                    debug!(gateway = %link.gateway, "reconnect failed: {e}; retrying in {pause:?}");
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shared.paths.changed() => {}
                    _ = shared.shutdown.cancelled() => return,
                }
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let core = adopt(&shared, &link, core, &est);
        core.udp.route(
            core.id,
            &core.leg_key,
            &est.route.path,
            est.route.gateway_addr,
        );
        let from = outage.as_ref().map(|o| o.2.clone());
        let info = SessionInfo {
            id: core.id,
            gateway: link.gateway.clone(),
            gateway_addr: est.route.gateway_addr,
            path: est.route.path.name.clone(),
        };
        link.state.send_replace(LinkState::Up(info));
        if let Some((since, at, from, why, from_addr)) = outage.take() {
            let record = relegs_and_record(
                &shared,
                &link,
                &core,
                SwitchKind::Unexpected,
                (from, from_addr),
                since,
                at,
                why,
            )
            .await;
            info!(gateway = %link.gateway, to = %record.to, pause_ms = record.duration_ms, "unexpected switch done");
            report_path(&shared, &core, &record, est.rtt);
            lock(&shared.switches).push(record.clone());
            if let Some(req) = waiting.take() {
                let _ = req.done.send(Ok(Some(record)));
            }
        } else if from.is_none() {
            info!(gateway = %link.gateway, path = %est.route.path.name, session = %sid(core.id), "session up");
        }
        let mut est = est;
        loop {
            let end = run_control(&shared, &link, &core, est, &mut switch_rx, &mut waiting).await;
            match end {
                ControlEnd::Shutdown => return,
                ControlEnd::Switched(new_est, req, started, at) => {
                    let from = {
                        let r = lock(&core.route);
                        (r.path.name.clone(), r.gateway_addr)
                    };
                    *lock(&core.route) = new_est.route.clone();
                    core.udp.route(
                        core.id,
                        &core.leg_key,
                        &new_est.route.path,
                        new_est.route.gateway_addr,
                    );
                    let info = SessionInfo {
                        id: core.id,
                        gateway: link.gateway.clone(),
                        gateway_addr: new_est.route.gateway_addr,
                        path: new_est.route.path.name.clone(),
                    };
                    link.state.send_replace(LinkState::Up(info));
                    let why = req.reason.clone();
                    let record = relegs_and_record(
                        &shared,
                        &link,
                        &core,
                        SwitchKind::Planned,
                        from,
                        started,
                        at,
                        why,
                    )
                    .await;
                    info!(gateway = %link.gateway, to = %record.to, ms = record.duration_ms, "planned switch done");
                    report_path(&shared, &core, &record, new_est.rtt);
                    lock(&shared.switches).push(record.clone());
                    let _ = req.done.send(Ok(Some(record)));
                    est = *new_est;
                }
                ControlEnd::Failed(why) => {
                    let (from, from_addr) = {
                        let r = lock(&core.route);
                        (r.path.name.clone(), r.gateway_addr)
                    };
                    warn!(gateway = %link.gateway, path = %from, gateway_addr = %from_addr, "path lost: {why}; switching");
                    roam::path_failed(&shared, &link, &from);
                    core.up.send_replace(false);
                    *lock(&core.control) = None;
                    core.udp.detach();
                    // Legs on the failed path are cut so that nothing waits on them.
                    lock(&core.route).cut.cancel();
                    // Bind first: the watch's read guard must be gone before the write.
                    let state = link.state.borrow().clone();
                    if let LinkState::Up(info) = state {
                        link.state.send_replace(LinkState::Switching(info));
                    }
                    preferred = waiting.as_ref().map(|r| r.to.clone());
                    early_relegs(&shared, &core, &from, preferred.as_deref());
                    outage = Some((Instant::now(), SystemTime::now(), from, why, from_addr));
                    break;
                }
            }
        }
    }
}

/// When the failed interface is gone (link down, address removed), the
/// streams need not wait for the session to be resumed: legs are
/// authenticated with the session's leg key, which the gateway holds while
/// the session is detached. New legs open on the next interface at once, in
/// parallel with the control connection's resume, which saves the
/// handshake's round trips from the pause.
fn early_relegs(shared: &Arc<Shared>, core: &Arc<Core>, failed: &str, preferred: Option<&str>) {
    if shared.paths.is_usable(failed) {
        // A silent path that is still up may only be slow: no guess here.
        return;
    }
    let usable = shared.paths.usable();
    let Some(next) = usable
        .iter()
        .find(|p| Some(p.name.as_str()) == preferred)
        .or(usable.first())
        .cloned()
    else {
        return;
    };
    let gateway_addr = lock(&core.route).gateway_addr;
    let cut = shared.paths.cut_token(&next.name).child_token();
    debug!(to = %next.name, "opening new legs while the session resumes");
    *lock(&core.route) = Route {
        path: next,
        gateway_addr,
        cut,
    };
    let streams: Vec<_> = lock(&core.streams).values().cloned().collect();
    for s in streams {
        let (shared2, core2) = (shared.clone(), core.clone());
        shared
            .tasks
            .spawn(async move { releg(&shared2, &core2, &s, LegStart::Rewind).await });
    }
}

/// Makes the established connection the session's: a new session (the
/// first, or after the gateway lost the old one) or a resumed one.
fn adopt(
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    core: Option<Arc<Core>>,
    est: &Established,
) -> Arc<Core> {
    if let Some(c) = core {
        if c.id == est.session_id {
            *lock(&c.route) = est.route.clone();
            return c;
        }
        warn!(gateway = %link.gateway, old = %sid(c.id), "the gateway no longer holds the session; its streams are closed");
        release_core(link, &c, "gateway lost the session");
    }
    let (to_session, from_streams) = mpsc::unbounded_channel();
    let core = Arc::new(Core {
        id: est.session_id,
        leg_key: est.leg_key.clone(),
        route: Mutex::new(est.route.clone()),
        streams: Mutex::new(HashMap::new()),
        next_stream: AtomicU64::new(0),
        control: Mutex::new(None),
        finished: Mutex::new(Tombstones::default()),
        last_heard: Mutex::new(std::time::Instant::now()),
        up: watch::channel(false).0,
        to_session,
        released: shared.shutdown.child_token(),
        udp: link.udp.clone(),
        thread: shared.thread_of(link).clone(),
    });
    *lock(&link.core) = Some(core.clone());
    shared.tasks.spawn_on(
        session_task(shared.clone(), core.clone(), from_streams),
        shared.thread_of(link),
    );
    core
}

fn release_core(link: &Link, core: &Core, why: &str) {
    info!(gateway = %link.gateway, session = %sid(core.id), "session released: {why}");
    expose::forget(link);
    core.released.cancel();
    core.up.send_replace(false);
    let mut slot = lock(&link.core);
    if slot.as_ref().is_some_and(|c| c.id == core.id) {
        *slot = None;
    }
}

/// Opens new legs for every stream on the session's current route and
/// records the switch once all have resumed.
#[allow(clippy::too_many_arguments)]
async fn relegs_and_record(
    shared: &Arc<Shared>,
    link: &Link,
    core: &Arc<Core>,
    kind: SwitchKind,
    (from, from_addr): (String, SocketAddr),
    started: Instant,
    at: SystemTime,
    reason: String,
) -> SwitchRecord {
    let streams: Vec<_> = lock(&core.streams).values().cloned().collect();
    let resent_before: u64 = streams
        .iter()
        .map(|s| s.shared.resent.load(Ordering::Relaxed))
        .sum();
    let mark = std::time::Instant::now();
    for s in &streams {
        s.shared
            .mark_stall_window(mark.checked_sub(started.elapsed()).unwrap_or(mark));
    }
    let mut opens = Vec::new();
    let since = started.into_std();
    // In a planned switch the old legs still work: the new ones go on
    // where they stop. After a failure they rewind to what the peer has.
    let start = if kind == SwitchKind::Planned {
        LegStart::Continue
    } else {
        LegStart::Rewind
    };
    for s in &streams {
        // Streams that already have a leg on the new path (opened early, see
        // `early_relegs`) keep it; one still opening is waited for.
        let fresh = lock(&s.leg_opened).is_some_and(|t| t >= since);
        if fresh {
            continue;
        }
        let (shared2, core2, s2) = (shared.clone(), core.clone(), s.clone());
        opens.push(tokio::spawn(async move {
            while s2.releg_busy.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !lock(&s2.leg_opened).is_some_and(|t| t >= since) {
                releg(&shared2, &core2, &s2, start).await;
            }
        }));
    }
    for o in opens {
        let _ = o.await;
    }
    let duration = started.elapsed();
    // The first bytes on the new legs follow within a round trip; what the
    // streams saw is read again later (see `settle_record`).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let longest = streams
        .iter()
        .map(|s| s.shared.longest_stall())
        .max()
        .unwrap_or_default();
    let resent_after: u64 = streams
        .iter()
        .map(|s| s.shared.resent.load(Ordering::Relaxed))
        .sum();
    let settle = duration.max(Duration::from_millis(250)) * 2;
    let (shared2, streams2, key) = (
        shared.clone(),
        streams.clone(),
        (link.gateway.clone(), unix_ms(at)),
    );
    let (to, to_addr) = {
        let r = lock(&core.route);
        (r.path.name.clone(), r.gateway_addr)
    };
    if to_addr != from_addr {
        *lock(&link.pending_roam) = Some((from_addr, to_addr));
    }
    shared
        .tasks
        .spawn(async move { settle_record(shared2, key, streams2, resent_before, settle).await });
    SwitchRecord {
        kind,
        gateway: link.gateway.clone(),
        from,
        to,
        gateway_addr_from: from_addr.to_string(),
        gateway_addr_to: to_addr.to_string(),
        at_unix_ms: unix_ms(at),
        duration_ms: duration.as_millis() as u64,
        longest_stall_ms: longest.as_millis() as u64,
        bytes_resent: resent_after.saturating_sub(resent_before),
        streams: streams.len(),
        reason,
    }
}

/// How long the new path's throughput is watched after a switch.
const PATH_REPORT_WINDOW: Duration = Duration::from_secs(1);

/// Measures what a session's new path carries over the window after a
/// switch and publishes it as a `path_changed` event.
fn report_path(shared: &Arc<Shared>, core: &Arc<Core>, record: &SwitchRecord, rtt: Duration) {
    let streams: Vec<_> = lock(&core.streams).values().cloned().collect();
    let counters = move || {
        streams.iter().fold((0u64, 0u64), |(d, u), s| {
            (
                d + s.shared.delivered.load(Ordering::Relaxed),
                u + s.shared.peer_acked.load(Ordering::Relaxed),
            )
        })
    };
    let events = shared.events.clone();
    let (gateway, switch, from, to) = (
        record.gateway.clone(),
        record.kind,
        record.from.clone(),
        record.to.clone(),
    );
    shared.tasks.spawn(async move {
        let (d0, u0) = counters();
        let began = Instant::now();
        tokio::time::sleep(PATH_REPORT_WINDOW).await;
        let (d1, u1) = counters();
        let secs = began.elapsed().as_secs_f64();
        let per_s = |n: u64| (n as f64 / secs) as u64;
        events.publish_path(crate::decide::PathReport {
            gateway,
            switch,
            from,
            to,
            rtt_ms: rtt.as_secs_f64() * 1e3,
            down_bytes_per_s: per_s(d1.saturating_sub(d0)),
            up_bytes_per_s: per_s(u1.saturating_sub(u0)),
            window_ms: (secs * 1e3) as u64,
        });
    });
}

/// Updates the record of `key` (gateway, start) once the streams have settled on
/// their new legs: a pause can outlast the switch itself (the new path's
/// first round trips), and the record must not under-report it.
async fn settle_record(
    shared: Arc<Shared>,
    key: (String, u64),
    streams: Vec<Arc<ClientStream>>,
    resent_before: u64,
    after: Duration,
) {
    tokio::time::sleep(after).await;
    let longest = streams
        .iter()
        .map(|s| s.shared.longest_stall())
        .max()
        .unwrap_or_default();
    let resent: u64 = streams
        .iter()
        .map(|s| s.shared.resent.load(Ordering::Relaxed))
        .sum();
    if let Some(r) = lock(&shared.switches)
        .iter_mut()
        .rev()
        .find(|r| r.gateway == key.0 && r.at_unix_ms == key.1)
    {
        r.longest_stall_ms = r.longest_stall_ms.max(longest.as_millis() as u64);
        r.bytes_resent = r.bytes_resent.max(resent.saturating_sub(resent_before));
    }
}

/// Tries the gateway's addresses over the usable paths (the preferred one
/// first) until a control connection is established (`roam::search`).
async fn connect_any(
    shared: &Shared,
    link: &Link,
    resume: u64,
    preferred: Option<&str>,
) -> Result<Established, SessionError> {
    let mut paths = shared.paths.usable();
    if let Some(p) = preferred {
        if let Some(i) = paths.iter().position(|x| x.name == p) {
            let chosen = paths.remove(i);
            paths.insert(0, chosen);
        }
    }
    if paths.is_empty() {
        return Err(SessionError::Unreachable("no usable interface".into()));
    }
    roam::search(shared, link, resume, &paths, None, None, true).await
}

/// Runs the session handshake on a connection to `target` made over
/// `path` (see `roam::search`, which dials); `rtt` is how long TCP's own
/// handshake took: one round trip of the path.
async fn handshake_on(
    shared: &Shared,
    path: &Path,
    target: SocketAddr,
    mut stream: TcpStream,
    rtt: Duration,
    resume: u64,
) -> Result<Established, SessionError> {
    let unreachable =
        |e: std::io::Error| SessionError::Unreachable(format!("{target} via {}: {e}", path.name));
    let timeout = shared.config.connect_timeout;
    // This connection's own token, under the interface's: cutting this route
    // (a failed control connection) must not cut later connections on the
    // same interface, while the interface going down cuts them all.
    let cut = shared.paths.cut_token(&path.name).child_token();
    let _ = stream.set_nodelay(true);
    let (hs, first) = ClientHandshake::start(&shared.config.id, &shared.key, resume, &shared.rng)
        .map_err(|e| SessionError::Protocol(e.to_string()))?;
    stream.write_all(&first).await.map_err(unreachable)?;

    let (r, mut w) = stream.into_split();
    let mut frames =
        FramedRead::with_capacity(r, FrameCodec::default(), crate::frame::CONTROL_READ_BUFFER);
    let mut next = async || -> Result<crate::frame::RawFrame, SessionError> {
        match tokio::time::timeout(timeout, frames.next()).await {
            Err(_) => Err(SessionError::Unreachable("handshake timed out".into())),
            Ok(None) => Err(SessionError::Unreachable(
                "gateway closed the connection".into(),
            )),
            Ok(Some(Err(e))) => Err(SessionError::Protocol(e.to_string())),
            Ok(Some(Ok(f))) => Ok(f),
        }
    };
    let refused = |m: Message| match m {
        Message::Refused { reason, detail } => SessionError::Refused { reason, detail },
        other => SessionError::Protocol(format!("unexpected message type {:#04x}", other.ty())),
    };
    let challenge = next().await?;
    if !matches!(challenge.decode(), Ok(Message::Challenge { .. })) {
        return Err(refused(
            challenge
                .decode()
                .map_err(|e| SessionError::Protocol(e.to_string()))?,
        ));
    }
    let (session_id, keys, auth) = hs
        .on_challenge(&challenge.bytes)
        .map_err(|e| SessionError::Protocol(e.to_string()))?;
    w.write_all(&auth).await.map_err(unreachable)?;
    let reply = next().await?;
    let mut cipher = ControlCipher::new(&keys, Role::Client);
    let keepalive_ms = if reply.tag.is_some() {
        match reply
            .open(&mut cipher)
            .map_err(|e| SessionError::Protocol(e.to_string()))?
        {
            Message::Accepted {
                session_id: sid,
                keepalive_ms,
                ..
            } if sid == session_id => keepalive_ms,
            other => {
                return Err(SessionError::Protocol(format!(
                    "unexpected message type {:#04x}",
                    other.ty()
                )))
            }
        }
    } else {
        return Err(refused(
            reply
                .decode()
                .map_err(|e| SessionError::Protocol(e.to_string()))?,
        ));
    };
    // The same reader goes on into the control loop: frames the gateway
    // sent right after Accepted (half-closes and resets it holds for a
    // resumed session) may already be in its buffer.
    frames.decoder_mut().keyed = true;
    let keepalive = shared
        .config
        .keepalive
        .min(Duration::from_millis(u64::from(keepalive_ms.max(100))));
    // On a resume the session's first leg key stays in force: legs of the
    // session are authenticated with it whatever control connection is up.
    Ok(Established {
        session_id,
        rtt,
        leg_key: keys.leg_key(),
        cipher,
        keepalive,
        frames,
        writer: w,
        route: Route {
            path: path.clone(),
            gateway_addr: target,
            cut,
        },
    })
}

enum ControlEnd {
    Shutdown,
    Failed(String),
    Switched(Box<Established>, SwitchRequest, Instant, SystemTime),
}

/// Runs an established control connection until it fails, the client shuts
/// down, or a planned switch replaces it.
///
/// The connection itself is served on the session's thread by a [`Pump`],
/// beside the session's streams; this task, on the runtime's threads,
/// keeps what needs the rest of the agent: switches, the multihomed
/// gateway's messages, exposed services, UDP flows.
async fn run_control(
    shared: &Arc<Shared>,
    link: &Link,
    core: &Arc<Core>,
    est: Established,
    switch_rx: &mut mpsc::UnboundedReceiver<SwitchRequest>,
    waiting: &mut Option<SwitchRequest>,
) -> ControlEnd {
    let Established {
        mut cipher,
        keepalive,
        frames,
        writer: mut w,
        route,
        ..
    } = est;
    let (tx, outgoing) = mpsc::unbounded_channel();
    core.udp.attach(core.id, tx.clone());
    *lock(&core.control) = Some(tx);
    roam::announce(link, core);
    *lock(&core.last_heard) = std::time::Instant::now();
    core.up.send_replace(true);
    // Streams accepted while no control connection was up have no leg yet.
    for s in lock(&core.streams).values() {
        if s.generation.load(Ordering::Acquire) == 0 && !s.releg_busy.load(Ordering::Acquire) {
            let (shared2, core2, s2) = (shared.clone(), core.clone(), s.clone());
            shared
                .tasks
                .spawn(async move { releg(&shared2, &core2, &s2, LegStart::Rewind).await });
        }
    }
    // What the gateway may have missed: half-closes and acks.
    let mut out = Vec::new();
    for s in lock(&core.streams).values() {
        if let Some(offset) = *lock(&s.shared.fin_at) {
            cipher.seal(
                &Message::StreamFin {
                    stream: s.shared.id,
                    offset,
                },
                &mut out,
            );
        }
        s.shared.acked_to_peer.store(0, Ordering::Relaxed);
        let _ = core.to_session.send(ToSession::Ack {
            stream: s.shared.id,
            due: AckDue::Soon,
        });
    }
    for m in lock(&core.finished).messages() {
        cipher.seal(&m, &mut out);
    }
    // Every connection declares the client services again: after a resume
    // the answer is the same, after a new session the gateway listens anew.
    if let Some(m) = expose::declaration(link) {
        cipher.seal(&m, &mut out);
    }
    if let Err(e) = w.write_all(&out).await {
        return ControlEnd::Failed(format!("control connection: {e}"));
    }
    let (others_tx, mut others) = mpsc::unbounded_channel();
    let (end_tx, mut end) = oneshot::channel();
    // Whatever ends this task (a switch, a cut route) ends the pump: the old
    // connection closes with it.
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let leaving = match LeavingControl::leave(frames, w) {
        Ok(l) => l,
        Err(e) => return ControlEnd::Failed(format!("control connection: {e}")),
    };
    let pump = Pump {
        core: core.clone(),
        cipher,
        liveness: Liveness::new(
            Instant::now().into_std(),
            Some(keepalive),
            shared.config.dead_after,
        ),
        dead_after: shared.config.dead_after,
        outgoing,
        others: others_tx,
        shutdown: shared.shutdown.clone(),
    };
    shared.tasks.spawn_on(
        async move {
            let ended = tokio::select! {
                e = pump.run(leaving) => e,
                () = stop.cancelled() => return,
            };
            let _ = end_tx.send(ended);
        },
        &core.thread,
    );
    loop {
        tokio::select! {
            e = &mut end => return match e {
                Ok(PumpEnd::Failed(why)) => ControlEnd::Failed(why),
                Ok(PumpEnd::Shutdown) => {
                    core.released.cancel();
                    ControlEnd::Shutdown
                }
                // The pump is gone without a word (it panicked): reconnect.
                Err(_) => ControlEnd::Failed("control connection: its task ended".into()),
            },
            Some(msg) = others.recv() => match roam::on_message(shared, link, &route, msg) {
                None => {}
                Some(Message::Incoming { stream, service }) => expose::on_incoming(shared, link, core, stream, service),
                Some(Message::Exposed { entries }) => expose::on_exposed(link, entries),
                Some(m @ (Message::FlowOpen { .. } | Message::FlowReply { .. } | Message::FlowClose { .. })) => core.udp.on_control(m),
                Some(other) => debug!("ignoring unexpected control message {:#04x}", other.ty()),
            },
            _ = route.cut.cancelled() => return ControlEnd::Failed(format!("interface {} went down", route.path.name)),
            Some(req) = switch_rx.recv() => {
                let started = Instant::now();
                let at = SystemTime::now();
                let gone = || ControlEnd::Failed(format!("interface {} went down", route.path.name));
                // A switch away from an interface that is already down (the
                // engine heard of it in the same instant) has nothing to make
                // before break: waiting on the old legs would only add their
                // silence to the pause. It is done as after a failure, on
                // the interface asked for first.
                if route.cut.is_cancelled() {
                    *waiting = Some(req);
                    return gone();
                }
                // Make before break: the old connection and legs keep
                // carrying data while the new ones are set up; unless the
                // interface goes down meanwhile (then as above).
                let planned = tokio::select! {
                    biased;
                    () = route.cut.cancelled() => None,
                    r = roam::planned(shared, link, core, &route, &req) => Some(r),
                };
                match planned {
                    None => {
                        *waiting = Some(req);
                        return gone();
                    }
                    Some(Ok(Some(new))) => {
                        *lock(&core.control) = None;
                        return ControlEnd::Switched(Box::new(new), req, started, at);
                    }
                    Some(Ok(None)) => { let _ = req.done.send(Ok(None)); }
                    Some(Err(e)) => { let _ = req.done.send(Err(e)); }
                }
            }
        }
    }
}

/// A control connection on its way to the session thread, with the bytes
/// its reader had already taken from the socket.
struct LeavingControl {
    conn: Moving,
    buffered: bytes::BytesMut,
}

impl LeavingControl {
    fn leave(
        frames: FramedRead<OwnedReadHalf, FrameCodec>,
        writer: OwnedWriteHalf,
    ) -> std::io::Result<Self> {
        let buffered = frames.read_buffer().clone();
        let conn = frames
            .into_inner()
            .reunite(writer)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self {
            conn: Moving::leave(conn)?,
            buffered,
        })
    }
}

/// How a [`Pump`] ended.
enum PumpEnd {
    Failed(String),
    /// The client is stopping; the gateway was told.
    Shutdown,
}

/// The control connection in steady state, on the session's thread: the
/// gateway's acknowledgements, half-closes and resets reach the streams as
/// plain channel sends on the same thread, and the session task's batches
/// of acknowledgements go out without waking another thread. Before, both
/// crossed threads for every batch, a few hundred wake-ups a second on a
/// busy session that competed with the relaying (bench/README.md, finding
/// 22).
struct Pump {
    core: Arc<Core>,
    cipher: ControlCipher,
    liveness: Liveness,
    dead_after: Duration,
    /// What the agent sends on the control connection (`Core::control`).
    outgoing: mpsc::UnboundedReceiver<Message>,
    /// Messages for [`run_control`].
    others: mpsc::UnboundedSender<Message>,
    shutdown: CancellationToken,
}

impl Pump {
    async fn run(mut self, leaving: LeavingControl) -> PumpEnd {
        debug_assert!(crate::shards::current_index(SESSION_THREAD).is_some());
        let failed =
            |e: &dyn std::fmt::Display| PumpEnd::Failed(format!("control connection: {e}"));
        let conn = match leaving.conn.arrive() {
            Ok(c) => c,
            Err(e) => return failed(&e),
        };
        let (r, mut w) = conn.into_split();
        let mut out = Vec::new();
        // Whole frames the reader had already taken are handled first; a
        // part of one waits for the rest in the new reader's buffer.
        let mut codec = FrameCodec { keyed: true };
        let mut buffered = leaving.buffered;
        loop {
            match tokio_util::codec::Decoder::decode(&mut codec, &mut buffered) {
                Ok(Some(f)) => {
                    if let Err(end) = self.on_frame(&f, &mut out) {
                        return end;
                    }
                }
                Ok(None) => break,
                Err(e) => return failed(&e),
            }
        }
        let mut frames = FramedRead::with_capacity(r, codec, crate::frame::CONTROL_READ_BUFFER);
        frames.read_buffer_mut().extend_from_slice(&buffered);
        loop {
            if !out.is_empty() {
                if let Err(e) = w.write_all(&out).await {
                    return failed(&e);
                }
                out.clear();
            }
            let deadline = Instant::from_std(self.liveness.poll_timeout());
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    match self.liveness.handle_timeout(Instant::now().into_std()) {
                        Some(LivenessAction::SendPing(seq)) => self.cipher.seal(&Message::Ping { seq }, &mut out),
                        Some(LivenessAction::Expired) => return PumpEnd::Failed(format!("no answer from the gateway for {:?}", self.dead_after)),
                        None => {}
                    }
                }
                f = frames.next() => match f {
                    None => return PumpEnd::Failed("gateway closed the control connection".into()),
                    Some(Err(e)) => return failed(&e),
                    Some(Ok(f)) => {
                        if let Err(end) = self.on_frame(&f, &mut out) {
                            return end;
                        }
                    }
                },
                Some(msg) = self.outgoing.recv() => {
                    self.cipher.seal(&msg, &mut out);
                    // Whatever else is queued shares the write.
                    while let Ok(msg) = self.outgoing.try_recv() {
                        self.cipher.seal(&msg, &mut out);
                    }
                }
                () = self.shutdown.cancelled() => {
                    self.cipher.seal(&Message::Disconnect, &mut out);
                    if w.write_all(&out).await.is_ok() {
                        // Wait briefly for the acknowledgement so the gateway
                        // has released the session before this process exits.
                        let cipher = &mut self.cipher;
                        let ack = tokio::time::timeout(Duration::from_secs(2), async {
                            while let Some(Ok(f)) = frames.next().await {
                                if matches!(f.open(cipher), Ok(Message::DisconnectAck)) {
                                    return true;
                                }
                            }
                            false
                        });
                        if matches!(ack.await, Ok(true)) {
                            info!(session = %sid(self.core.id), "session disconnected");
                        }
                    }
                    return PumpEnd::Shutdown;
                }
            }
        }
    }

    /// Opens and acts on one frame from the gateway; an answer goes to `out`.
    fn on_frame(&mut self, f: &crate::frame::RawFrame, out: &mut Vec<u8>) -> Result<(), PumpEnd> {
        let msg = f
            .open(&mut self.cipher)
            .map_err(|e| PumpEnd::Failed(format!("control connection: {e}")))?;
        self.liveness.on_receive(Instant::now().into_std());
        *lock(&self.core.last_heard) = std::time::Instant::now();
        if let Some(reply) = self.on_message(msg) {
            self.cipher.seal(&reply, out);
        }
        Ok(())
    }

    /// Acts on a message from the gateway; returns the answer to send, if any.
    fn on_message(&self, msg: Message) -> Option<Message> {
        let core = &self.core;
        match msg {
            Message::Ping { seq } => return Some(Message::Pong { seq }),
            Message::Pong { .. } => {}
            Message::Acks { entries } => {
                // In order, on the streams' own thread: acks of two batches
                // are never swapped.
                let streams = lock(&core.streams);
                for (id, offset) in entries {
                    if let Some(s) = streams.get(&id) {
                        let _ = s.shared.out_tx.send(OutEvent::Ack(offset));
                    }
                }
            }
            Message::StreamFin { stream, offset } => {
                if let Some(s) = lock(&core.streams).get(&stream) {
                    let _ = s.shared.in_tx.send(InEvent::Fin(offset));
                }
            }
            Message::StreamReset { stream, code } => {
                debug!(%stream, ?code, "stream reset by gateway");
                if let Some(s) = lock(&core.streams).get(&stream) {
                    s.shared.abort.cancel();
                }
            }
            Message::Releg { stream } => {
                let _ = core.to_session.send(ToSession::LegLost(stream));
            }
            // The multihomed gateway's, exposed services', UDP flows' and
            // anything unknown: for run_control.
            other => {
                let _ = self.others.send(other);
            }
        }
        None
    }
}

/// The session's own task: acknowledgements, half-closes and resets from
/// the streams to the control connection, and new legs for streams whose
/// leg broke.
async fn session_task(
    shared: Arc<Shared>,
    core: Arc<Core>,
    mut from_streams: mpsc::UnboundedReceiver<ToSession>,
) {
    debug_assert!(crate::shards::current_index(SESSION_THREAD).is_some());
    let mut acks = AckBatch::default();
    let mut up_rx = core.up.subscribe();
    let send = |msg: Message| {
        if let Some(tx) = &*lock(&core.control) {
            let _ = tx.send(msg);
        }
    };
    loop {
        tokio::select! {
            m = from_streams.recv() => match m {
                None => return,
                Some(ToSession::Ack { stream, due }) => acks.request(stream, due),
                Some(ToSession::Control(msg)) => send(msg),
                Some(ToSession::LegLost(stream)) => {
                    let s = lock(&core.streams).get(&stream).cloned();
                    if let Some(s) = s {
                        if *core.up.borrow() {
                            let (shared2, core2) = (shared.clone(), core.clone());
                            shared.tasks.spawn(async move { releg(&shared2, &core2, &s, LegStart::Rewind).await });
                        } else {
                            // The reconnect re-legs every stream but those
                            // whose leg opened during the outage: this one's
                            // is gone too, so it must not count as fresh.
                            *lock(&s.leg_opened) = None;
                        }
                    }
                }
            },
            _ = acks.due() => {
                let connected = lock(&core.control).is_some();
                let frames = {
                    let streams = lock(&core.streams);
                    acks.take(connected, |id| streams.get(&id).and_then(|s| s.shared.take_ack()))
                };
                frames.into_iter().for_each(send);
            }
            r = up_rx.changed() => {
                if r.is_err() {
                    return;
                }
                if *up_rx.borrow_and_update() {
                    acks.hurry();
                }
            }
            _ = core.released.cancelled() => return,
        }
    }
}

/// Opens a leg for a stream on the session's current route: its first leg,
/// or a new one that resumes it. At most one at a time per stream.
async fn releg(shared: &Shared, core: &Arc<Core>, s: &Arc<ClientStream>, start: LegStart) {
    let mut pause = LEG_RETRY_FIRST;
    loop {
        if s.releg_busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let result = open_leg(shared, core, s, start).await;
        s.releg_busy.store(false, Ordering::Release);
        match result {
            Ok(()) => return,
            Err(LegError::Refused(why)) => {
                warn!(stream = %s.shared.id, service = %s.service, "stream closed: {why}");
                s.shared.abort.cancel();
                return;
            }
            Err(LegError::Path(why)) => {
                debug!(stream = %s.shared.id, "leg failed: {why}");
            }
        }
        // Where the path fails, the control connection notices and the
        // reconnect re-legs every stream. But a leg can fail on a path that
        // works (a gateway worker that dropped it while being restarted):
        // then nothing else would give the stream a leg, so it is tried
        // again while the session stays up and nobody else opened one.
        let generation = s.generation.load(Ordering::Acquire);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = s.shared.abort.cancelled() => return,
            _ = core.released.cancelled() => return,
        }
        pause = (pause * 2).min(LEG_RETRY_MAX);
        if lock(&core.control).is_none() || s.generation.load(Ordering::Acquire) != generation {
            return;
        }
    }
}

/// First wait before a failed leg is opened again, doubled at each failure
/// up to [`LEG_RETRY_MAX`].
const LEG_RETRY_FIRST: Duration = Duration::from_millis(100);
const LEG_RETRY_MAX: Duration = Duration::from_secs(2);

enum LegError {
    /// The gateway said no: the stream cannot continue.
    Refused(String),
    /// The network failed: try again on the next path.
    Path(String),
}

async fn open_leg(
    shared: &Shared,
    core: &Arc<Core>,
    s: &ClientStream,
    start: LegStart,
) -> Result<(), LegError> {
    let route = lock(&core.route).clone();
    let timeout = shared.config.connect_timeout;
    // By Fast Open: with the gateway's cookie for this path (fetched when
    // the path was first probed) the preamble rides in the SYN, and the
    // gateway answers a round trip sooner.
    let mut leg = connect_via(route.gateway_addr, &route.path, timeout, true)
        .await
        .map_err(|e| {
            LegError::Path(format!(
                "leg to {} via {}: {e}",
                route.gateway_addr, route.path.name
            ))
        })?;
    let _ = baton_os::tune_relay(&leg);
    let generation = s.generation.fetch_add(1, Ordering::AcqRel);
    let received = Offset(s.shared.delivered.load(Ordering::Acquire));
    let mut out = Preface::new(ConnKind::Leg).encode().to_vec();
    let handover = start == LegStart::Continue;
    let open = Message::LegOpen {
        session_id: core.id,
        stream: s.shared.id,
        generation,
        received,
        service: s.service.clone(),
        handover,
        compression: s.shared.compression,
    };
    let open_tag = core.leg_key.seal_open(&open, &mut out);
    leg.write_all(&out)
        .await
        .map_err(|e| LegError::Path(format!("leg: {e}")))?;
    // After a failure the gateway is known to have everything the agent
    // sent up to its last acknowledgement, so the writer can start there
    // at once instead of a round trip later, when the reply says how much
    // more it has: the bytes between are sent twice (the gateway skips
    // them), which is why this is done only when they are few. The
    // gateway reads nothing from a leg before it has authenticated it.
    let cut = route.cut.child_token();
    let early = start == LegStart::Rewind
        && generation > 0
        && s.shared.sent_unconfirmed() <= EARLY_RESEND_MAX;
    let (mut leg, early_writer) = if early {
        split_writer(leg).map_err(|e| LegError::Path(format!("leg: {e}")))?
    } else {
        (leg, None)
    };
    // Until the reply is verified, failing ends the writer too.
    let writer_guard = early_writer.map(|w| {
        let confirmed = Offset(s.shared.peer_acked.load(Ordering::Relaxed));
        debug!(stream = %s.shared.id, generation, from = confirmed.0, unconfirmed = s.shared.sent_unconfirmed(), "leg written before its reply");
        s.shared.attach_writer(w, confirmed, start, cut.clone());
        cut.clone().drop_guard()
    });
    let reply = tokio::select! {
        r = tokio::time::timeout(timeout, read_tagged(&mut leg)) => r
            .map_err(|_| LegError::Path("gateway did not answer the leg preamble".into()))?
            .map_err(|e| LegError::Path(format!("leg preamble: {e}")))?,
        _ = route.cut.cancelled() => return Err(LegError::Path("interface went down".into())),
    };
    let tag: [u8; TAG_LEN] = reply.tag.expect("read_tagged always reads a tag");
    if !core.leg_key.verify_reply(&open_tag, &reply.bytes, &tag) {
        return Err(LegError::Path("leg reply failed authentication".into()));
    }
    match reply
        .decode()
        .map_err(|e| LegError::Path(format!("leg reply: {e}")))?
    {
        Message::LegReply {
            result: Ok(have), ..
        } => {
            match writer_guard {
                Some(guard) => {
                    guard.disarm();
                    s.shared.attach_reader(leg, cut);
                }
                None => s.shared.attach_leg(leg, have, start, cut),
            }
            *lock(&s.leg_opened) = Some(std::time::Instant::now());
            debug!(stream = %s.shared.id, generation, resume_in = received.0, resume_out = have.0, path = %route.path.name, "leg open");
            Ok(())
        }
        Message::LegReply {
            result: Err(RefuseReason::BadStream),
            detail,
        } if generation > 0 => Err(LegError::Refused(format!(
            "the gateway no longer holds the stream ({detail})"
        ))),
        Message::LegReply {
            result: Err(reason),
            detail,
        } => Err(LegError::Refused(format!(
            "gateway refused the stream: {reason}: {detail}"
        ))),
        other => Err(LegError::Path(format!(
            "unexpected leg reply type {:#04x}",
            other.ty()
        ))),
    }
}

/// The most unconfirmed bytes a stream resumed after a failure sends again
/// without waiting for the gateway to say what it holds. A new connection
/// sends about 14 KB in its first round trip (ten segments): the bytes sent
/// twice must leave most of that to new ones, or the early start gains
/// nothing (the new bytes would wait for the second round trip anyway).
const EARLY_RESEND_MAX: u64 = 8 * 1024;

/// A second descriptor of `leg`'s socket for the stream's writer, so that
/// the leg can be written while this task still reads the reply from it.
/// Out of descriptors, the leg stays whole (the writer then waits for the
/// reply, as on a first leg).
fn split_writer(leg: TcpStream) -> std::io::Result<(TcpStream, Option<std::net::TcpStream>)> {
    let leg = leg.into_std()?;
    let writer = leg.try_clone().ok();
    Ok((TcpStream::from_std(leg)?, writer))
}

async fn serve_service(shared: Arc<Shared>, name: String, listener: TcpListener) {
    let svc = shared.config.services[&name].clone();
    let remote = svc.remote_name(&name).to_owned();
    loop {
        let (app, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(service = %name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shared.shutdown.cancelled() => return,
        };
        // On a connectivity box this is a host of the LAN; the server sees
        // the gateway's address instead.
        debug!(service = %name, %peer, "application connected");
        let shared2 = shared.clone();
        let link = shared.links[&svc.gateway].clone();
        let remote = remote.clone();
        let name = name.clone();
        let app = match Moving::leave(app) {
            Ok(a) => a,
            Err(e) => {
                warn!(service = %name, %peer, "connection lost: {e}");
                continue;
            }
        };
        let thread = shared.thread_of(&link).clone();
        // The stream runs on its session's thread.
        shared.tasks.spawn_on(
            async move {
                let r = match app.arrive() {
                    Ok(app) => serve_stream(&shared2, &link, &remote, svc.compress, app).await,
                    Err(e) => Err(StreamClose::Fault(format!(
                        "cannot move to the session thread: {e}"
                    ))),
                };
                match r {
                    Ok(()) => {}
                    // The application's own reset: its business, not a fault.
                    Err(StreamClose::Local(why)) => {
                        info!(service = %name, %peer, "connection closed: {why}")
                    }
                    Err(StreamClose::Fault(why)) => {
                        warn!(service = %name, %peer, "connection closed: {why}")
                    }
                }
            },
            &thread,
        );
    }
}

/// Waits for a session with the link's gateway: a live one at once; while a
/// switch is under way, until it completes (the application only pauses).
async fn wait_core(shared: &Shared, link: &Link) -> Option<Arc<Core>> {
    let mut rx = link.state.subscribe();
    let deadline = Instant::now() + shared.config.connect_timeout;
    loop {
        if let Some(c) = lock(&link.core).clone() {
            return Some(c);
        }
        let limit = if matches!(&*rx.borrow_and_update(), LinkState::Switching(_)) {
            Instant::now() + shared.config.switch_timeout
        } else {
            deadline
        };
        match tokio::time::timeout_at(limit, rx.changed()).await {
            Ok(Ok(())) => continue,
            _ => return None,
        }
    }
}

/// Why a stream ended early.
enum StreamClose {
    /// The local application failed or reset its connection.
    Local(String),
    /// baton could not keep the stream: session gone, gateway refused, ...
    Fault(String),
}

async fn serve_stream(
    shared: &Arc<Shared>,
    link: &Arc<Link>,
    service: &str,
    compression: baton_proto::Compression,
    app: TcpStream,
) -> Result<(), StreamClose> {
    debug_assert_eq!(
        crate::shards::current_index(SESSION_THREAD),
        Some(link.thread)
    );
    let Some(core) = wait_core(shared, link).await else {
        baton_os::reset(app);
        return Err(StreamClose::Fault(format!(
            "no session with gateway {} within {:?}",
            link.gateway, shared.config.connect_timeout
        )));
    };
    let _ = baton_os::tune_relay(&app);
    let id = StreamId(core.next_stream.fetch_add(1, Ordering::Relaxed));
    let limits = StreamLimits {
        compression,
        ..shared.limits
    };
    let (st, inbox) = StreamShared::new(id, limits, core.released.child_token());
    let cs = Arc::new(ClientStream {
        shared: st.clone(),
        service: service.to_owned(),
        releg_busy: AtomicBool::new(false),
        generation: AtomicU32::new(0),
        leg_opened: Mutex::new(None),
    });
    lock(&core.streams).insert(id, cs.clone());
    debug!(stream = %id, service, "stream open");
    let end = relay(shared, &core, &cs, inbox, app).await;
    match end {
        StreamEnd::Finished => Ok(()),
        StreamEnd::Aborted if core.released.is_cancelled() => {
            Err(StreamClose::Fault("session ended".into()))
        }
        StreamEnd::Aborted => Ok(()),
        StreamEnd::LocalReset(e) => Err(StreamClose::Local(format!(
            "application connection failed: {e}"
        ))),
        other => Err(StreamClose::Fault(other.to_string())),
    }
}

/// Relays a stream registered in the session: dials its first leg (if the
/// session is up and none was dialed yet: otherwise the reconnect does),
/// runs it to its end, and keeps a finished stream's tombstone.
async fn relay(
    shared: &Arc<Shared>,
    core: &Arc<Core>,
    cs: &Arc<ClientStream>,
    inbox: StreamInbox,
    local: TcpStream,
) -> StreamEnd {
    if *core.up.borrow() && cs.generation.load(Ordering::Acquire) == 0 {
        let (shared2, core2, cs2) = (shared.clone(), core.clone(), cs.clone());
        shared
            .tasks
            .spawn(async move { releg(&shared2, &core2, &cs2, LegStart::Rewind).await });
    }
    let st = &cs.shared;
    let end = stream::run(
        local,
        st.clone(),
        inbox,
        shared.limits,
        core.to_session.clone(),
    )
    .await;
    if matches!(end, StreamEnd::Finished) {
        lock(&core.finished).push(st.tombstone());
    }
    lock(&core.streams).remove(&st.id);
    end
}
