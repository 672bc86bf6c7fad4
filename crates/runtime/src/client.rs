//! The client agent: keeps a session with each configured gateway, listens
//! for applications on each service's address, and relays every accepted
//! connection over a leg to the service's gateway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use ring::rand::SystemRandom;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use baton_proto::wire::{ConnKind, Preface, TAG_LEN};
use baton_proto::{
    ClientHandshake, ClientKey, ControlCipher, LegKey, Liveness, LivenessAction, Message, Offset, RefuseReason,
    Role, StreamId,
};

use crate::config::{ClientConfig, HostPort};
use crate::frame::{read_tagged, FrameCodec};
use crate::relay::{relay, Counters, RelayEnd};

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
            Self::Refused { reason: RefuseReason::UnknownClient | RefuseReason::BadProof | RefuseReason::Version, .. }
        )
    }
}

/// The state of the session with one gateway.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// Connecting (first time or after a failure).
    Connecting,
    /// The session is up.
    Up(Arc<LiveSession>),
    /// The last attempt failed; retrying after a pause.
    Failed(SessionError),
}

/// A session that is up.
#[derive(Debug)]
pub struct LiveSession {
    /// The gateway's id for the session.
    pub id: u64,
    /// The gateway address the control connection reached.
    pub gateway_addr: SocketAddr,
    leg_key: LegKey,
    next_stream: AtomicU64,
    control: mpsc::Sender<Message>,
    ended: CancellationToken,
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
    links: HashMap<String, watch::Sender<LinkState>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Client {
    /// Binds every service listener and starts the sessions. Stops when
    /// `shutdown` fires, sending DISCONNECT to every gateway first.
    pub async fn start(config: ClientConfig, key: ClientKey, shutdown: CancellationToken) -> std::io::Result<Self> {
        let mut listeners = Vec::new();
        for (name, svc) in &config.services {
            let l = TcpListener::bind(svc.listen).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("service {name}: cannot listen on {}: {e}", svc.listen))
            })?;
            listeners.push((name.clone(), l));
        }
        let links = config.gateways.keys().map(|g| (g.clone(), watch::channel(LinkState::Connecting).0)).collect();
        let shared = Arc::new(Shared { config, key, rng: SystemRandom::new(), links, shutdown, tasks: TaskTracker::new() });
        for name in shared.config.gateways.keys() {
            shared.tasks.spawn(maintain_link(shared.clone(), name.clone()));
        }
        let mut service_addrs = HashMap::new();
        for (name, l) in listeners {
            service_addrs.insert(name.clone(), l.local_addr()?);
            info!(service = %name, addr = %l.local_addr()?, "service listening");
            shared.tasks.spawn(serve_service(shared.clone(), name, l));
        }
        Ok(Self { shared, service_addrs })
    }

    /// Where a service listens (useful with port 0).
    pub fn service_addr(&self, service: &str) -> Option<SocketAddr> {
        self.service_addrs.get(service).copied()
    }

    /// The current state of the session with `gateway`.
    pub fn link_state(&self, gateway: &str) -> Option<LinkState> {
        self.shared.links.get(gateway).map(|tx| tx.borrow().clone())
    }

    /// Waits until the session with `gateway` is up, or its first attempt
    /// fails permanently.
    pub async fn wait_up(&self, gateway: &str) -> Result<Arc<LiveSession>, SessionError> {
        let tx = self.shared.links.get(gateway).ok_or_else(|| SessionError::Protocol(format!("no gateway {gateway}")))?;
        let mut rx = tx.subscribe();
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

    /// Waits until every task has ended after shutdown.
    pub async fn wait(&self) {
        self.shared.shutdown.cancelled().await;
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

/// Keeps a session with one gateway up: connects, runs it, and reconnects
/// with a growing pause when it fails.
async fn maintain_link(shared: Arc<Shared>, gateway: String) {
    let tx = &shared.links[&gateway];
    let addresses = shared.config.gateways[&gateway].addresses.clone();
    let mut backoff = Duration::from_millis(100);
    loop {
        tx.send_replace(LinkState::Connecting);
        let result = tokio::select! {
            r = connect_session(&shared, &addresses) => r,
            _ = shared.shutdown.cancelled() => return,
        };
        match result {
            Ok((session, control)) => {
                backoff = Duration::from_millis(100);
                info!(gateway = %gateway, addr = %session.session.gateway_addr, session = format_args!("{:016x}", session.session.id), "session up");
                tx.send_replace(LinkState::Up(session.session.clone()));
                let why = run_control(&shared, session, control).await;
                if shared.shutdown.is_cancelled() {
                    return;
                }
                warn!(gateway = %gateway, "session lost: {why}");
                tx.send_replace(LinkState::Failed(SessionError::Unreachable(why)));
            }
            Err(e) => {
                let pause = if e.is_permanent() { Duration::from_secs(30) } else { backoff };
                warn!(gateway = %gateway, "session failed: {e}; retrying in {pause:?}");
                tx.send_replace(LinkState::Failed(e));
                backoff = (backoff * 2).min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shared.shutdown.cancelled() => return,
                }
            }
        }
    }
}

struct Established {
    session: Arc<LiveSession>,
    cipher: ControlCipher,
    keepalive: Duration,
    inactivity: Duration,
    outgoing: mpsc::Receiver<Message>,
}

async fn connect_session(
    shared: &Shared,
    addresses: &[HostPort],
) -> Result<(Established, TcpStream), SessionError> {
    let mut last = String::from("no address");
    for addr in addresses {
        match handshake(shared, addr).await {
            Ok(x) => return Ok(x),
            Err(SessionError::Unreachable(e)) => last = format!("{addr}: {e}"),
            Err(e) => return Err(e),
        }
    }
    Err(SessionError::Unreachable(last))
}

async fn handshake(shared: &Shared, addr: &HostPort) -> Result<(Established, TcpStream), SessionError> {
    let unreachable = |e: std::io::Error| SessionError::Unreachable(e.to_string());
    let timeout = shared.config.connect_timeout;
    let mut stream = tokio::time::timeout(timeout, TcpStream::connect((addr.host.as_str(), addr.port)))
        .await
        .map_err(|_| SessionError::Unreachable("connect timed out".into()))?
        .map_err(unreachable)?;
    let gateway_addr = stream.peer_addr().map_err(unreachable)?;
    let _ = stream.set_nodelay(true);
    let (hs, first) = ClientHandshake::start(&shared.config.id, &shared.key, &shared.rng)
        .map_err(|e| SessionError::Protocol(e.to_string()))?;
    stream.write_all(&first).await.map_err(unreachable)?;

    let (r, mut w) = stream.split();
    let mut frames = FramedRead::new(r, FrameCodec::default());
    let mut next = async || -> Result<crate::frame::RawFrame, SessionError> {
        match tokio::time::timeout(timeout, frames.next()).await {
            Err(_) => Err(SessionError::Unreachable("handshake timed out".into())),
            Ok(None) => Err(SessionError::Unreachable("gateway closed the connection".into())),
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
        return Err(refused(challenge.decode().map_err(|e| SessionError::Protocol(e.to_string()))?));
    }
    let (session_id, keys, auth) =
        hs.on_challenge(&challenge.bytes).map_err(|e| SessionError::Protocol(e.to_string()))?;
    w.write_all(&auth).await.map_err(unreachable)?;
    let reply = next().await?;
    let mut cipher = ControlCipher::new(&keys, Role::Client);
    let (keepalive_ms, inactivity_ms) = if reply.tag.is_some() {
        match reply.open(&mut cipher).map_err(|e| SessionError::Protocol(e.to_string()))? {
            Message::Accepted { session_id: sid, keepalive_ms, inactivity_ms } if sid == session_id => {
                (keepalive_ms, inactivity_ms)
            }
            other => return Err(SessionError::Protocol(format!("unexpected message type {:#04x}", other.ty()))),
        }
    } else {
        return Err(refused(reply.decode().map_err(|e| SessionError::Protocol(e.to_string()))?));
    };
    if !frames.read_buffer().is_empty() {
        return Err(SessionError::Protocol("unexpected bytes after Accepted".into()));
    }
    drop(frames);
    let keepalive = shared.config.keepalive.min(Duration::from_millis(u64::from(keepalive_ms.max(100))));
    let (control, outgoing) = mpsc::channel(256);
    let session = Arc::new(LiveSession {
        id: session_id,
        gateway_addr,
        leg_key: keys.leg_key(),
        next_stream: AtomicU64::new(0),
        control,
        ended: shared.shutdown.child_token(),
    });
    let inactivity = Duration::from_millis(u64::from(inactivity_ms.max(1000)));
    Ok((Established { session, cipher, keepalive, inactivity, outgoing }, stream))
}

/// Runs an established control connection until it fails or the client
/// shuts down; returns why it ended.
async fn run_control(shared: &Shared, est: Established, mut stream: TcpStream) -> String {
    let Established { session, mut cipher, keepalive, inactivity, mut outgoing } = est;
    let (r, mut w) = stream.split();
    let mut frames = FramedRead::new(r, FrameCodec { keyed: true });
    let mut liveness = Liveness::new(Instant::now().into_std(), Some(keepalive), inactivity);
    let mut out = Vec::new();
    let why = loop {
        out.clear();
        let deadline = Instant::from_std(liveness.poll_timeout());
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {
                match liveness.handle_timeout(Instant::now().into_std()) {
                    Some(LivenessAction::SendPing(seq)) => cipher.seal(&Message::Ping { seq }, &mut out),
                    Some(LivenessAction::Expired) => break "gateway silent".to_owned(),
                    None => {}
                }
            }
            f = frames.next() => {
                let frame = match f {
                    None => break "gateway closed the control connection".to_owned(),
                    Some(Err(e)) => break format!("control connection: {e}"),
                    Some(Ok(f)) => f,
                };
                match frame.open(&mut cipher) {
                    Ok(Message::Pong { .. }) => {}
                    Ok(Message::Ping { seq }) => cipher.seal(&Message::Pong { seq }, &mut out),
                    Ok(Message::StreamReset { stream, code }) => debug!(%stream, ?code, "stream reset by gateway"),
                    Ok(other) => break format!("unexpected message type {:#04x}", other.ty()),
                    Err(e) => break format!("control connection: {e}"),
                }
                liveness.on_receive(Instant::now().into_std());
            }
            Some(msg) = outgoing.recv() => cipher.seal(&msg, &mut out),
            _ = shared.shutdown.cancelled() => {
                cipher.seal(&Message::Disconnect, &mut out);
                if w.write_all(&out).await.is_ok() {
                    // Wait briefly for the acknowledgement so the gateway has
                    // released the session before this process exits.
                    let ack = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(Ok(f)) = frames.next().await {
                            if matches!(f.open(&mut cipher), Ok(Message::DisconnectAck)) {
                                return true;
                            }
                        }
                        false
                    });
                    if matches!(ack.await, Ok(true)) {
                        info!(session = format_args!("{:016x}", session.id), "session disconnected");
                    }
                }
                session.ended.cancel();
                return "client shut down".to_owned();
            }
        }
        if !out.is_empty() {
            if let Err(e) = w.write_all(&out).await {
                break format!("control connection: {e}");
            }
        }
    };
    // Streams already relaying keep their legs; new streams wait for the
    // next session.
    why
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
        let shared2 = shared.clone();
        let gateway = svc.gateway.clone();
        let remote = remote.clone();
        let name = name.clone();
        shared.tasks.spawn(async move {
            if let Err(why) = serve_stream(&shared2, &gateway, &remote, app).await {
                warn!(service = %name, %peer, "connection closed: {why}");
            }
        });
    }
}

async fn serve_stream(shared: &Shared, gateway: &str, service: &str, app: TcpStream) -> Result<(), String> {
    let timeout = shared.config.connect_timeout;
    let mut rx = shared.links[gateway].subscribe();
    let session = tokio::time::timeout(timeout, async {
        loop {
            if let LinkState::Up(s) = &*rx.borrow_and_update() {
                return Some(s.clone());
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    })
    .await;
    let Ok(Some(session)) = session else {
        baton_os::reset(app);
        return Err(format!("no session with gateway {gateway} within {timeout:?}"));
    };
    let stream_id = StreamId(session.next_stream.fetch_add(1, Ordering::Relaxed));
    let leg = match open_leg(&session, stream_id, service, timeout).await {
        Ok(leg) => leg,
        Err(why) => {
            baton_os::reset(app);
            return Err(why);
        }
    };
    let _ = baton_os::tune_relay(&app);
    let _ = baton_os::tune_relay(&leg);
    debug!(%stream_id, service, "stream open");
    let counters = Counters::default();
    match relay(app, leg, &counters, &session.ended).await {
        RelayEnd::Finished => {}
        RelayEnd::Reset(e) => {
            debug!(%stream_id, "stream reset: {e}");
            let _ = session.control.try_send(Message::StreamReset { stream: stream_id, code: baton_proto::ResetCode::Peer });
        }
        RelayEnd::Cancelled => debug!(%stream_id, "stream closed: session ended"),
    }
    Ok(())
}

async fn open_leg(session: &LiveSession, stream: StreamId, service: &str, timeout: Duration) -> Result<TcpStream, String> {
    let mut leg = tokio::time::timeout(timeout, TcpStream::connect(session.gateway_addr))
        .await
        .map_err(|_| format!("leg to {}: connect timed out", session.gateway_addr))?
        .map_err(|e| format!("leg to {}: {e}", session.gateway_addr))?;
    let mut out = Preface::new(ConnKind::Leg).encode().to_vec();
    let open = Message::LegOpen {
        session_id: session.id,
        stream,
        generation: 0,
        received: Offset(0),
        service: service.to_owned(),
    };
    let open_tag = session.leg_key.seal_open(&open, &mut out);
    leg.write_all(&out).await.map_err(|e| format!("leg: {e}"))?;
    let reply = tokio::time::timeout(timeout, read_tagged(&mut leg))
        .await
        .map_err(|_| "gateway did not answer the leg preamble".to_owned())?
        .map_err(|e| format!("leg preamble: {e}"))?;
    let tag: [u8; TAG_LEN] = reply.tag.expect("read_tagged always reads a tag");
    if !session.leg_key.verify_reply(&open_tag, &reply.bytes, &tag) {
        return Err("leg reply failed authentication".into());
    }
    match reply.decode().map_err(|e| format!("leg reply: {e}"))? {
        Message::LegReply { result: Ok(_), .. } => Ok(leg),
        Message::LegReply { result: Err(reason), detail } => Err(format!("gateway refused the stream: {reason}: {detail}")),
        other => Err(format!("unexpected leg reply type {:#04x}", other.ty())),
    }
}
