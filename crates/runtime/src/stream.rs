//! One relayed stream at one end: the local connection (the application on
//! the client agent, the server on the gateway) and whichever leg currently
//! carries the stream. The same code runs at both ends.
//!
//! Each direction is its own task so that a slow reader in one direction
//! never blocks the other:
//!
//! - **outbound** reads the local connection into the replay buffer and
//!   writes to the current leg from the offset the peer asked for; the
//!   peer's acknowledgements trim the buffer. When the buffer is full it
//!   stops reading (backpressure).
//! - **inbound** reads the current leg and writes to the local connection,
//!   skipping bytes it already delivered (a new leg resumes from the offset
//!   this end reported, which may be behind what the old leg delivered
//!   meanwhile). While a new leg is being set up it keeps reading the old
//!   one, so a planned switch costs no stall; the first bytes on the new
//!   leg retire the old one.
//!
//! The end of a direction travels on the control connection (StreamFin) and
//! not as a FIN on the leg, so a leg closed because it was replaced is never
//! taken for the application's half-close.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_proto::{Message, Offset, ReplayBuffer, ReplayError, ResetCode, StreamId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::util::lock;

/// Bytes read from a socket at a time.
const CHUNK: usize = 256 * 1024;

/// Per-stream limits.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Most unconfirmed bytes held per direction (replay buffer size).
    pub replay_buffer: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self { replay_buffer: 8 << 20 }
    }
}

/// Events for the outbound task.
#[derive(Debug)]
pub(crate) enum OutEvent {
    /// A new leg; write to it from this offset (what the peer has). The
    /// token fires when the leg's path is cut.
    Leg(OwnedWriteHalf, Offset, CancellationToken),
    /// The peer delivered everything before this offset.
    Ack(Offset),
}

/// Events for the inbound task.
#[derive(Debug)]
pub(crate) enum InEvent {
    /// A new leg whose first byte is at this offset. The token fires when
    /// the leg's path is cut.
    Leg(OwnedReadHalf, Offset, CancellationToken),
    /// The peer's application finished writing at this offset.
    Fin(Offset),
}

/// What a stream asks of its session.
#[derive(Debug)]
pub(crate) enum ToSession {
    /// Send this on the control connection (StreamFin, StreamReset).
    Control(Message),
    /// This stream delivered bytes: acknowledge soon (`urgent`: now).
    Ack { stream: StreamId, urgent: bool },
    /// The stream's current leg failed; a new one is needed.
    LegLost(StreamId),
}

/// The longest pause in delivery seen since a mark (a switch).
#[derive(Debug)]
struct StallWatch {
    since: Option<Instant>,
    last: Option<Instant>,
    longest: Duration,
}

/// State of a stream shared between its tasks and its session.
#[derive(Debug)]
pub(crate) struct StreamShared {
    pub(crate) id: StreamId,
    /// Bytes of the inbound direction delivered to the local connection.
    pub(crate) delivered: AtomicU64,
    /// `delivered` as last acknowledged to the peer.
    pub(crate) acked_to_peer: AtomicU64,
    ack_requested: AtomicBool,
    /// Bytes taken from the local connection.
    pub(crate) taken: AtomicU64,
    /// Bytes of the outbound direction the peer confirmed.
    pub(crate) peer_acked: AtomicU64,
    /// Bytes sent a second time on a new leg.
    pub(crate) resent: AtomicU64,
    /// Where the local connection finished writing, once it has.
    pub(crate) fin_at: Mutex<Option<Offset>>,
    /// Generation of the current leg.
    pub(crate) generation: AtomicU32,
    stall: Mutex<StallWatch>,
    pub(crate) out_tx: mpsc::UnboundedSender<OutEvent>,
    pub(crate) in_tx: mpsc::UnboundedSender<InEvent>,
    /// Fires to end the stream with a reset (peer reset or session gone).
    pub(crate) abort: CancellationToken,
    ack_every: u64,
}

/// The receiving ends a stream's tasks consume.
#[derive(Debug)]
pub(crate) struct StreamInbox {
    out_rx: mpsc::UnboundedReceiver<OutEvent>,
    in_rx: mpsc::UnboundedReceiver<InEvent>,
}

impl StreamShared {
    pub(crate) fn new(id: StreamId, limits: StreamLimits, abort: CancellationToken) -> (Arc<Self>, StreamInbox) {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Self {
            id,
            delivered: AtomicU64::new(0),
            acked_to_peer: AtomicU64::new(0),
            ack_requested: AtomicBool::new(false),
            taken: AtomicU64::new(0),
            peer_acked: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            fin_at: Mutex::new(None),
            generation: AtomicU32::new(0),
            stall: Mutex::new(StallWatch { since: None, last: None, longest: Duration::ZERO }),
            out_tx,
            in_tx,
            abort,
            // Acknowledge at least every quarter buffer so the sender never
            // waits on a full buffer for an ack that is merely batched.
            ack_every: (limits.replay_buffer / 4).max(1) as u64,
        });
        (shared, StreamInbox { out_rx, in_rx })
    }

    /// Hands a new leg to the stream: the inbound side reads from it from
    /// `in_from`, the outbound side writes to it from `out_from`.
    pub(crate) fn attach_leg(&self, leg: TcpStream, in_from: Offset, out_from: Offset, cut: CancellationToken) {
        let (r, w) = leg.into_split();
        // If the tasks are gone the stream is over; the leg just closes.
        let _ = self.in_tx.send(InEvent::Leg(r, in_from, cut.clone()));
        let _ = self.out_tx.send(OutEvent::Leg(w, out_from, cut));
    }

    /// Starts measuring the longest delivery pause (at a switch).
    pub(crate) fn mark_stall_window(&self, now: Instant) {
        let mut s = lock(&self.stall);
        s.since = Some(now);
        s.longest = Duration::ZERO;
    }

    /// Longest pause in delivery since the mark, counting only pauses that
    /// ended with a delivery, or the pause still running if `now` is given.
    pub(crate) fn longest_stall(&self) -> Duration {
        lock(&self.stall).longest
    }

    /// The delivered offset if an acknowledgement is due, clearing the request.
    pub(crate) fn take_ack(&self) -> Option<Offset> {
        self.ack_requested.store(false, Ordering::Relaxed);
        let d = self.delivered.load(Ordering::Acquire);
        let prev = self.acked_to_peer.swap(d, Ordering::AcqRel);
        (d > prev).then_some(Offset(d))
    }

    fn on_delivered(&self, now: Instant, to: &mpsc::UnboundedSender<ToSession>, total: u64) {
        self.delivered.store(total, Ordering::Release);
        {
            let mut s = lock(&self.stall);
            if let Some(since) = s.since {
                let from = s.last.map_or(since, |l| l.max(since));
                let gap = now.saturating_duration_since(from);
                s.longest = s.longest.max(gap);
            }
            s.last = Some(now);
        }
        let urgent = total - self.acked_to_peer.load(Ordering::Relaxed) >= self.ack_every;
        if urgent || !self.ack_requested.swap(true, Ordering::Relaxed) {
            let _ = to.send(ToSession::Ack { stream: self.id, urgent });
        }
    }
}


/// What is left of a finished stream: enough to answer a peer that missed
/// the end (its final acknowledgement or half-close was lost with a path).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tombstone {
    pub(crate) id: StreamId,
    /// Everything the peer sent was delivered up to here.
    pub(crate) delivered: Offset,
    /// This end's half-close offset.
    pub(crate) fin_at: Option<Offset>,
}

/// Finished streams remembered per session.
const TOMBSTONES: usize = 4096;

/// A session's recently finished streams, oldest dropped first.
#[derive(Debug, Default)]
pub(crate) struct Tombstones(std::collections::VecDeque<Tombstone>);

impl Tombstones {
    pub(crate) fn push(&mut self, t: Tombstone) {
        self.0.push_back(t);
        while self.0.len() > TOMBSTONES {
            self.0.pop_front();
        }
    }

    pub(crate) fn find(&self, id: StreamId) -> Option<Tombstone> {
        self.0.iter().find(|t| t.id == id).copied()
    }

    /// Everything a reattached peer may have missed about these streams.
    pub(crate) fn messages(&self) -> impl Iterator<Item = Message> + '_ {
        self.0.iter().flat_map(tombstone_messages)
    }
}

/// Delay that lets acknowledgements of many deliveries share a frame.
const ACK_DELAY: Duration = Duration::from_millis(5);

/// Acknowledgements due to the peer, batched: a stream that delivered asks
/// once, and all waiting streams are acknowledged in as few frames as
/// possible after a short delay (at once when urgent).
#[derive(Debug, Default)]
pub(crate) struct AckBatch {
    dirty: std::collections::HashSet<StreamId>,
    flush_at: Option<tokio::time::Instant>,
}

impl AckBatch {
    pub(crate) fn request(&mut self, stream: StreamId, urgent: bool) {
        self.dirty.insert(stream);
        let now = tokio::time::Instant::now();
        let at = if urgent { now } else { now + ACK_DELAY };
        self.flush_at = Some(self.flush_at.map_or(at, |f| f.min(at)));
    }

    /// Flush as soon as possible (a control connection came up).
    pub(crate) fn hurry(&mut self) {
        if !self.dirty.is_empty() {
            self.flush_at = Some(tokio::time::Instant::now());
        }
    }

    /// Resolves when a flush is due.
    pub(crate) async fn due(&self) {
        sleep_until_opt(self.flush_at).await
    }

    /// The Acks frames to send now; `delivered` gives a stream's ack if one
    /// is due. Streams stay pending while `connected` is false.
    pub(crate) fn take(&mut self, connected: bool, delivered: impl Fn(StreamId) -> Option<Offset>) -> Vec<Message> {
        self.flush_at = None;
        if !connected {
            return Vec::new();
        }
        let entries: Vec<_> = self.dirty.drain().filter_map(|id| delivered(id).map(|o| (id, o))).collect();
        entries.chunks(baton_proto::wire::MAX_ACKS).map(|c| Message::Acks { entries: c.to_vec() }).collect()
    }
}

impl StreamShared {
    pub(crate) fn tombstone(&self) -> Tombstone {
        Tombstone { id: self.id, delivered: Offset(self.delivered.load(Ordering::Acquire)), fin_at: *lock(&self.fin_at) }
    }
}

/// Messages that tell the peer what it may have missed of a finished stream.
pub(crate) fn tombstone_messages(t: &Tombstone) -> Vec<Message> {
    let mut v = vec![Message::Acks { entries: vec![(t.id, t.delivered)] }];
    if let Some(offset) = t.fin_at {
        v.push(Message::StreamFin { stream: t.id, offset });
    }
    v
}

/// How a stream ended at this end.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    /// Both directions finished and were confirmed.
    Finished,
    /// The local connection failed or was reset; the peer was told.
    LocalReset(io::Error),
    /// The peer reset the stream or the session ended; the local connection was reset.
    Aborted,
    /// A resume asked for bytes no longer held; the stream was closed with a reset.
    Unrecoverable(ReplayError),
}

impl std::fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Finished => f.write_str("finished"),
            Self::LocalReset(e) => write!(f, "local connection failed: {e}"),
            Self::Aborted => f.write_str("reset by peer or session end"),
            Self::Unrecoverable(e) => write!(f, "cannot resume: {e}"),
        }
    }
}

enum DirError {
    Local(io::Error),
    Unrecoverable(ReplayError),
    Closed,
}

/// Runs the stream until both directions are finished, the local
/// connection fails, or the stream is aborted.
pub(crate) async fn run(
    mut local: TcpStream,
    shared: Arc<StreamShared>,
    inbox: StreamInbox,
    limits: StreamLimits,
    to_session: mpsc::UnboundedSender<ToSession>,
) -> StreamEnd {
    let StreamInbox { out_rx, in_rx } = inbox;
    let result = {
        let (r, w) = local.split();
        let both = async {
            tokio::try_join!(
                outbound(r, out_rx, &shared, limits, &to_session),
                inbound(w, in_rx, &shared, &to_session)
            )
        };
        tokio::select! {
            r = both => r.map(|_| ()),
            _ = shared.abort.cancelled() => Err(DirError::Closed),
        }
    };
    match result {
        Ok(()) => StreamEnd::Finished,
        Err(e) => {
            baton_os::reset(local);
            let (end, code) = match e {
                DirError::Local(e) => (StreamEnd::LocalReset(e), ResetCode::Peer),
                DirError::Unrecoverable(e) => (StreamEnd::Unrecoverable(e), ResetCode::Unrecoverable),
                DirError::Closed => (StreamEnd::Aborted, ResetCode::Peer),
            };
            if !matches!(end, StreamEnd::Aborted) {
                let _ = to_session.send(ToSession::Control(Message::StreamReset { stream: shared.id, code }));
            }
            end
        }
    }
}

async fn outbound(
    mut local: ReadHalf<'_>,
    mut events: mpsc::UnboundedReceiver<OutEvent>,
    shared: &StreamShared,
    limits: StreamLimits,
    to_session: &mpsc::UnboundedSender<ToSession>,
) -> Result<(), DirError> {
    let mut buf = ReplayBuffer::new(limits.replay_buffer);
    let mut chunk = vec![0u8; CHUNK.min(limits.replay_buffer)];
    let mut leg: Option<(OwnedWriteHalf, Offset, CancellationToken)> = None;
    let mut had_leg = false;
    let mut eof = false;
    loop {
        if eof && buf.is_empty() {
            return Ok(());
        }
        let room = buf.free().min(chunk.len());
        let want_write = matches!(&leg, Some((_, at, _)) if *at < buf.end());
        tokio::select! {
            biased;
            ev = events.recv() => match ev {
                None => return Err(DirError::Closed),
                Some(OutEvent::Ack(upto)) => {
                    // An ack beyond what was sent is a peer bug: never trust it to drop bytes.
                    buf.ack(upto).map_err(DirError::Unrecoverable)?;
                    shared.peer_acked.store(buf.start().0, Ordering::Relaxed);
                }
                Some(OutEvent::Leg(w, from, cut)) => {
                    // `from` may lie before the buffer's start: an ack sent
                    // after the peer chose `from` can overtake the new leg's
                    // reply. Those bytes were delivered, so the peer discards
                    // whatever comes at their offsets; past the end is a bug.
                    if from > buf.end() {
                        return Err(DirError::Unrecoverable(ReplayError::BeyondEnd(from.0, buf.end().0)));
                    }
                    if let Some((_, was_at, _)) = &leg {
                        if *was_at > from {
                            shared.resent.fetch_add(was_at.0 - from.0, Ordering::Relaxed);
                        }
                    }
                    // The peer has everything before `from`.
                    let _ = buf.ack(from);
                    shared.peer_acked.store(buf.start().0, Ordering::Relaxed);
                    leg = Some((w, from, cut));
                    if !had_leg && eof {
                        let offset = buf.end();
                        let _ = to_session.send(ToSession::Control(Message::StreamFin { stream: shared.id, offset }));
                    }
                    had_leg = true;
                }
            },
            r = write_leg(&mut leg, &buf), if want_write => {
                if let Err(_e) = r {
                    leg = None;
                    let _ = to_session.send(ToSession::LegLost(shared.id));
                }
            }
            r = local.read(&mut chunk[..room]), if !eof && room > 0 => match r {
                Ok(0) => {
                    eof = true;
                    let end = buf.end();
                    *lock(&shared.fin_at) = Some(end);
                    // Before its first leg the peer may not know the stream
                    // yet: the half-close waits for the leg.
                    if had_leg {
                        let _ = to_session.send(ToSession::Control(Message::StreamFin { stream: shared.id, offset: end }));
                    }
                }
                Ok(n) => {
                    let took = buf.push(&chunk[..n]);
                    debug_assert_eq!(took, n, "read no more than the free room");
                    shared.taken.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => return Err(DirError::Local(e)),
            },
        }
    }
}

/// Stands in for bytes the peer confirmed but a new leg must still carry
/// (see [`OutEvent::Leg`]): the peer skips offsets it already delivered.
static FILLER: [u8; 16 * 1024] = [0; 16 * 1024];

async fn write_leg(leg: &mut Option<(OwnedWriteHalf, Offset, CancellationToken)>, buf: &ReplayBuffer) -> io::Result<()> {
    let Some((w, at, cut)) = leg else { return std::future::pending().await };
    let bytes = if *at < buf.start() {
        &FILLER[..FILLER.len().min((buf.start().0 - at.0) as usize)]
    } else {
        buf.bytes_from(*at).map_err(|e| io::Error::other(e.to_string()))?
    };
    let n = tokio::select! {
        r = w.write(bytes) => r?,
        _ = cut.cancelled() => return Err(io::ErrorKind::NotConnected.into()),
    };
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    *at = at.advance(n);
    Ok(())
}

async fn inbound(
    mut local: WriteHalf<'_>,
    mut events: mpsc::UnboundedReceiver<InEvent>,
    shared: &StreamShared,
    to_session: &mpsc::UnboundedSender<ToSession>,
) -> Result<(), DirError> {
    let mut delivered = 0u64;
    let mut fin: Option<u64> = None;
    let mut leg: Option<(OwnedReadHalf, u64, CancellationToken)> = None;
    let mut next: Option<(OwnedReadHalf, u64, CancellationToken)> = None;
    let mut buf = vec![0u8; CHUNK];
    let mut buf2 = vec![0u8; 64 * 1024];
    // A leg that ends cleanly was closed by the peer: replaced (a new one is
    // on its way) or because the peer's side finished (the half-close is on
    // its way). Only if nothing comes within the grace is a new leg asked for.
    let mut lost_at: Option<tokio::time::Instant> = None;
    loop {
        if fin == Some(delivered) {
            local.shutdown().await.map_err(DirError::Local)?;
            // The final ack goes out now and explicitly: the stream may be
            // gone from the session before a batched flush would run.
            shared.acked_to_peer.store(delivered, Ordering::Relaxed);
            let ack = Message::Acks { entries: vec![(shared.id, Offset(delivered))] };
            let _ = to_session.send(ToSession::Control(ack));
            return Ok(());
        }
        tokio::select! {
            biased;
            ev = events.recv() => match ev {
                None => return Err(DirError::Closed),
                Some(InEvent::Fin(at)) => {
                    if at.0 < delivered {
                        return Err(DirError::Unrecoverable(ReplayError::BeyondEnd(delivered, at.0)));
                    }
                    fin = Some(at.0);
                }
                Some(InEvent::Leg(r, from, cut)) => {
                    if from.0 > delivered {
                        return Err(DirError::Unrecoverable(ReplayError::Missing(delivered, from.0)));
                    }
                    if leg.is_some() {
                        next = Some((r, from.0, cut));
                    } else {
                        leg = Some((r, from.0, cut));
                    }
                }
            },
            r = read_leg(&mut next, &mut buf2) => match r {
                Ok(n) => {
                    // Both legs carry the same bytes at the same offsets; the
                    // new one starts a little behind (where this side stood
                    // when it opened). Until it brings bytes the old one has
                    // not, both are read, so the old path keeps the
                    // application fed; then the new leg takes over.
                    if let Some((_, at, _)) = &mut next {
                        let start = *at;
                        *at += n as u64;
                        let before = delivered;
                        delivered = deliver(&mut local, &buf2[..n], start, delivered, shared, to_session).await?;
                        if delivered > before {
                            leg = next.take();
                        }
                    }
                }
                Err(_) => next = None,
            },
            r = read_leg(&mut leg, &mut buf) => match r {
                Ok(n) => {
                    if let Some((_, at, _)) = &mut leg {
                        let start = *at;
                        *at += n as u64;
                        delivered = deliver(&mut local, &buf[..n], start, delivered, shared, to_session).await?;
                    }
                }
                Err(e) => {
                    leg = next.take();
                    if leg.is_none() && fin != Some(delivered) {
                        if e.kind() == io::ErrorKind::UnexpectedEof {
                            lost_at = Some(tokio::time::Instant::now() + LEG_EOF_GRACE);
                        } else {
                            let _ = to_session.send(ToSession::LegLost(shared.id));
                        }
                    }
                }
            },
            _ = sleep_until_opt(lost_at) => {
                lost_at = None;
                if leg.is_none() && fin != Some(delivered) {
                    let _ = to_session.send(ToSession::LegLost(shared.id));
                }
            }
        }
    }
}

/// How long a cleanly closed leg may go unreplaced before a new one is asked for.
const LEG_EOF_GRACE: Duration = Duration::from_millis(300);

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Reads from the leg if there is one (EOF is an error: a leg only ends
/// because it is replaced or broken).
async fn read_leg(leg: &mut Option<(OwnedReadHalf, u64, CancellationToken)>, buf: &mut [u8]) -> io::Result<usize> {
    let Some((r, _, cut)) = leg else { return std::future::pending().await };
    let n = tokio::select! {
        r = r.read(buf) => r?,
        _ = cut.cancelled() => return Err(io::ErrorKind::NotConnected.into()),
    };
    match n {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        n => Ok(n),
    }
}

/// Writes the part of `data` (which starts at stream offset `start`) that
/// lies beyond `delivered`; returns the new delivered offset.
async fn deliver(
    local: &mut WriteHalf<'_>,
    data: &[u8],
    start: u64,
    delivered: u64,
    shared: &StreamShared,
    to_session: &mpsc::UnboundedSender<ToSession>,
) -> Result<u64, DirError> {
    let end = start + data.len() as u64;
    if end <= delivered {
        return Ok(delivered);
    }
    if start > delivered {
        // A gap: bytes between would be lost. Never deliver past it.
        return Err(DirError::Unrecoverable(ReplayError::Missing(delivered, start)));
    }
    let skip = (delivered - start) as usize;
    local.write_all(&data[skip..]).await.map_err(DirError::Local)?;
    shared.on_delivered(Instant::now(), to_session, end);
    Ok(end)
}
