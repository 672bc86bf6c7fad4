//! The gateway: accepts sessions from client agents and relays their
//! streams to the services' targets.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use baton_proto::wire::{PREFACE_LEN, TAG_LEN};
use baton_proto::{
    ConnKind, ControlCipher, GatewayHandshake, LegKey, Liveness, LivenessAction, Message, Offset, Preface,
    RefuseReason, Role, StreamId, StreamTable,
};

use crate::config::GatewayConfig;
use crate::frame::{read_tagged, FrameCodec, RawFrame};
use crate::relay::{relay, Counters, RelayEnd};

/// Counters a gateway keeps, for status and tests.
#[derive(Debug, Default)]
pub struct GatewayStats {
    /// Sessions accepted since start.
    pub sessions_accepted: AtomicU64,
    /// Sessions refused (any reason) since start.
    pub sessions_refused: AtomicU64,
    /// Sessions released because their client went silent.
    pub sessions_expired: AtomicU64,
    /// Streams opened since start.
    pub streams_opened: AtomicU64,
    /// Legs refused (any reason) since start.
    pub legs_refused: AtomicU64,
    /// Connections closed for a protocol violation (garbage, forged tags).
    pub protocol_errors: AtomicU64,
}

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
    stats: GatewayStats,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

#[derive(Debug)]
struct Session {
    id: u64,
    client_id: String,
    leg_key: LegKey,
    services: HashSet<String>,
    streams: Mutex<StreamTable>,
    stream_cancels: Mutex<HashMap<StreamId, CancellationToken>>,
    liveness: Mutex<Liveness>,
    /// Fires when the session is released: every stream task resets its
    /// connections and ends.
    released: CancellationToken,
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
    pub async fn start(config: GatewayConfig, shutdown: CancellationToken) -> std::io::Result<Self> {
        let mut listeners = Vec::new();
        for addr in &config.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
            listeners.push(l);
        }
        let local_addrs = listeners.iter().map(|l| l.local_addr()).collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            config,
            rng: SystemRandom::new(),
            sessions: Mutex::new(HashMap::new()),
            stats: GatewayStats::default(),
            shutdown,
            tasks: TaskTracker::new(),
        });
        for l in listeners {
            let shared2 = shared.clone();
            shared.tasks.spawn(accept_loop(shared2, l));
        }
        let s2 = shared.clone();
        tokio::spawn(async move {
            s2.shutdown.cancelled().await;
            let all: Vec<_> = lock(&s2.sessions).values().cloned().collect();
            for s in all {
                release(&s2, &s, "gateway shutting down");
            }
        });
        info!(addrs = ?local_addrs, "gateway listening");
        Ok(Self { shared, local_addrs })
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
        lock(&self.shared.sessions).values().map(|s| lock(&s.streams).live()).sum()
    }

    /// Client ids of the sessions held now.
    pub fn session_clients(&self) -> Vec<String> {
        lock(&self.shared.sessions).values().map(|s| s.client_id.clone()).collect()
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind, never
    // a broken invariant worth dying for.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
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
            _ = shared.shutdown.cancelled() => return,
        };
        let shared2 = shared.clone();
        shared.tasks.spawn(async move {
            if let Err(e) = serve_connection(&shared2, stream, peer).await {
                if matches!(e, ConnError::Wire(_) | ConnError::Frame(_) | ConnError::Unexpected(_)) {
                    shared2.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(%peer, "closing connection: {e}");
                } else {
                    debug!(%peer, "connection ended: {e}");
                }
            }
        });
    }
}

async fn serve_connection(shared: &Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) -> Result<(), ConnError> {
    let timeout = shared.config.handshake_timeout;
    let mut preface = [0u8; PREFACE_LEN];
    tokio::time::timeout(timeout, stream.read_exact(&mut preface)).await.map_err(|_| ConnError::Timeout)??;
    let p = Preface::decode(&preface)?;
    if p.version != baton_proto::wire::VERSION {
        shared.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
        let detail = format!("gateway speaks version {}, client {}", baton_proto::wire::VERSION, p.version);
        warn!(%peer, "refused: {detail}");
        let mut out = Vec::new();
        Message::Refused { reason: RefuseReason::Version, detail }.encode(&mut out);
        stream.write_all(&out).await?;
        return Ok(());
    }
    match p.kind {
        ConnKind::Control => control(shared, stream, peer, preface).await,
        ConnKind::Leg => leg(shared, stream, peer).await,
    }
}

async fn refuse(stream: &mut TcpStream, shared: &Shared, reason: RefuseReason, detail: String) -> Result<(), ConnError> {
    shared.stats.sessions_refused.fetch_add(1, Ordering::Relaxed);
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

async fn control(
    shared: &Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    preface: [u8; PREFACE_LEN],
) -> Result<(), ConnError> {
    let timeout = shared.config.handshake_timeout;
    let (hello, client_id, client_eph) = {
        let (r, _) = stream.split();
        let mut frames = FramedRead::new(r, FrameCodec::default());
        let hello = next_frame(&mut frames, timeout).await?;
        if !frames.read_buffer().is_empty() {
            // The client must wait for the Challenge: anything more is a violation.
            return Err(ConnError::Unexpected(hello.ty()));
        }
        match hello.decode()? {
            Message::Hello { client_id, ephemeral } => (hello, client_id, ephemeral),
            other => return Err(ConnError::Unexpected(other.ty())),
        }
    };
    let Some(entry) = shared.config.clients.get(&client_id).cloned() else {
        warn!(%peer, client = %client_id, "refused: unknown client");
        return refuse(&mut stream, shared, RefuseReason::UnknownClient, format!("no client {client_id:?}")).await;
    };
    if lock(&shared.sessions).len() >= shared.config.max_sessions {
        warn!(%peer, client = %client_id, "refused: capacity full");
        let detail = format!("gateway holds its maximum of {} sessions", shared.config.max_sessions);
        return refuse(&mut stream, shared, RefuseReason::CapacityFull, detail).await;
    }
    let session_id = new_session_id(shared)?;
    let (hs, challenge) = GatewayHandshake::on_hello(&preface, &hello.bytes, client_eph, session_id, &shared.rng)?;
    stream.write_all(&challenge).await?;

    let (r, mut w) = stream.split();
    let mut frames = FramedRead::new(r, FrameCodec::default());
    let auth = next_frame(&mut frames, timeout).await?;
    let keys = match hs.on_auth(&auth.bytes, &entry.key) {
        Ok(k) => k,
        Err(baton_proto::CryptoError::BadProof) => {
            warn!(%peer, client = %client_id, "refused: bad proof of key");
            drop(frames);
            return refuse(&mut stream, shared, RefuseReason::BadProof, "signature does not match the configured key".into())
                .await;
        }
        Err(e) => return Err(e.into()),
    };
    let mut cipher = ControlCipher::new(&keys, Role::Gateway);
    let now = Instant::now().into_std();
    let session = Arc::new(Session {
        id: session_id,
        client_id: client_id.clone(),
        leg_key: keys.leg_key(),
        services: entry.services.iter().cloned().collect(),
        streams: Mutex::new(StreamTable::new(shared.config.max_streams_per_session)),
        stream_cancels: Mutex::new(HashMap::new()),
        liveness: Mutex::new(Liveness::new(now, None, shared.config.inactivity_timeout)),
        released: shared.shutdown.child_token(),
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
        let detail = format!("gateway holds its maximum of {} sessions", shared.config.max_sessions);
        return refuse(&mut stream, shared, RefuseReason::CapacityFull, detail).await;
    }
    shared.stats.sessions_accepted.fetch_add(1, Ordering::Relaxed);
    info!(%peer, client = %client_id, session = format_args!("{session_id:016x}"), "session up");
    let mut out = Vec::new();
    let inactivity_ms = u32::try_from(shared.config.inactivity_timeout.as_millis()).unwrap_or(u32::MAX);
    cipher.seal(&Message::Accepted { session_id, keepalive_ms: inactivity_ms / 3, inactivity_ms }, &mut out);
    w.write_all(&out).await?;
    frames.decoder_mut().keyed = true;

    let reaper = shared.tasks.spawn(reap(shared.clone(), session.clone()));
    let result = loop {
        let frame = tokio::select! {
            f = frames.next() => f,
            _ = session.released.cancelled() => break Ok(()),
        };
        let frame = match frame {
            None => break Err(ConnError::Closed),
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(f)) => f,
        };
        let msg = match frame.open(&mut cipher) {
            Ok(m) => m,
            Err(e) => break Err(e.into()),
        };
        lock(&session.liveness).on_receive(Instant::now().into_std());
        out.clear();
        match msg {
            Message::Ping { seq } => cipher.seal(&Message::Pong { seq }, &mut out),
            Message::Pong { .. } => {}
            Message::StreamReset { stream, code } => {
                debug!(session = format_args!("{session_id:016x}"), %stream, ?code, "stream reset by client");
                if let Some(c) = lock(&session.stream_cancels).get(&stream) {
                    c.cancel();
                }
            }
            Message::Disconnect => {
                info!(client = %client_id, session = format_args!("{session_id:016x}"), "session disconnected");
                release(shared, &session, "client disconnected");
                cipher.seal(&Message::DisconnectAck, &mut out);
                let _ = w.write_all(&out).await;
                break Ok(());
            }
            other => break Err(ConnError::Unexpected(other.ty())),
        }
        if !out.is_empty() {
            if let Err(e) = w.write_all(&out).await {
                break Err(e.into());
            }
        }
    };
    // The session outlives its control connection until the inactivity
    // timeout, so that a client agent that reconnects does not lose it.
    drop(reaper);
    result
}

fn new_session_id(shared: &Shared) -> Result<u64, ConnError> {
    loop {
        let mut b = [0u8; 8];
        shared.rng.fill(&mut b).map_err(|_| baton_proto::CryptoError::Random)?;
        let id = u64::from_be_bytes(b);
        if id != 0 && !lock(&shared.sessions).contains_key(&id) {
            return Ok(id);
        }
    }
}

/// Releases the session when its client has been silent for the inactivity
/// timeout.
async fn reap(shared: Arc<Shared>, session: Arc<Session>) {
    loop {
        let deadline = lock(&session.liveness).poll_timeout();
        tokio::select! {
            _ = tokio::time::sleep_until(Instant::from_std(deadline)) => {}
            _ = session.released.cancelled() => return,
        }
        let action = lock(&session.liveness).handle_timeout(Instant::now().into_std());
        if action == Some(LivenessAction::Expired) {
            shared.stats.sessions_expired.fetch_add(1, Ordering::Relaxed);
            info!(client = %session.client_id, session = format_args!("{:016x}", session.id), "session expired (inactivity timeout)");
            release(&shared, &session, "inactivity timeout");
            return;
        }
    }
}

fn release(shared: &Shared, session: &Session, why: &str) {
    if lock(&shared.sessions).remove(&session.id).is_some() {
        debug!(session = format_args!("{:016x}", session.id), "releasing session: {why}");
    }
    session.released.cancel();
}

async fn leg(shared: &Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) -> Result<(), ConnError> {
    let frame = tokio::time::timeout(shared.config.handshake_timeout, read_tagged(&mut stream))
        .await
        .map_err(|_| ConnError::Timeout)??;
    let (session_id, stream_id, generation, _received, service) = match frame.decode()? {
        Message::LegOpen { session_id, stream, generation, received, service } => {
            (session_id, stream, generation, received, service)
        }
        other => return Err(ConnError::Unexpected(other.ty())),
    };
    let Some(session) = lock(&shared.sessions).get(&session_id).cloned() else {
        // Without the session's keys no reply can be authenticated: just close.
        shared.stats.legs_refused.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, session = format_args!("{session_id:016x}"), "leg for unknown session");
        return Ok(());
    };
    let tag: [u8; TAG_LEN] = frame.tag.expect("read_tagged always reads a tag");
    if !session.leg_key.verify_open(&frame.bytes, &tag) {
        shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, session = format_args!("{session_id:016x}"), "leg preamble failed authentication");
        return Ok(());
    }
    let reply = |result: Result<Offset, RefuseReason>, detail: String| {
        let mut out = Vec::new();
        session.leg_key.seal_reply(&Message::LegReply { result, detail }, &tag, &mut out);
        out
    };
    let refused = |reason: RefuseReason, detail: String| {
        shared.stats.legs_refused.fetch_add(1, Ordering::Relaxed);
        warn!(client = %session.client_id, %stream_id, service = %service, "stream refused: {reason}: {detail}");
        reply(Err(reason), detail)
    };
    if generation != 0 {
        let out = refused(RefuseReason::BadStream, "this gateway does not resume streams".into());
        stream.write_all(&out).await?;
        return Ok(());
    }
    if !session.services.contains(&service) {
        let out = refused(RefuseReason::ServiceNotAllowed, format!("service {service:?} is not allowed"));
        stream.write_all(&out).await?;
        return Ok(());
    }
    let Some(svc) = shared.config.services.get(&service) else {
        let out = refused(RefuseReason::ServiceNotAllowed, format!("no service {service:?}"));
        stream.write_all(&out).await?;
        return Ok(());
    };
    let admitted = lock(&session.streams).admit(stream_id, generation);
    if let Err(e) = admitted {
        let out = refused(RefuseReason::BadStream, e.to_string());
        stream.write_all(&out).await?;
        return Ok(());
    }
    let cancel = session.released.child_token();
    lock(&session.stream_cancels).insert(stream_id, cancel.clone());
    let target = &svc.target;
    let connect = tokio::time::timeout(shared.config.connect_timeout, TcpStream::connect((target.host.as_str(), target.port)));
    let upstream = tokio::select! {
        r = connect => match r {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(format!("{target}: {e}")),
            Err(_) => Err(format!("{target}: no answer within {:?}", shared.config.connect_timeout)),
        },
        _ = cancel.cancelled() => Err("session released".to_owned()),
    };
    let upstream = match upstream {
        Ok(s) => s,
        Err(detail) => {
            end_stream(&session, stream_id);
            let out = refused(RefuseReason::TargetUnreachable, detail);
            stream.write_all(&out).await?;
            return Ok(());
        }
    };
    let _ = baton_os::tune_relay(&upstream);
    let _ = baton_os::tune_relay(&stream);
    stream.write_all(&reply(Ok(Offset(0)), String::new())).await?;
    shared.stats.streams_opened.fetch_add(1, Ordering::Relaxed);
    debug!(client = %session.client_id, %stream_id, service = %service, "stream open");
    let counters = Counters::default();
    let end = relay(stream, upstream, &counters, &cancel).await;
    end_stream(&session, stream_id);
    let (up, down) = (counters.forward.load(Ordering::Relaxed), counters.backward.load(Ordering::Relaxed));
    match end {
        RelayEnd::Finished => debug!(%stream_id, up, down, "stream finished"),
        RelayEnd::Reset(e) => info!(%stream_id, up, down, "stream reset: {e}"),
        RelayEnd::Cancelled => info!(%stream_id, up, down, "stream closed: session released"),
    }
    Ok(())
}

fn end_stream(session: &Session, stream: StreamId) {
    lock(&session.streams).close(stream);
    lock(&session.stream_cancels).remove(&stream);
}
