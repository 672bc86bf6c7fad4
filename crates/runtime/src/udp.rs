//! UDP services: application datagrams relayed one for one between the
//! client agent and the gateway, roaming with the session.
//!
//! On the client agent each UDP service listens on its `listen` address;
//! every application source address is a **flow** with a [`FlowId`] of the
//! session. A flow is announced on the control connection (`FlowOpen`);
//! once the gateway answers (`FlowReply`) its datagrams cross, each in an
//! authenticated datagram of its own ([`baton_proto::datagram`]), from a
//! socket bound to the session's current interface to the gateway's UDP
//! port. The gateway sends each flow's datagrams to the service's target
//! from a socket of its own per flow, and the answers back to the address
//! the client agent's newest authenticated datagram came from: it follows
//! the client to a new interface only once a datagram from there has
//! authenticated, never before. After every (re)connection the client
//! agent announces its address with an empty datagram until the gateway
//! confirms it, so that flows that only receive roam too.
//!
//! While a flow cannot be sent on (no control connection, no confirmed
//! address, flow not yet accepted) its datagrams are held, at most
//! `[udp] hold` datagrams and `hold_bytes` bytes per flow; beyond that the
//! oldest are dropped and counted. On resume the held ones are sent. A
//! flow with no datagram either way for `idle_timeout` is removed on the
//! side that notices, which tells the other (`FlowClose`). Sessions keep
//! their flows while detached: time without a path does not count as idle
//! on the gateway.
//!
//! UDP client services (server → client) use the same flows the other way
//! round: the gateway's socket for the service, on the agent's assigned
//! address, reads servers' datagrams; each server address is a flow that
//! the **gateway** opens (`FlowOpen` to the agent, an id with
//! [`FlowId::GATEWAY`] set), and the agent answers (`FlowReply`) once it has
//! a socket connected to the service's target. From there on the flow's
//! datagrams cross, are held, roam and expire like any other; the target's
//! answers go back to the server from the service's socket.
//!
//! Every socket operation under the state locks is non-blocking
//! (a send that fails at once): one slow socket never stalls the others, and a datagram
//! that cannot be sent at once is held, never waited for.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_proto::datagram::{Header, HoldQueue, Kind, ReplayWindow, MAX_DATAGRAM, MAX_PAYLOAD};
use baton_proto::{FlowEnd, FlowId, LegKey, Message, RefuseReason, Role};
use serde::Serialize;
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::{ClientConfig, GatewayConfig, HostPort, Protocol, UdpConfig};
use crate::path::Path;
use crate::util::{lock, sid};

/// Socket buffers asked for on relaying UDP sockets: a burst (a flush of
/// held datagrams, a switch) must not overflow the kernel's default
/// ~200 KiB and be lost without a count.
const SOCKET_BUFFER: usize = 4 << 20;
/// How long a replaced client socket keeps reading after the gateway
/// confirmed the new address: what it sent to the old one is still on its
/// way.
const LINGER: Duration = Duration::from_secs(1);
/// How long a replaced client socket keeps reading at most.
const RETIRE_AFTER: Duration = Duration::from_secs(10);
/// Announce retry period and count (a lost announce must not leave a flow
/// that only receives behind on the old address).
const ANNOUNCE_EVERY: Duration = Duration::from_millis(200);
const ANNOUNCE_TRIES: u32 = 50;

/// Sets large socket buffers; the kernel caps them at its `rmem_max` and
/// `wmem_max`, which is still better than its default.
pub(crate) fn tune(socket: &UdpSocket) {
    let s = SockRef::from(socket);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
}

/// Sends at once or fails (`WouldBlock` when the socket buffer is full).
/// The system call is made directly: tokio's `try_send` answers
/// `WouldBlock` without trying until its reactor has seen the socket
/// writable, which for a socket opened a moment ago (a new route, a new
/// flow) it has not.
fn send_now(socket: &UdpSocket, d: &[u8]) -> io::Result<usize> {
    SockRef::from(socket).send(d)
}

/// [`send_now`] to `to`.
fn send_to_now(socket: &UdpSocket, d: &[u8], to: SocketAddr) -> io::Result<usize> {
    SockRef::from(socket).send_to(d, &to.into())
}

/// Checks the timers this often: a quarter of the idle timeout is soon
/// enough to expire, and announce retries need at least [`ANNOUNCE_EVERY`].
fn tick_period(config: &UdpConfig) -> Duration {
    (config.idle_timeout / 4).clamp(Duration::from_millis(10), ANNOUNCE_EVERY)
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Receives datagrams on a connected `socket` until `stop`, handing each to `on_datagram`.
/// The buffer holds one byte more than `max`: a datagram that fills it was larger (the kernel
/// truncates to the buffer) and is refused where it is handled. A receive error reports an
/// earlier send (ICMP: port closed, no route): `on_error` logs it, and a short pause keeps a
/// stream of them from spinning.
async fn receive_until(
    socket: &UdpSocket,
    stop: &CancellationToken,
    max: usize,
    mut on_datagram: impl FnMut(&[u8]),
    on_error: impl Fn(io::Error),
) {
    let mut buf = vec![0u8; max + 1];
    loop {
        let r = tokio::select! {
            r = socket.recv(&mut buf) => r,
            _ = stop.cancelled() => return,
        };
        match r {
            Ok(n) => on_datagram(&buf[..n]),
            Err(e) => {
                on_error(e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Resolves a flow's `target` and opens a socket of the flow's own, connected to it, within
/// `limit`; none if `stop` fires first. The error is the detail a refusal carries.
async fn open_target(
    target: &HostPort,
    limit: Duration,
    stop: &CancellationToken,
) -> Option<Result<(UdpSocket, SocketAddr), String>> {
    let connect = async {
        let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
        Ok::<_, io::Error>((flow_socket(addr)?, addr))
    };
    let r = tokio::select! {
        r = tokio::time::timeout(limit, connect) => r,
        _ = stop.cancelled() => return None,
    };
    Some(match r {
        Ok(Ok(x)) => Ok(x),
        Ok(Err(e)) => Err(format!("{target}: {e}")),
        Err(_) => Err(format!("{target}: not resolved within {limit:?}")),
    })
}

/// Seals a datagram with the next sequence number of `seq`.
fn seal(
    kind: Kind,
    session_id: u64,
    flow: FlowId,
    seq: &mut u64,
    sender: Role,
    payload: &[u8],
    key: &LegKey,
) -> Vec<u8> {
    *seq += 1;
    let mut out = Vec::new();
    Header {
        kind,
        session_id,
        flow,
        seq: *seq,
    }
    .seal(sender, payload, key, &mut out)
    .expect("payloads are checked against MAX_PAYLOAD when they arrive");
    out
}

// ---------------------------------------------------------------------
// Client agent
// ---------------------------------------------------------------------

/// One UDP flow of the client agent, for `baton status`.
#[derive(Debug, Clone, Serialize)]
pub struct UdpFlowStatus {
    /// The gateway's name.
    pub gateway: String,
    /// Service name.
    pub service: String,
    /// Flow id within the session.
    pub flow: u32,
    /// The application's address (the flow's source).
    pub app: SocketAddr,
    /// `opening` (waiting for the gateway's answer) or `open`.
    pub state: &'static str,
    /// Datagrams taken from the application.
    pub from_app: u64,
    /// Of those, datagrams sent to the gateway.
    pub sent: u64,
    /// Datagrams from the gateway delivered to the application.
    pub received: u64,
    /// Datagrams dropped because the hold bound was reached.
    pub dropped: u64,
    /// Datagrams held now, waiting for a path.
    pub held: usize,
    /// Since the last datagram either way, in ms.
    pub idle_ms: u64,
}

/// One UDP service of the client agent, with counters since start.
#[derive(Debug, Clone, Serialize)]
pub struct UdpServiceStatus {
    /// The gateway's name.
    pub gateway: String,
    /// Service name.
    pub service: String,
    /// Where applications send.
    pub listen: SocketAddr,
    /// Live flows.
    pub flows: usize,
    /// Flows started.
    pub flows_opened: u64,
    /// Flows removed here after the idle timeout.
    pub flows_expired: u64,
    /// Flows closed by the gateway (its idle timeout, or unknown there).
    pub flows_closed: u64,
    /// Flows the gateway refused.
    pub flows_refused: u64,
    /// Datagrams taken from applications.
    pub from_app: u64,
    /// Datagrams sent to the gateway.
    pub sent: u64,
    /// Of those, datagrams that waited in the hold queue first (switch, no
    /// path, flow not yet accepted).
    pub delayed: u64,
    /// Datagrams delivered to applications.
    pub received: u64,
    /// Datagrams dropped: hold bound reached, or still held when their flow
    /// ended.
    pub dropped: u64,
    /// Datagrams too large to relay, dropped.
    pub too_large: u64,
    /// Datagrams of new flows dropped because `udp.max_flows` flows exist.
    pub over_max_flows: u64,
    /// Datagrams the application's socket would not take.
    pub send_errors: u64,
}

/// The UDP side of the session with one gateway.
#[derive(Debug, Clone, Serialize)]
pub struct UdpLinkStatus {
    /// The gateway's name.
    pub gateway: String,
    /// The interface the datagrams leave from.
    pub interface: Option<String>,
    /// The local address of the socket datagrams leave from.
    pub local_addr: Option<SocketAddr>,
    /// The gateway confirmed it follows this address (announce answered).
    pub address_confirmed: bool,
    /// Datagrams that failed authentication, ignored.
    pub forged: u64,
    /// Authenticated datagrams already received (or too old), ignored.
    pub replayed: u64,
    /// Datagrams for flows this agent no longer holds.
    pub unknown_flow: u64,
}

/// One UDP client service of the client agent (server → client), with
/// counters since start.
#[derive(Debug, Clone, Serialize)]
pub struct ExposedUdpStatus {
    /// The gateway's name.
    pub gateway: String,
    /// Service name (as the gateway knows it).
    pub service: String,
    /// Where the service really runs, on this side.
    pub target: String,
    /// Live flows (one per server address at the gateway).
    pub flows: usize,
    /// Flows the gateway opened.
    pub flows_opened: u64,
    /// Flows removed here after the idle timeout.
    pub flows_expired: u64,
    /// Flows closed by the gateway (its idle timeout).
    pub flows_closed: u64,
    /// Flows refused here (target unresolvable, too many flows).
    pub flows_refused: u64,
    /// Datagrams from the gateway's side delivered to the target.
    pub received: u64,
    /// Datagrams from the target.
    pub from_target: u64,
    /// Of those, datagrams sent to the gateway.
    pub sent: u64,
    /// Of those, datagrams that waited in the hold queue first.
    pub delayed: u64,
    /// Datagrams from the target dropped: hold bound reached, or still held
    /// when their flow ended.
    pub dropped: u64,
    /// Datagrams from the target too large to relay, dropped.
    pub too_large: u64,
    /// Datagrams the target's socket would not take.
    pub send_errors: u64,
}

/// One flow of a UDP client service at the client agent.
#[derive(Debug, Clone, Serialize)]
pub struct ExposedFlowStatus {
    /// The gateway's name.
    pub gateway: String,
    /// Service name.
    pub service: String,
    /// Flow id within the session (2^31 or more: opened by the gateway).
    pub flow: u32,
    /// The target's address.
    pub target: SocketAddr,
    /// Datagrams from the gateway's side delivered to the target.
    pub received: u64,
    /// Datagrams from the target.
    pub from_target: u64,
    /// Of those, sent to the gateway.
    pub sent: u64,
    /// Of those, dropped at the hold bound.
    pub dropped: u64,
    /// Held now, waiting for a path.
    pub held: usize,
    /// Since the last datagram either way, in ms.
    pub idle_ms: u64,
}

/// UDP services, flows and counters of the client agent, for `baton status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UdpStatus {
    /// Per service.
    pub services: Vec<UdpServiceStatus>,
    /// Per live flow.
    pub flows: Vec<UdpFlowStatus>,
    /// Per gateway.
    pub gateways: Vec<UdpLinkStatus>,
    /// Per UDP client service.
    pub exposed: Vec<ExposedUdpStatus>,
    /// Per live flow of a UDP client service.
    pub exposed_flows: Vec<ExposedFlowStatus>,
}

#[derive(Debug, Default)]
struct ServiceCounters {
    flows_opened: AtomicU64,
    flows_expired: AtomicU64,
    flows_closed: AtomicU64,
    flows_refused: AtomicU64,
    from_app: AtomicU64,
    out: OutCounters,
    received: AtomicU64,
    too_large: AtomicU64,
    over_max_flows: AtomicU64,
    send_errors: AtomicU64,
}

#[derive(Debug, Default)]
struct ExposedCounters {
    flows_opened: AtomicU64,
    flows_expired: AtomicU64,
    flows_closed: AtomicU64,
    flows_refused: AtomicU64,
    received: AtomicU64,
    from_target: AtomicU64,
    out: OutCounters,
    too_large: AtomicU64,
    send_errors: AtomicU64,
}

/// What a service's flows (of either kind) sent towards the gateway, sent late (held
/// first), and dropped.
#[derive(Debug, Default)]
struct OutCounters {
    sent: AtomicU64,
    delayed: AtomicU64,
    dropped: AtomicU64,
}

/// A UDP client service through this gateway: servers beside the gateway
/// send to this agent's address there, and each server address is a flow
/// that the gateway opens.
#[derive(Debug)]
struct ExposedUdp {
    name: String,
    target: HostPort,
    counters: ExposedCounters,
}

#[derive(Debug)]
struct UdpService {
    name: String,
    /// The name the gateway knows it by.
    remote: String,
    socket: Arc<UdpSocket>,
    listen: SocketAddr,
    counters: ServiceCounters,
}

/// The UDP services that go through one gateway, and their flows.
#[derive(Debug)]
pub(crate) struct ClientUdp {
    gateway: String,
    config: UdpConfig,
    connect_timeout: Duration,
    services: Vec<UdpService>,
    exposed: Vec<ExposedUdp>,
    state: Mutex<ClientState>,
    forged: AtomicU64,
    replayed: AtomicU64,
    unknown_flow: AtomicU64,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct ClientState {
    session: Option<ClientSession>,
    route: Option<RouteSocket>,
    /// Replaced sockets still reading what was sent to them.
    retiring: Vec<CancellationToken>,
    flows: HashMap<FlowId, ClientFlow>,
    by_app: HashMap<(usize, SocketAddr), FlowId>,
    next_flow: u32,
    /// Flows of client services, opened by the gateway.
    exposed_flows: HashMap<FlowId, ExposedFlow>,
    /// Client service flows whose target is being resolved, with their session.
    exposed_opening: HashMap<FlowId, u64>,
}

impl ClientState {
    fn flow_count(&self) -> usize {
        self.flows.len() + self.exposed_flows.len() + self.exposed_opening.len()
    }
}

#[derive(Debug)]
struct ClientSession {
    id: u64,
    key: LegKey,
    seq: u64,
    window: ReplayWindow,
    /// The control connection attached now, if any (closed once it ends).
    control: Option<UnboundedSender<Message>>,
    /// The session is established on the current route: data may go. Set
    /// as soon as a handshake succeeds (before the control connection's
    /// own start-up), cleared when the path is lost.
    live: bool,
    /// The gateway answered an announce since the session's last route.
    confirmed: bool,
    announces: u32,
}

impl ClientSession {
    /// Sends on the control connection; a message lost here is repeated
    /// by [`ClientUdp::attach`] (FlowOpen) or harmless (FlowClose: the
    /// gateway's own idle timeout ends the flow).
    fn tell(&self, msg: Message) {
        if let Some(c) = &self.control {
            let _ = c.send(msg);
        }
    }
}

#[derive(Debug)]
struct RouteSocket {
    socket: Arc<UdpSocket>,
    path: String,
    gateway_addr: SocketAddr,
    stop: CancellationToken,
}

#[derive(Debug)]
struct ClientFlow {
    id: FlowId,
    service: usize,
    app: SocketAddr,
    /// The gateway accepted the flow in this session.
    open: bool,
    out: Outbound,
    last: Instant,
    from_app: u64,
    received: u64,
}

/// A flow of a UDP client service: one server's datagrams, to and from the
/// service's target.
#[derive(Debug)]
struct ExposedFlow {
    service: usize,
    /// Connected to the target: only its answers are read.
    socket: Arc<UdpSocket>,
    target: SocketAddr,
    stop: CancellationToken,
    out: Outbound,
    last: Instant,
    received: u64,
    from_target: u64,
}

/// A flow's datagrams towards the gateway, of either kind (an application's, a client
/// service's): sent at once when they can be, held otherwise.
#[derive(Debug)]
struct Outbound {
    hold: HoldQueue,
    sent: u64,
    dropped: u64,
}

impl Outbound {
    fn new(config: &UdpConfig) -> Outbound {
        Outbound {
            hold: HoldQueue::new(config.hold, config.hold_bytes),
            sent: 0,
            dropped: 0,
        }
    }

    /// A datagram of flow `id`: sent at once if the flow `may_send`, the session is live
    /// on a route and nothing older is held (order is kept); held otherwise, the oldest
    /// dropped beyond the bounds. Counts here and in `c`, the service's.
    fn send(
        &mut self,
        id: FlowId,
        payload: &[u8],
        may_send: bool,
        session: &mut Option<ClientSession>,
        route: &Option<RouteSocket>,
        c: &OutCounters,
    ) {
        if let (true, Some(session), Some(route)) =
            (may_send && self.hold.is_empty(), session, route)
        {
            if session.live {
                let d = seal(
                    Kind::Data,
                    session.id,
                    id,
                    &mut session.seq,
                    Role::Client,
                    payload,
                    &session.key,
                );
                if send_now(&route.socket, &d).is_ok() {
                    self.sent += 1;
                    inc(&c.sent);
                    return;
                }
            }
        }
        let dropped = self.hold.push(payload.to_vec());
        self.dropped += dropped;
        add(&c.dropped, dropped);
    }

    /// Sends what flow `id` holds, oldest first, while the route's socket takes it; the
    /// rest stays held.
    fn flush(
        &mut self,
        id: FlowId,
        session: &mut ClientSession,
        route: &RouteSocket,
        c: &OutCounters,
    ) {
        let mut failed = false;
        for payload in self.hold.take() {
            if !failed {
                let d = seal(
                    Kind::Data,
                    session.id,
                    id,
                    &mut session.seq,
                    Role::Client,
                    &payload,
                    &session.key,
                );
                if send_now(&route.socket, &d).is_ok() {
                    self.sent += 1;
                    inc(&c.sent);
                    inc(&c.delayed);
                    continue;
                }
                failed = true;
            }
            let dropped = self.hold.push(payload);
            self.dropped += dropped;
            add(&c.dropped, dropped);
        }
    }

    /// The flow ends: what it still holds counts as dropped.
    fn discard(&mut self, c: &OutCounters) {
        let held = self.hold.take().len() as u64;
        self.dropped += held;
        add(&c.dropped, held);
    }
}

/// A socket for datagrams to `gateway` out of `path`, bound the way legs
/// are (device, source address).
fn route_socket(path: &Path, gateway: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(
        Domain::for_address(gateway),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    if let Some(dev) = &path.device {
        // Without CAP_NET_RAW the routing table chooses, as for legs.
        if let Err(e) = s.bind_device(Some(dev.as_bytes())) {
            if e.kind() != io::ErrorKind::PermissionDenied {
                return Err(io::Error::new(
                    e.kind(),
                    format!("bind udp socket to {dev}: {e}"),
                ));
            }
        }
    }
    if let Some(src) = path.source {
        s.bind(&SocketAddr::new(src, 0).into())
            .map_err(|e| io::Error::new(e.kind(), format!("bind udp socket to {src}: {e}")))?;
    }
    // Connected: only the gateway's address is read from.
    s.connect(&gateway.into())?;
    let s = UdpSocket::from_std(s.into())?;
    tune(&s);
    Ok(s)
}

impl ClientUdp {
    /// Binds the UDP services of `config` that go through `gateway`.
    pub(crate) async fn bind(
        gateway: &str,
        config: &ClientConfig,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> io::Result<Arc<Self>> {
        let exposed = config
            .exposed
            .iter()
            .filter(|(_, e)| e.protocol == Protocol::Udp && e.gateway == gateway)
            .map(|(name, e)| ExposedUdp {
                name: name.clone(),
                target: e.target.clone(),
                counters: ExposedCounters::default(),
            })
            .collect();
        let mut services = Vec::new();
        for (name, svc) in &config.services {
            if svc.protocol != Protocol::Udp || svc.gateway != gateway {
                continue;
            }
            let socket = UdpSocket::bind(svc.listen).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("service {name}: cannot listen on udp {}: {e}", svc.listen),
                )
            })?;
            tune(&socket);
            let listen = socket.local_addr()?;
            services.push(UdpService {
                name: name.clone(),
                remote: svc.remote_name(name).to_owned(),
                socket: Arc::new(socket),
                listen,
                counters: ServiceCounters::default(),
            });
        }
        Ok(Arc::new(Self {
            gateway: gateway.to_owned(),
            config: config.udp.clone(),
            connect_timeout: config.connect_timeout,
            services,
            exposed,
            state: Mutex::new(ClientState::default()),
            forged: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            unknown_flow: AtomicU64::new(0),
            tasks,
            shutdown,
        }))
    }

    /// Where each service listens.
    pub(crate) fn service_addrs(&self) -> impl Iterator<Item = (String, SocketAddr)> + '_ {
        self.services.iter().map(|s| (s.name.clone(), s.listen))
    }

    /// Neither UDP services nor UDP client services go through this
    /// gateway: nothing to do.
    fn unused(&self) -> bool {
        self.services.is_empty() && self.exposed.is_empty()
    }

    /// Starts reading the services' sockets and the timers.
    pub(crate) fn start(self: &Arc<Self>) {
        if self.unused() {
            return;
        }
        for i in 0..self.services.len() {
            info!(service = %self.services[i].name, addr = %self.services[i].listen, "udp service listening");
            self.tasks.spawn(self.clone().read_app(i));
        }
        self.tasks.spawn(self.clone().ticker());
    }

    async fn read_app(self: Arc<Self>, i: usize) {
        let socket = self.services[i].socket.clone();
        // One byte more than a relayable payload: a datagram that fills it
        // was larger (the kernel truncates to the buffer).
        let mut buf = vec![0u8; MAX_PAYLOAD + 1];
        loop {
            let r = tokio::select! {
                r = socket.recv_from(&mut buf) => r,
                _ = self.shutdown.cancelled() => return,
            };
            match r {
                Ok((n, from)) => self.on_app_datagram(i, from, &buf[..n]),
                // ICMP errors of earlier sends to applications: nothing to do.
                Err(e) => debug!(service = %self.services[i].name, "udp receive: {e}"),
            }
        }
    }

    async fn ticker(self: Arc<Self>) {
        let mut every = tokio::time::interval(tick_period(&self.config));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.tick(),
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Session `id` is established (first connection, resume after a
    /// failure, or planned switch) on `path` to `gateway_addr`: datagrams
    /// leave from there from now on, held ones first.
    pub(crate) fn route(
        self: &Arc<Self>,
        id: u64,
        key: &LegKey,
        path: &Path,
        gateway_addr: SocketAddr,
    ) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        match &mut st.session {
            Some(s) if s.id == id => {}
            _ => {
                // A new session: the gateway knows none of the flows.
                st.session = Some(ClientSession {
                    id,
                    key: key.clone(),
                    seq: 0,
                    window: ReplayWindow::default(),
                    control: None,
                    live: false,
                    confirmed: false,
                    announces: 0,
                });
                for f in st.flows.values_mut() {
                    f.open = false;
                }
                // The gateway opened those in the session that is gone:
                // a server that goes on sending opens them again.
                st.exposed_opening.clear();
                for (_, f) in st.exposed_flows.drain() {
                    self.end_exposed(f);
                }
            }
        }
        if self.unused() {
            // The session is known only to refuse what the gateway opens (a
            // client service it takes for UDP): no socket, no announces.
            return;
        }
        let same = st
            .route
            .as_ref()
            .is_some_and(|r| r.path == path.name && r.gateway_addr == gateway_addr);
        if !same {
            match route_socket(path, gateway_addr) {
                Ok(socket) => {
                    let socket = Arc::new(socket);
                    let stop = self.shutdown.child_token();
                    self.tasks
                        .spawn(self.clone().read_gateway(socket.clone(), stop.clone()));
                    debug!(gateway = %self.gateway, path = %path.name, local = ?socket.local_addr().ok(), "udp datagrams move to a new socket");
                    let new = RouteSocket {
                        socket,
                        path: path.name.clone(),
                        gateway_addr,
                        stop,
                    };
                    if let Some(old) = st.route.replace(new) {
                        st.retiring.push(old.stop.clone());
                        self.stop_after(old.stop, RETIRE_AFTER);
                    }
                }
                Err(e) => {
                    warn!(gateway = %self.gateway, path = %path.name, "cannot open a udp socket: {e}; datagrams are held");
                    return;
                }
            }
        }
        let ClientState {
            session: Some(session),
            route: Some(route),
            flows,
            exposed_flows,
            ..
        } = st
        else {
            return;
        };
        session.live = true;
        session.confirmed = false;
        session.announces = 0;
        announce(session, route);
        for f in flows.values_mut().filter(|f| f.open) {
            self.flush(f, session, route);
        }
        // Time without a path is not idleness: the gateway held the
        // servers' datagrams meanwhile.
        let now = Instant::now();
        for (id, f) in exposed_flows.iter_mut() {
            f.last = now;
            self.flush_exposed(*id, f, session, route);
        }
    }

    /// The session's control connection is up: flow messages go there.
    pub(crate) fn attach(&self, id: u64, control: UnboundedSender<Message>) {
        let mut st = lock(&self.state);
        let ClientState {
            session: Some(session),
            flows,
            ..
        } = &mut *st
        else {
            return;
        };
        if session.id != id {
            return;
        }
        session.control = Some(control);
        // Idempotent on the gateway: flows it holds go on, others are
        // opened again (the session is new, or a message was lost).
        for (id, f) in flows.iter() {
            session.tell(Message::FlowOpen {
                flow: *id,
                service: self.services[f.service].remote.clone(),
            });
        }
    }

    /// The path is lost: datagrams are held until the next [`Self::route`].
    pub(crate) fn detach(&self) {
        if let Some(s) = &mut lock(&self.state).session {
            s.live = false;
            s.control = None;
        }
    }

    /// Stops a replaced socket's reader after `after` (or at shutdown).
    fn stop_after(&self, stop: CancellationToken, after: Duration) {
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(after) => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
    }

    /// A UDP control message from the gateway.
    pub(crate) fn on_control(self: &Arc<Self>, msg: Message) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        match msg {
            Message::FlowOpen { flow, service } => self.on_flow_open(st, flow, service),
            Message::FlowClose { flow, why } if flow.is_gateway_opened() => {
                if let Some(f) = st.exposed_flows.remove(&flow) {
                    let svc = &self.exposed[f.service];
                    inc(&svc.counters.flows_closed);
                    debug!(service = %svc.name, %flow, ?why, "udp client service flow closed by the gateway");
                    self.end_exposed(f);
                }
            }
            Message::FlowReply {
                flow,
                result: Ok(()),
                ..
            } => {
                let Some(f) = st.flows.get_mut(&flow) else {
                    return;
                };
                f.open = true;
                if let (Some(session), Some(route)) = (&mut st.session, &st.route) {
                    if session.live {
                        self.flush(f, session, route);
                    }
                }
            }
            Message::FlowReply {
                flow,
                result: Err(reason),
                detail,
            } => {
                if let Some(f) = self.remove(st, flow) {
                    let svc = &self.services[f.service];
                    inc(&svc.counters.flows_refused);
                    warn!(service = %svc.name, app = %f.app, "gateway refused the udp flow: {reason}: {detail}");
                }
            }
            Message::FlowClose { flow, why } => {
                if let Some(f) = self.remove(st, flow) {
                    let svc = &self.services[f.service];
                    inc(&svc.counters.flows_closed);
                    debug!(service = %svc.name, %flow, ?why, "udp flow closed by the gateway");
                }
            }
            other => debug!(
                "ignoring control message {:#04x} on the udp side",
                other.ty()
            ),
        }
    }

    /// The gateway opens a flow of a client service (a server sent to it):
    /// open a socket to the service's target, then say so.
    fn on_flow_open(self: &Arc<Self>, st: &mut ClientState, flow: FlowId, service: String) {
        let Some(session) = &st.session else { return };
        let refuse = |reason: RefuseReason, detail: String| {
            warn!(gateway = %self.gateway, service = %service, %flow, "udp client service flow refused: {reason}: {detail}");
            session.tell(Message::FlowReply {
                flow,
                result: Err(reason),
                detail,
            });
        };
        if !flow.is_gateway_opened() {
            refuse(
                RefuseReason::BadStream,
                format!("flow {flow} is an id of the agent's space"),
            );
            return;
        }
        let Some(i) = self.exposed.iter().position(|e| e.name == service) else {
            let detail = format!("this agent exposes no udp client service {service:?} through this gateway (exposed.{service}.protocol must be \"udp\" on both sides)");
            refuse(RefuseReason::ServiceNotAllowed, detail);
            return;
        };
        if let Some(f) = st.exposed_flows.get(&flow) {
            // Sent again after a reconnect: the flow goes on.
            if f.service == i {
                session.tell(Message::FlowReply {
                    flow,
                    result: Ok(()),
                    detail: String::new(),
                });
            } else {
                refuse(
                    RefuseReason::BadStream,
                    format!(
                        "flow {flow} belongs to client service {:?}",
                        self.exposed[f.service].name
                    ),
                );
            }
            return;
        }
        if st.exposed_opening.contains_key(&flow) {
            return;
        }
        if st.flow_count() >= self.config.max_flows {
            inc(&self.exposed[i].counters.flows_refused);
            refuse(
                RefuseReason::CapacityFull,
                format!(
                    "the session holds its maximum of {} udp flows",
                    self.config.max_flows
                ),
            );
            return;
        }
        let session_id = session.id;
        st.exposed_opening.insert(flow, session_id);
        self.tasks
            .spawn(self.clone().open_exposed(flow, i, session_id));
    }

    async fn open_exposed(self: Arc<Self>, flow: FlowId, i: usize, session_id: u64) {
        let Some(r) = open_target(
            &self.exposed[i].target,
            self.connect_timeout,
            &self.shutdown,
        )
        .await
        else {
            return;
        };
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        // The session changed meanwhile: the gateway that asked is gone.
        if st.exposed_opening.get(&flow) != Some(&session_id) {
            return;
        }
        st.exposed_opening.remove(&flow);
        let Some(session) = st.session.as_ref().filter(|s| s.id == session_id) else {
            return;
        };
        let svc = &self.exposed[i];
        let (socket, addr) = match r {
            Ok(x) => x,
            Err(detail) => {
                inc(&svc.counters.flows_refused);
                warn!(service = %svc.name, "udp client service flow refused: {detail}");
                session.tell(Message::FlowReply {
                    flow,
                    result: Err(RefuseReason::TargetUnreachable),
                    detail,
                });
                return;
            }
        };
        let socket = Arc::new(socket);
        let stop = self.shutdown.child_token();
        st.exposed_flows.insert(
            flow,
            ExposedFlow {
                service: i,
                socket: socket.clone(),
                target: addr,
                stop: stop.clone(),
                out: Outbound::new(&self.config),
                last: Instant::now(),
                received: 0,
                from_target: 0,
            },
        );
        inc(&svc.counters.flows_opened);
        debug!(service = %svc.name, %flow, target = %addr, "udp client service flow open");
        session.tell(Message::FlowReply {
            flow,
            result: Ok(()),
            detail: String::new(),
        });
        drop(guard);
        self.tasks
            .spawn(self.clone().read_exposed_target(flow, socket, stop));
    }

    async fn read_exposed_target(
        self: Arc<Self>,
        flow: FlowId,
        socket: Arc<UdpSocket>,
        stop: CancellationToken,
    ) {
        let on_error = |e: io::Error| {
            // The target's port is closed (ICMP): the server's business, as it would be
            // without baton.
            debug!(gateway = %self.gateway, %flow, "udp receive from client service target: {e}");
        };
        receive_until(
            &socket,
            &stop,
            MAX_PAYLOAD,
            |d| self.on_exposed_target_datagram(flow, d),
            on_error,
        )
        .await;
    }

    /// A datagram from a client service's target, for the server of `flow`.
    fn on_exposed_target_datagram(&self, flow: FlowId, payload: &[u8]) {
        let mut guard = lock(&self.state);
        let ClientState {
            session,
            route,
            exposed_flows,
            ..
        } = &mut *guard;
        let Some(f) = exposed_flows.get_mut(&flow) else {
            return;
        };
        let c = &self.exposed[f.service].counters;
        if payload.len() > MAX_PAYLOAD {
            inc(&c.too_large);
            return;
        }
        f.last = Instant::now();
        f.from_target += 1;
        inc(&c.from_target);
        // The gateway opened the flow: it takes its datagrams.
        f.out.send(flow, payload, true, session, route, &c.out);
    }

    /// Sends what a client service's flow holds, oldest first; what cannot
    /// be sent stays held.
    fn flush_exposed(
        &self,
        id: FlowId,
        f: &mut ExposedFlow,
        session: &mut ClientSession,
        route: &RouteSocket,
    ) {
        f.out
            .flush(id, session, route, &self.exposed[f.service].counters.out);
    }

    /// A client service's flow is gone: its reader stops, what it held
    /// counts as dropped.
    fn end_exposed(&self, mut f: ExposedFlow) {
        f.stop.cancel();
        f.out.discard(&self.exposed[f.service].counters.out);
    }

    /// Removes a flow; what it still held counts as dropped.
    fn remove(&self, st: &mut ClientState, id: FlowId) -> Option<ClientFlow> {
        let mut f = st.flows.remove(&id)?;
        st.by_app.remove(&(f.service, f.app));
        f.out.discard(&self.services[f.service].counters.out);
        Some(f)
    }

    fn on_app_datagram(&self, i: usize, from: SocketAddr, payload: &[u8]) {
        let svc = &self.services[i];
        inc(&svc.counters.from_app);
        if payload.len() > MAX_PAYLOAD {
            inc(&svc.counters.too_large);
            return;
        }
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let id = match st.by_app.get(&(i, from)) {
            Some(id) => *id,
            None => {
                if st.flow_count() >= self.config.max_flows {
                    inc(&svc.counters.over_max_flows);
                    return;
                }
                // The gateway's space (top bit) is never used here.
                let id = loop {
                    st.next_flow = st.next_flow.wrapping_add(1) & !FlowId::GATEWAY;
                    let id = FlowId(st.next_flow);
                    if id.0 != 0 && !st.flows.contains_key(&id) {
                        break id;
                    }
                };
                let flow = ClientFlow {
                    id,
                    service: i,
                    app: from,
                    open: false,
                    out: Outbound::new(&self.config),
                    last: Instant::now(),
                    from_app: 0,
                    received: 0,
                };
                st.flows.insert(id, flow);
                st.by_app.insert((i, from), id);
                inc(&svc.counters.flows_opened);
                debug!(service = %svc.name, app = %from, flow = %id, "udp flow starts");
                if let Some(s) = &st.session {
                    s.tell(Message::FlowOpen {
                        flow: id,
                        service: svc.remote.clone(),
                    });
                }
                id
            }
        };
        let ClientState {
            session,
            route,
            flows,
            ..
        } = st;
        let Some(f) = flows.get_mut(&id) else { return };
        f.last = Instant::now();
        f.from_app += 1;
        // Until the gateway accepts the flow its datagrams are held.
        f.out
            .send(id, payload, f.open, session, route, &svc.counters.out);
    }

    /// Sends what `f` holds, oldest first; what cannot be sent stays held.
    fn flush(&self, f: &mut ClientFlow, session: &mut ClientSession, route: &RouteSocket) {
        f.out
            .flush(f.id, session, route, &self.services[f.service].counters.out);
    }

    fn on_gateway_datagram(&self, bytes: &[u8]) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let Some(session) = &mut st.session else {
            return;
        };
        let Some((h, payload)) = Header::open(bytes, &session.key, Role::Gateway) else {
            inc(&self.forged);
            return;
        };
        if h.session_id != session.id {
            inc(&self.forged);
            return;
        }
        if session.window.accept(h.seq).is_err() {
            inc(&self.replayed);
            return;
        }
        match h.kind {
            Kind::Announce => {
                if !session.confirmed {
                    session.confirmed = true;
                    for stop in st.retiring.drain(..) {
                        self.stop_after(stop, LINGER);
                    }
                }
            }
            Kind::Data if h.flow.is_gateway_opened() => {
                let Some(f) = st.exposed_flows.get_mut(&h.flow) else {
                    inc(&self.unknown_flow);
                    session.tell(Message::FlowClose {
                        flow: h.flow,
                        why: FlowEnd::Unknown,
                    });
                    return;
                };
                f.last = Instant::now();
                let c = &self.exposed[f.service].counters;
                if send_now(&f.socket, payload).is_ok() {
                    f.received += 1;
                    inc(&c.received);
                } else {
                    inc(&c.send_errors);
                }
            }
            Kind::Data => {
                let Some(f) = st.flows.get_mut(&h.flow) else {
                    inc(&self.unknown_flow);
                    session.tell(Message::FlowClose {
                        flow: h.flow,
                        why: FlowEnd::Unknown,
                    });
                    return;
                };
                f.last = Instant::now();
                let svc = &self.services[f.service];
                if send_to_now(&svc.socket, payload, f.app).is_ok() {
                    f.received += 1;
                    inc(&svc.counters.received);
                } else {
                    inc(&svc.counters.send_errors);
                }
            }
        }
    }

    async fn read_gateway(self: Arc<Self>, socket: Arc<UdpSocket>, stop: CancellationToken) {
        let on_error = |e: io::Error| {
            // An ICMP error of an earlier send (gateway port closed, no route): the control
            // connection judges the path.
            debug!(gateway = %self.gateway, "udp receive: {e}");
        };
        receive_until(
            &socket,
            &stop,
            MAX_DATAGRAM,
            |d| self.on_gateway_datagram(d),
            on_error,
        )
        .await;
    }

    fn tick(&self) {
        let now = Instant::now();
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let idle: Vec<FlowId> = st
            .flows
            .iter()
            .filter(|(_, f)| now.duration_since(f.last) >= self.config.idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(f) = self.remove(st, id) {
                let svc = &self.services[f.service];
                inc(&svc.counters.flows_expired);
                debug!(service = %svc.name, app = %f.app, flow = %id, "udp flow idle: removed");
                if let Some(s) = &st.session {
                    s.tell(Message::FlowClose {
                        flow: id,
                        why: FlowEnd::Idle,
                    });
                }
            }
        }
        // As on the gateway, a client service's flow is idle only while the
        // session has a path: without one the gateway holds its datagrams.
        let live = st.session.as_ref().is_some_and(|s| s.live);
        let idle: Vec<FlowId> = st
            .exposed_flows
            .iter()
            .filter(|(_, f)| live && now.duration_since(f.last) >= self.config.idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(f) = st.exposed_flows.remove(&id) {
                let svc = &self.exposed[f.service];
                inc(&svc.counters.flows_expired);
                debug!(service = %svc.name, flow = %id, "udp client service flow idle: removed");
                self.end_exposed(f);
                if let Some(s) = &st.session {
                    s.tell(Message::FlowClose {
                        flow: id,
                        why: FlowEnd::Idle,
                    });
                }
            }
        }
        let ClientState {
            session: Some(session),
            route: Some(route),
            flows,
            exposed_flows,
            ..
        } = st
        else {
            return;
        };
        if !session.live {
            return;
        }
        if !session.confirmed && session.announces < ANNOUNCE_TRIES {
            announce(session, route);
        }
        // Datagrams that a full socket buffer sent back to the queue.
        for f in flows
            .values_mut()
            .filter(|f| f.open && !f.out.hold.is_empty())
        {
            self.flush(f, session, route);
        }
        for (id, f) in exposed_flows
            .iter_mut()
            .filter(|(_, f)| !f.out.hold.is_empty())
        {
            self.flush_exposed(*id, f, session, route);
        }
    }

    /// Status of this gateway's UDP services and flows.
    pub(crate) fn status(&self, out: &mut UdpStatus) {
        let st = lock(&self.state);
        let now = Instant::now();
        for (i, s) in self.services.iter().enumerate() {
            let c = &s.counters;
            out.services.push(UdpServiceStatus {
                gateway: self.gateway.clone(),
                service: s.name.clone(),
                listen: s.listen,
                flows: st.flows.values().filter(|f| f.service == i).count(),
                flows_opened: get(&c.flows_opened),
                flows_expired: get(&c.flows_expired),
                flows_closed: get(&c.flows_closed),
                flows_refused: get(&c.flows_refused),
                from_app: get(&c.from_app),
                sent: get(&c.out.sent),
                delayed: get(&c.out.delayed),
                received: get(&c.received),
                dropped: get(&c.out.dropped),
                too_large: get(&c.too_large),
                over_max_flows: get(&c.over_max_flows),
                send_errors: get(&c.send_errors),
            });
        }
        for (id, f) in &st.flows {
            out.flows.push(UdpFlowStatus {
                gateway: self.gateway.clone(),
                service: self.services[f.service].name.clone(),
                flow: id.0,
                app: f.app,
                state: if f.open { "open" } else { "opening" },
                from_app: f.from_app,
                sent: f.out.sent,
                received: f.received,
                dropped: f.out.dropped,
                held: f.out.hold.len(),
                idle_ms: now.duration_since(f.last).as_millis() as u64,
            });
        }
        for (i, e) in self.exposed.iter().enumerate() {
            let c = &e.counters;
            out.exposed.push(ExposedUdpStatus {
                gateway: self.gateway.clone(),
                service: e.name.clone(),
                target: e.target.to_string(),
                flows: st.exposed_flows.values().filter(|f| f.service == i).count(),
                flows_opened: get(&c.flows_opened),
                flows_expired: get(&c.flows_expired),
                flows_closed: get(&c.flows_closed),
                flows_refused: get(&c.flows_refused),
                received: get(&c.received),
                from_target: get(&c.from_target),
                sent: get(&c.out.sent),
                delayed: get(&c.out.delayed),
                dropped: get(&c.out.dropped),
                too_large: get(&c.too_large),
                send_errors: get(&c.send_errors),
            });
        }
        for (id, f) in &st.exposed_flows {
            out.exposed_flows.push(ExposedFlowStatus {
                gateway: self.gateway.clone(),
                service: self.exposed[f.service].name.clone(),
                flow: id.0,
                target: f.target,
                received: f.received,
                from_target: f.from_target,
                sent: f.out.sent,
                dropped: f.out.dropped,
                held: f.out.hold.len(),
                idle_ms: now.duration_since(f.last).as_millis() as u64,
            });
        }
        if !self.unused() {
            out.gateways.push(UdpLinkStatus {
                gateway: self.gateway.clone(),
                interface: st.route.as_ref().map(|r| r.path.clone()),
                local_addr: st.route.as_ref().and_then(|r| r.socket.local_addr().ok()),
                address_confirmed: st.session.as_ref().is_some_and(|s| s.confirmed && s.live),
                forged: get(&self.forged),
                replayed: get(&self.replayed),
                unknown_flow: get(&self.unknown_flow),
            });
        }
    }
}

fn announce(session: &mut ClientSession, route: &RouteSocket) {
    session.announces += 1;
    let d = seal(
        Kind::Announce,
        session.id,
        FlowId(0),
        &mut session.seq,
        Role::Client,
        &[],
        &session.key,
    );
    let _ = send_now(&route.socket, &d);
}

// ---------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------

/// The gateway's UDP counters since start, over all sessions. Flows of UDP
/// client services count here too, their servers standing for targets.
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Flows opened (by client agents, and for servers of client services).
    pub flows_opened: AtomicU64,
    /// Flows refused (service not allowed, too many flows, target
    /// unreachable; for a client service: refused by the client agent).
    pub flows_refused: AtomicU64,
    /// Flows removed here after the idle timeout.
    pub flows_expired: AtomicU64,
    /// Flows closed by their client agent.
    pub flows_closed: AtomicU64,
    /// Datagrams from client agents sent on to targets (or servers).
    pub from_client: AtomicU64,
    /// Datagrams from targets (or servers of client services).
    pub from_target: AtomicU64,
    /// Datagrams sent to client agents.
    pub to_client: AtomicU64,
    /// Of those, datagrams that waited in the hold queue first (client
    /// switching, address not yet confirmed, client service flow not yet
    /// accepted by the agent).
    pub delayed: AtomicU64,
    /// Datagrams from targets dropped: hold bound reached while the client
    /// was away, or still held when the flow or session ended; or sent to a
    /// client service that the agent does not serve over UDP.
    pub dropped: AtomicU64,
    /// Datagrams that failed authentication, ignored.
    pub forged: AtomicU64,
    /// Authenticated datagrams already received (or too old), ignored.
    pub replayed: AtomicU64,
    /// Datagrams for flows the gateway does not hold.
    pub unknown_flow: AtomicU64,
    /// Datagrams from targets too large to relay.
    pub too_large: AtomicU64,
    /// Datagrams a target's socket would not take.
    pub send_errors: AtomicU64,
    /// Datagrams of servers to a client service dropped because their flow
    /// would pass `udp.max_flows`.
    pub over_max_flows: AtomicU64,
}

/// Who opened a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The client agent: an application's datagrams to a UDP service.
    Agent,
    /// The gateway: a server's datagrams to a UDP client service.
    Gateway,
}

/// One UDP flow at the gateway.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayFlowStatus {
    /// The client agent's id.
    pub client: String,
    /// The session id.
    pub session: String,
    /// Flow id within the session.
    pub flow: u32,
    /// Service name (a client service's for flows the gateway opened).
    pub service: String,
    /// `agent` (a UDP service's flow) or `gateway` (a UDP client service's:
    /// a server sent to the agent's address).
    pub opened_by: Origin,
    /// `opening` (a client service's flow the agent has not accepted yet:
    /// datagrams are held) or `open`.
    pub state: &'static str,
    /// The target's address; for a client service, the server's.
    pub target: SocketAddr,
    /// Where the session's datagrams go: the address of the client agent's
    /// newest authenticated datagram.
    pub client_addr: Option<SocketAddr>,
    /// Sent to the client now; otherwise datagrams are held.
    pub sending: bool,
    /// Datagrams from the client agent sent to the target.
    pub from_client: u64,
    /// Datagrams from the target.
    pub from_target: u64,
    /// Of those, sent to the client agent.
    pub to_client: u64,
    /// Of those, dropped at the hold bound.
    pub dropped: u64,
    /// Held now.
    pub held: usize,
    /// Since the last datagram either way, in ms.
    pub idle_ms: u64,
}

/// Unknown flows reported to a client per tick, at most.
const MAX_TOLD: usize = 64;

/// The UDP flows of one gateway session.
#[derive(Debug)]
pub(crate) struct SessionUdp {
    id: u64,
    client: String,
    key: LegKey,
    /// The UDP services this client may use, with their targets.
    services: HashMap<String, HostPort>,
    /// The UDP client services this client may expose.
    exposed: HashSet<String>,
    config: UdpConfig,
    connect_timeout: Duration,
    stats: Arc<UdpStats>,
    state: Mutex<GatewayState>,
    tasks: TaskTracker,
    released: CancellationToken,
}

#[derive(Debug, Default)]
struct GatewayState {
    control: Option<UnboundedSender<Message>>,
    /// Counts control connections; `confirmed == attachments` once a
    /// datagram from the client authenticated on the current one.
    attachments: u64,
    confirmed: u64,
    peer: Option<(Arc<UdpSocket>, SocketAddr)>,
    seq: u64,
    window: ReplayWindow,
    flows: HashMap<FlowId, GatewayFlow>,
    opening: HashSet<FlowId>,
    /// Flows of client services, by service and server address.
    by_server: HashMap<String, HashMap<SocketAddr, FlowId>>,
    /// Last flow id allocated here (without [`FlowId::GATEWAY`]).
    next_flow: u32,
    /// Client services the agent said it does not serve over UDP (its
    /// configuration differs): their datagrams are dropped for the rest of
    /// the session instead of asking again for every one.
    not_served: HashSet<String>,
    /// Unknown flows already told to the client since the last tick.
    told_unknown: HashSet<FlowId>,
}

impl GatewayState {
    fn attached(&self) -> bool {
        self.control.as_ref().is_some_and(|c| !c.is_closed())
    }

    /// Datagrams go out only to an address confirmed since the client's
    /// current control connection: after a switch the old one is stale.
    fn sending(&self) -> bool {
        self.attached() && self.confirmed == self.attachments && self.peer.is_some()
    }

    fn tell(&self, msg: Message) {
        if let Some(c) = &self.control {
            let _ = c.send(msg);
        }
    }

    /// Removes a flow and stops what reads for it; what it held is
    /// returned, to be counted as dropped.
    fn remove(&mut self, id: FlowId) -> Option<(GatewayFlow, u64)> {
        let mut f = self.flows.remove(&id)?;
        f.stop.cancel();
        if f.origin == Origin::Gateway {
            if let Some(m) = self.by_server.get_mut(&f.service) {
                m.remove(&f.target);
            }
        }
        let held = f.hold.take().len() as u64;
        Some((f, held))
    }
}

#[derive(Debug)]
struct GatewayFlow {
    service: String,
    origin: Origin,
    /// An agent's flow: a socket of its own, connected to the target. A
    /// client service's flow: the service's socket, shared by its flows.
    socket: Arc<UdpSocket>,
    /// The target; for a client service's flow, the server.
    target: SocketAddr,
    /// The client agent takes the flow's datagrams (always, for its own).
    open: bool,
    /// Stops the flow's reader (an agent's flow); for a client service's,
    /// fires when the service stops listening.
    stop: CancellationToken,
    hold: HoldQueue,
    last: Instant,
    from_client: u64,
    from_target: u64,
    to_client: u64,
    dropped: u64,
}

impl GatewayFlow {
    /// Sends a datagram of the client agent to the gateway's side.
    fn send(&self, payload: &[u8]) -> io::Result<usize> {
        match self.origin {
            Origin::Agent => send_now(&self.socket, payload),
            Origin::Gateway => send_to_now(&self.socket, payload, self.target),
        }
    }
}

/// A socket of the gateway's own for one flow, connected to `target`.
fn flow_socket(target: SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    let any: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    s.bind(&any.into())?;
    s.connect(&target.into())?;
    let s = UdpSocket::from_std(s.into())?;
    tune(&s);
    Ok(s)
}

impl SessionUdp {
    /// The UDP side of a new session of `client`, which may use `allowed`;
    /// its flows' tasks go on `tasks`.
    pub(crate) fn new(
        config: &GatewayConfig,
        client: &str,
        allowed: &[String],
        id: u64,
        key: LegKey,
        stats: Arc<UdpStats>,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        let services = allowed
            .iter()
            .filter_map(|name| {
                config
                    .services
                    .get(name)
                    .filter(|s| s.protocol == Protocol::Udp)
                    .map(|s| (name.clone(), s.target.clone()))
            })
            .collect();
        let exposed = config
            .clients
            .get(client)
            .map(|c| {
                c.exposes
                    .iter()
                    .filter(|n| {
                        config
                            .exposed
                            .get(*n)
                            .is_some_and(|e| e.protocol == Protocol::Udp)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        Arc::new(Self {
            id,
            client: client.to_owned(),
            key,
            services,
            exposed,
            config: config.udp.clone(),
            connect_timeout: config.connect_timeout,
            stats,
            state: Mutex::new(GatewayState::default()),
            tasks,
            released: CancellationToken::new(),
        })
    }

    /// Runs the timers until `released` (then every flow ends). A client
    /// with no UDP service nor UDP client service never has a flow: nothing
    /// to run.
    pub(crate) fn start(self: &Arc<Self>, released: CancellationToken) {
        if self.services.is_empty() && self.exposed.is_empty() {
            return;
        }
        let me = self.clone();
        self.tasks.spawn(async move {
            let mut every = tokio::time::interval(tick_period(&me.config));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => me.tick(),
                    _ = released.cancelled() => break,
                }
            }
            // Flow tasks and flows still opening end with the session.
            me.released.cancel();
            let mut st = lock(&me.state);
            st.by_server.clear();
            for (_, mut f) in st.flows.drain() {
                f.stop.cancel();
                add(&me.stats.dropped, f.hold.take().len() as u64);
            }
        });
    }

    /// A control connection of the session is up: replies go there, and
    /// datagrams wait until the client's address is confirmed on it.
    pub(crate) fn attach(&self, control: UnboundedSender<Message>) {
        let mut st = lock(&self.state);
        st.control = Some(control);
        st.attachments += 1;
        // Time without a control connection is not idleness: the client
        // agent may have held datagrams all along.
        let now = Instant::now();
        for f in st.flows.values_mut() {
            f.last = now;
        }
        // Idempotent on the agent: the flows of client services it holds go
        // on, the others it opens (its answer may have been lost).
        for (id, f) in st.flows.iter().filter(|(_, f)| f.origin == Origin::Gateway) {
            st.tell(Message::FlowOpen {
                flow: *id,
                service: f.service.clone(),
            });
        }
    }

    /// A UDP control message from the client agent.
    pub(crate) fn on_control(self: &Arc<Self>, msg: Message) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        match msg {
            Message::FlowOpen { flow, service } => {
                let refuse = |st: &GatewayState, reason: RefuseReason, detail: String| {
                    inc(&self.stats.flows_refused);
                    warn!(client = %self.client, service = %service, %flow, "udp flow refused: {reason}: {detail}");
                    st.tell(Message::FlowReply {
                        flow,
                        result: Err(reason),
                        detail,
                    });
                };
                if flow.is_gateway_opened() {
                    refuse(
                        st,
                        RefuseReason::BadStream,
                        format!("flow {flow}: ids with the top bit set are the gateway's"),
                    );
                    return;
                }
                if let Some(f) = st.flows.get(&flow) {
                    // Sent again after a reconnect: the flow goes on.
                    if f.service == service {
                        st.tell(Message::FlowReply {
                            flow,
                            result: Ok(()),
                            detail: String::new(),
                        });
                    } else {
                        refuse(
                            st,
                            RefuseReason::BadStream,
                            format!("flow {flow} belongs to service {:?}", f.service),
                        );
                    }
                    return;
                }
                if st.opening.contains(&flow) {
                    return;
                }
                let Some(target) = self.services.get(&service).cloned() else {
                    refuse(
                        st,
                        RefuseReason::ServiceNotAllowed,
                        format!("no udp service {service:?} for this client"),
                    );
                    return;
                };
                if st.flows.len() + st.opening.len() >= self.config.max_flows {
                    refuse(
                        st,
                        RefuseReason::CapacityFull,
                        format!(
                            "the session holds its maximum of {} udp flows",
                            self.config.max_flows
                        ),
                    );
                    return;
                }
                st.opening.insert(flow);
                self.tasks
                    .spawn(self.clone().open_flow(flow, service, target));
            }
            // The agent's answer about a client service's flow.
            Message::FlowReply {
                flow,
                result: Ok(()),
                ..
            } => {
                let Some(f) = st
                    .flows
                    .get_mut(&flow)
                    .filter(|f| f.origin == Origin::Gateway)
                else {
                    return;
                };
                if !f.open {
                    f.open = true;
                    debug!(client = %self.client, service = %f.service, %flow, server = %f.target, "udp client service flow accepted by the agent");
                    self.flush_all(st);
                }
            }
            Message::FlowReply {
                flow,
                result: Err(reason),
                detail,
            } => {
                if !flow.is_gateway_opened() {
                    return;
                }
                if let Some((f, held)) = st.remove(flow) {
                    add(&self.stats.dropped, held);
                    inc(&self.stats.flows_refused);
                    warn!(client = %self.client, service = %f.service, server = %f.target, "the client agent refused the udp client service flow: {reason}: {detail}");
                    if reason == RefuseReason::ServiceNotAllowed {
                        st.not_served.insert(f.service);
                    }
                }
            }
            Message::FlowClose { flow, why } => {
                if let Some((f, held)) = st.remove(flow) {
                    add(&self.stats.dropped, held);
                    inc(&self.stats.flows_closed);
                    debug!(client = %self.client, %flow, service = %f.service, ?why, "udp flow closed by the client");
                }
            }
            other => debug!(
                "ignoring control message {:#04x} on the udp side",
                other.ty()
            ),
        }
    }

    async fn open_flow(self: Arc<Self>, flow: FlowId, service: String, target: HostPort) {
        let Some(r) = open_target(&target, self.connect_timeout, &self.released).await else {
            return;
        };
        let mut st = lock(&self.state);
        st.opening.remove(&flow);
        let (socket, addr) = match r {
            Ok(x) => x,
            Err(detail) => {
                inc(&self.stats.flows_refused);
                warn!(client = %self.client, %service, "udp flow refused: {detail}");
                st.tell(Message::FlowReply {
                    flow,
                    result: Err(RefuseReason::TargetUnreachable),
                    detail,
                });
                return;
            }
        };
        let socket = Arc::new(socket);
        let stop = self.released.child_token();
        let f = self.new_flow(
            service.clone(),
            Origin::Agent,
            socket.clone(),
            addr,
            stop.clone(),
        );
        st.flows.insert(flow, f);
        inc(&self.stats.flows_opened);
        debug!(client = %self.client, %service, %flow, target = %addr, "udp flow open");
        st.tell(Message::FlowReply {
            flow,
            result: Ok(()),
            detail: String::new(),
        });
        drop(st);
        self.tasks
            .spawn(self.clone().read_target(flow, socket, stop));
    }

    fn new_flow(
        &self,
        service: String,
        origin: Origin,
        socket: Arc<UdpSocket>,
        target: SocketAddr,
        stop: CancellationToken,
    ) -> GatewayFlow {
        GatewayFlow {
            service,
            origin,
            socket,
            target,
            open: origin == Origin::Agent,
            stop,
            hold: HoldQueue::new(self.config.hold, self.config.hold_bytes),
            last: Instant::now(),
            from_client: 0,
            from_target: 0,
            to_client: 0,
            dropped: 0,
        }
    }

    async fn read_target(
        self: Arc<Self>,
        flow: FlowId,
        socket: Arc<UdpSocket>,
        stop: CancellationToken,
    ) {
        let on_error = |e: io::Error| {
            // The target's port is closed (ICMP): the application's business, as it would
            // be without baton.
            debug!(client = %self.client, %flow, "udp receive from target: {e}");
        };
        receive_until(
            &socket,
            &stop,
            MAX_PAYLOAD,
            |d| self.on_target_datagram(flow, d),
            on_error,
        )
        .await;
    }

    fn on_target_datagram(&self, flow: FlowId, payload: &[u8]) {
        if payload.len() > MAX_PAYLOAD {
            inc(&self.stats.too_large);
            return;
        }
        let mut guard = lock(&self.state);
        self.to_client(&mut guard, flow, payload);
    }

    /// A datagram of `flow` from the gateway's side: sent to the client
    /// agent at once if the flow can send and holds nothing older, held
    /// otherwise.
    fn to_client(&self, st: &mut GatewayState, flow: FlowId, payload: &[u8]) {
        let sending = st.sending();
        let GatewayState {
            peer, seq, flows, ..
        } = st;
        let Some(f) = flows.get_mut(&flow) else {
            return;
        };
        f.last = Instant::now();
        f.from_target += 1;
        inc(&self.stats.from_target);
        if let (true, Some((socket, addr))) =
            (sending && f.open && f.hold.is_empty(), peer.as_ref())
        {
            let d = seal(
                Kind::Data,
                self.id,
                flow,
                seq,
                Role::Gateway,
                payload,
                &self.key,
            );
            if send_to_now(socket, &d, *addr).is_ok() {
                f.to_client += 1;
                inc(&self.stats.to_client);
                return;
            }
        }
        let dropped = f.hold.push(payload.to_vec());
        f.dropped += dropped;
        add(&self.stats.dropped, dropped);
    }

    /// A datagram that the server at `from` sent to this client's UDP client
    /// service `service`, received on the service's `socket` (`stop` fires
    /// when it stops listening). A new server address is a new flow, which
    /// the client agent is told about; its datagrams are held until the
    /// agent accepts it.
    pub(crate) fn on_server_datagram(
        &self,
        service: &str,
        socket: &Arc<UdpSocket>,
        stop: &CancellationToken,
        from: SocketAddr,
        payload: &[u8],
    ) {
        if payload.len() > MAX_PAYLOAD {
            inc(&self.stats.too_large);
            return;
        }
        if !self.exposed.contains(service) {
            return;
        }
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        if st.not_served.contains(service) {
            inc(&self.stats.dropped);
            return;
        }
        let known = st
            .by_server
            .get(service)
            .and_then(|m| m.get(&from))
            .copied();
        let id = match known {
            Some(id) => id,
            None => {
                if st.flows.len() + st.opening.len() >= self.config.max_flows {
                    inc(&self.stats.over_max_flows);
                    return;
                }
                let id = loop {
                    st.next_flow = st.next_flow.wrapping_add(1) & !FlowId::GATEWAY;
                    let id = FlowId(FlowId::GATEWAY | st.next_flow);
                    if st.next_flow != 0 && !st.flows.contains_key(&id) {
                        break id;
                    }
                };
                let f = self.new_flow(
                    service.to_owned(),
                    Origin::Gateway,
                    socket.clone(),
                    from,
                    stop.child_token(),
                );
                st.flows.insert(id, f);
                st.by_server
                    .entry(service.to_owned())
                    .or_default()
                    .insert(from, id);
                inc(&self.stats.flows_opened);
                debug!(client = %self.client, service, flow = %id, server = %from, "udp client service flow starts");
                st.tell(Message::FlowOpen {
                    flow: id,
                    service: service.to_owned(),
                });
                id
            }
        };
        self.to_client(st, id, payload);
    }

    /// A datagram from the client agent, as received on `socket` from `from`.
    pub(crate) fn on_datagram(&self, socket: &Arc<UdpSocket>, from: SocketAddr, bytes: &[u8]) {
        let Some((h, payload)) = Header::open(bytes, &self.key, Role::Client) else {
            inc(&self.stats.forged);
            return;
        };
        if h.session_id != self.id {
            inc(&self.stats.forged);
            return;
        }
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        let newest = match st.window.accept(h.seq) {
            Ok(n) => n,
            Err(_) => {
                inc(&self.stats.replayed);
                return;
            }
        };
        if newest {
            // Only the newest datagram moves the address: a late one from
            // the old path never takes the flows back there.
            if st.peer.as_ref().is_none_or(|(_, a)| *a != from) {
                debug!(client = %self.client, session = %sid(self.id), addr = %from, "udp datagrams follow the client to a new address");
            }
            st.peer = Some((socket.clone(), from));
            if st.attached() && st.confirmed != st.attachments {
                st.confirmed = st.attachments;
                self.flush_all(st);
            }
        }
        match h.kind {
            Kind::Announce => {
                if newest {
                    let ack = seal(
                        Kind::Announce,
                        self.id,
                        FlowId(0),
                        &mut st.seq,
                        Role::Gateway,
                        &[],
                        &self.key,
                    );
                    let _ = send_to_now(socket, &ack, from);
                }
            }
            Kind::Data => {
                let Some(f) = st.flows.get_mut(&h.flow) else {
                    inc(&self.stats.unknown_flow);
                    // Bounded: an authenticated client naming many unknown
                    // flows must not grow this set.
                    if !st.opening.contains(&h.flow)
                        && st.told_unknown.len() < MAX_TOLD
                        && st.told_unknown.insert(h.flow)
                    {
                        st.tell(Message::FlowClose {
                            flow: h.flow,
                            why: FlowEnd::Unknown,
                        });
                    }
                    return;
                };
                f.last = Instant::now();
                if f.send(payload).is_ok() {
                    f.from_client += 1;
                    inc(&self.stats.from_client);
                } else {
                    inc(&self.stats.send_errors);
                }
            }
        }
    }

    /// Sends what every open flow holds, oldest first, while it can.
    fn flush_all(&self, st: &mut GatewayState) {
        if !st.sending() {
            return;
        }
        let GatewayState {
            peer: Some((socket, addr)),
            seq,
            flows,
            ..
        } = st
        else {
            return;
        };
        for (id, f) in flows
            .iter_mut()
            .filter(|(_, f)| f.open && !f.hold.is_empty())
        {
            let mut failed = false;
            for payload in f.hold.take() {
                if !failed {
                    let d = seal(
                        Kind::Data,
                        self.id,
                        *id,
                        seq,
                        Role::Gateway,
                        &payload,
                        &self.key,
                    );
                    if send_to_now(socket, &d, *addr).is_ok() {
                        f.to_client += 1;
                        inc(&self.stats.to_client);
                        inc(&self.stats.delayed);
                        continue;
                    }
                    failed = true;
                }
                let dropped = f.hold.push(payload);
                f.dropped += dropped;
                add(&self.stats.dropped, dropped);
            }
        }
    }

    fn tick(&self) {
        let mut guard = lock(&self.state);
        let st = &mut *guard;
        st.told_unknown.clear();
        // A client service that stopped listening (its owner, a later
        // session of the client, was released) ends its flows here too.
        let unheard: Vec<FlowId> = st
            .flows
            .iter()
            .filter(|(_, f)| f.origin == Origin::Gateway && f.stop.is_cancelled())
            .map(|(id, _)| *id)
            .collect();
        for id in unheard {
            if let Some((_, held)) = st.remove(id) {
                add(&self.stats.dropped, held);
            }
        }
        // While the client agent is away its flows wait for it: idleness
        // counts only with a control connection up.
        if !st.attached() {
            return;
        }
        let now = Instant::now();
        let idle: Vec<FlowId> = st
            .flows
            .iter()
            .filter(|(_, f)| now.duration_since(f.last) >= self.config.idle_timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some((f, held)) = st.remove(id) {
                add(&self.stats.dropped, held);
                inc(&self.stats.flows_expired);
                debug!(client = %self.client, flow = %id, service = %f.service, "udp flow idle: removed");
                st.tell(Message::FlowClose {
                    flow: id,
                    why: FlowEnd::Idle,
                });
            }
        }
        self.flush_all(st);
    }

    /// The session's flows.
    pub(crate) fn status(&self, out: &mut Vec<GatewayFlowStatus>) {
        let st = lock(&self.state);
        let now = Instant::now();
        for (id, f) in &st.flows {
            out.push(GatewayFlowStatus {
                client: self.client.clone(),
                session: sid(self.id),
                flow: id.0,
                service: f.service.clone(),
                opened_by: f.origin,
                state: if f.open { "open" } else { "opening" },
                target: f.target,
                client_addr: st.peer.as_ref().map(|(_, a)| *a),
                sending: st.sending(),
                from_client: f.from_client,
                from_target: f.from_target,
                to_client: f.to_client,
                dropped: f.dropped,
                held: f.hold.len(),
                idle_ms: now.duration_since(f.last).as_millis() as u64,
            });
        }
    }
}
