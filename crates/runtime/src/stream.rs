//! One relayed stream at one end: the local connection (the application on
//! the client agent, the server on the gateway) and whichever leg currently
//! carries the stream. The same code runs at both ends.
//!
//! Each direction is its own task so that a slow reader in one direction
//! never blocks the other:
//!
//! - **outbound** reads the local connection into the replay buffer and
//!   writes to the current leg; the peer's acknowledgements trim the
//!   buffer. When the buffer is full it stops reading (backpressure). Each
//!   leg starts with the offset of its first byte. After a failure a new leg
//!   rewinds to the offset the peer reported; in a planned switch (the old
//!   leg is still good) it goes on where the old leg stopped, so nothing in
//!   flight is sent twice and the new path, still in slow start, carries
//!   only new bytes.
//! - **inbound** reads the current leg and writes to the local connection,
//!   skipping bytes it already delivered (a rewound leg starts behind what
//!   the old leg delivered meanwhile). A new leg that starts ahead is held
//!   while the old one is drained up to its start; if the old leg breaks
//!   first, or stops moving, a rewound leg is asked for instead. So a
//!   planned switch costs no stall and no byte is skipped.
//!
//! The end of a direction travels on the control connection (StreamFin) and
//! not as a FIN on the leg, so a leg closed because it was replaced is never
//! taken for the application's half-close.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_os::{RecvBuffer, SendBuffer, SplicePipe};
use baton_proto::wire::LEG_START_LEN;
use baton_proto::{Compression, Message, Offset, ReplayBuffer, ReplayError, ResetCode, StreamId};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt as _;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::codec::{Compressor, Decompressor};
use crate::shards::Moving;
use crate::util::lock;

mod outbox;
use outbox::{AckError, Outbox};

/// Bytes read from a socket at a time.
const CHUNK: usize = 256 * 1024;

/// A read at least this large marks a busy stream: its next bytes go
/// through pipes, without copies, when its leg allows.
const BUSY_READ: usize = 32 * 1024;

/// A read from a leg at least this large starts splicing that leg's bytes
/// to the application. Lower than [`BUSY_READ`]: this end keeps no copy, so
/// a splice in and a splice out replace a `recv` and a `send` that would
/// copy the bytes twice.
const SPLICE_IN_READ: usize = 8 * 1024;

/// Pipe between a plain leg and the application's socket. Each splice
/// out of it wakes the application once, and where the application shares
/// a core with the relay it runs at once: a 64 KiB pipe made one upload's
/// gateway and iperf3 server take turns every 60-90 KB, 8,400-9,900 times
/// a second, and the stream ran at 6.2-6.3 Gbit/s; with 256 KiB,
/// 4,600-4,800 turns at 8.8-9.7 Gbit/s, and paced uploads took up to 10%
/// less relay CPU per GB (`bench/README.md`, finding 30). (On the machine
/// of finding 18, with the four processes free to move, 64 KiB had
/// measured faster.)
const RECV_PIPE: usize = 256 * 1024;

/// A read this small ends a busy spell: the stream carries messages, and
/// their bytes are read and written through a buffer again. A splice moves
/// page references through a pipe in three calls where a copy of a few
/// bytes takes two; for a message it costs more than the copy it saves
/// (bench/README.md, finding 22).
const SMALL_READ: usize = 4 * 1024;

/// Read buffer of a leg that replaces another while that one is drained.
const NEXT_CHUNK: usize = 64 * 1024;

/// How long a direction moves no byte before its buffers are freed: an
/// idle stream holds no buffer, a busy one keeps its own instead of
/// allocating (and zeroing) new ones at every burst.
const IDLE_FREE: Duration = Duration::from_secs(2);

/// Per-stream limits.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Most unconfirmed bytes held per direction (replay buffer size).
    pub replay_buffer: usize,
    /// How the stream's bytes travel on its legs.
    pub compression: Compression,
    /// Whether busy connections' send buffers are sized to their paths
    /// (`send_buffers = "path"`, [`SendBuffer`]).
    pub size_send_buffers: bool,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            replay_buffer: 8 << 20,
            compression: Compression::None,
            size_send_buffers: true,
        }
    }
}

/// Events for the outbound task.
#[derive(Debug)]
pub(crate) enum OutEvent {
    /// A new leg; the peer has everything before the offset. The token
    /// fires when the leg's path is cut. With `LegStart::Continue` the
    /// writer goes on from where the old leg stopped if that leg is still
    /// good; with `Rewind` it starts at the offset.
    Leg(OwnedWriteHalf, Offset, CancellationToken, LegStart),
    /// The peer delivered everything before this offset.
    Ack(Offset),
}

/// Events for the inbound task.
#[derive(Debug)]
pub(crate) enum InEvent {
    /// A new leg; its first bytes say the offset it starts at. The token
    /// fires when the leg's path is cut.
    Leg(OwnedReadHalf, CancellationToken),
    /// The peer's application finished writing at this offset.
    Fin(Offset),
}

/// Where a new leg's writer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LegStart {
    /// At the offset the peer reported: after a failure, whatever was in
    /// flight on the old leg may be lost.
    Rewind,
    /// Where the old leg stopped, if it is still good (a planned switch):
    /// the peer drains the old leg up to there.
    Continue,
}

/// What a stream asks of its session.
#[derive(Debug)]
pub(crate) enum ToSession {
    /// Send this on the control connection (StreamFin, StreamReset).
    Control(Message),
    /// This stream delivered bytes: acknowledge them within `due`.
    Ack { stream: StreamId, due: AckDue },
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
    /// The most pressing [`AckDue`] asked of the session since its last
    /// acknowledgement (0: none).
    ack_requested: AtomicU8,
    /// Bytes taken from the local connection.
    pub(crate) taken: AtomicU64,
    /// Bytes of the outbound direction the peer confirmed.
    pub(crate) peer_acked: AtomicU64,
    /// The furthest offset of the outbound direction handed to any leg.
    sent_to: AtomicU64,
    /// Bytes sent a second time on a new leg.
    pub(crate) resent: AtomicU64,
    /// How the stream's bytes travel on its legs.
    pub(crate) compression: Compression,
    /// The application's bytes put on legs and read from them (resent ones
    /// included), and what they took on the wire: the compression ratio.
    pub(crate) plain_out: AtomicU64,
    /// Of `plain_out`, bytes spliced from pipes: never copied in user space.
    pub(crate) spliced_out: AtomicU64,
    /// Bytes delivered to the application from a pipe, never copied in
    /// user space: a busy stream's.
    pub(crate) spliced_in: AtomicU64,
    /// The send buffers set on the current leg and on the local connection
    /// ([`SendBuffer`]); 0 where the kernel sizes them.
    pub(crate) leg_sndbuf: AtomicUsize,
    pub(crate) local_sndbuf: AtomicUsize,
    pub(crate) wire_out: AtomicU64,
    pub(crate) plain_in: AtomicU64,
    pub(crate) wire_in: AtomicU64,
    /// Where the local connection finished writing, once it has.
    pub(crate) fin_at: Mutex<Option<Offset>>,
    /// Generation of the current leg.
    pub(crate) generation: AtomicU32,
    /// Memory the outbound (replay ring) and inbound (read buffers) tasks
    /// hold now.
    out_buffer: AtomicUsize,
    in_buffer: AtomicUsize,
    stall: Mutex<StallWatch>,
    pub(crate) out_tx: mpsc::UnboundedSender<OutEvent>,
    pub(crate) in_tx: mpsc::UnboundedSender<InEvent>,
    /// New legs, on their way to the thread the stream runs on: a list
    /// and a wake-up rather than a channel, which would cost every idle
    /// stream a block of slots.
    new_legs: Mutex<Vec<NewLeg>>,
    legs_ready: tokio::sync::Notify,
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

/// A leg handed to a stream that may run on another thread (a session
/// thread): [`run`] registers it there, so that its readiness wakes the
/// stream's thread and no other.
#[derive(Debug)]
struct NewLeg {
    leg: Moving,
    peer_has: Offset,
    cut: CancellationToken,
    start: LegStart,
    halves: Halves,
}

/// Which directions a [`NewLeg`] serves. A leg resumed after a failure can
/// be written before the peer's reply is read (see
/// `client::open_leg`): its writer comes first, on a second descriptor of
/// the same socket, and its reader once the reply is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halves {
    Both,
    Write,
    Read,
}

impl StreamShared {
    pub(crate) fn new(
        id: StreamId,
        limits: StreamLimits,
        abort: CancellationToken,
    ) -> (Arc<Self>, StreamInbox) {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Self {
            id,
            delivered: AtomicU64::new(0),
            acked_to_peer: AtomicU64::new(0),
            ack_requested: AtomicU8::new(0),
            taken: AtomicU64::new(0),
            peer_acked: AtomicU64::new(0),
            sent_to: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            compression: limits.compression,
            plain_out: AtomicU64::new(0),
            spliced_out: AtomicU64::new(0),
            spliced_in: AtomicU64::new(0),
            leg_sndbuf: AtomicUsize::new(0),
            local_sndbuf: AtomicUsize::new(0),
            wire_out: AtomicU64::new(0),
            plain_in: AtomicU64::new(0),
            wire_in: AtomicU64::new(0),
            fin_at: Mutex::new(None),
            generation: AtomicU32::new(0),
            out_buffer: AtomicUsize::new(0),
            in_buffer: AtomicUsize::new(0),
            stall: Mutex::new(StallWatch {
                since: None,
                last: None,
                longest: Duration::ZERO,
            }),
            out_tx,
            in_tx,
            new_legs: Mutex::new(Vec::new()),
            legs_ready: tokio::sync::Notify::new(),
            abort,
            // Acknowledge at least every quarter of the sender's window so
            // that it never waits on a full one for an ack that is merely
            // batched: a quarter of the buffer, or of the window of a short
            // path (SHORT_PATH_WINDOW), whichever is smaller.
            ack_every: (limits.replay_buffer / 4).clamp(1, SHORT_PATH_WINDOW / 4) as u64,
        });
        (shared, StreamInbox { out_rx, in_rx })
    }

    /// Hands a new leg to the stream: the peer has this end's bytes up to
    /// `peer_has`; `start` says whether the writer may go on where the old
    /// leg stopped.
    pub(crate) fn attach_leg(
        &self,
        leg: TcpStream,
        peer_has: Offset,
        start: LegStart,
        cut: CancellationToken,
    ) {
        self.attach(leg, peer_has, start, cut, Halves::Both);
    }

    /// Hands a new leg's writing side to the stream before the peer has
    /// answered: it starts at `peer_has`, which must be no later than what
    /// the peer holds (the peer skips what it already delivered).
    /// [`attach_reader`](Self::attach_reader) follows with the same socket
    /// once the answer is read; cancelling `cut` ends both.
    pub(crate) fn attach_writer(
        &self,
        leg: std::net::TcpStream,
        peer_has: Offset,
        start: LegStart,
        cut: CancellationToken,
    ) {
        self.push_leg(Moving::from_std(leg), peer_has, start, cut, Halves::Write);
    }

    /// Hands the reading side of a leg whose writer
    /// [`attach_writer`](Self::attach_writer) gave earlier.
    pub(crate) fn attach_reader(&self, leg: TcpStream, cut: CancellationToken) {
        self.attach(leg, Offset(0), LegStart::Rewind, cut, Halves::Read);
    }

    fn attach(
        &self,
        leg: TcpStream,
        peer_has: Offset,
        start: LegStart,
        cut: CancellationToken,
        halves: Halves,
    ) {
        let leg = match Moving::leave(leg) {
            Ok(l) => l,
            Err(e) => {
                // The leg is closed: the peer sees it go, as any lost leg.
                debug!(stream = %self.id, "leg lost leaving its thread: {e}");
                return;
            }
        };
        self.push_leg(leg, peer_has, start, cut, halves);
    }

    fn push_leg(
        &self,
        leg: Moving,
        peer_has: Offset,
        start: LegStart,
        cut: CancellationToken,
        halves: Halves,
    ) {
        // If the tasks are gone the stream is over; the leg just closes
        // with the stream.
        lock(&self.new_legs).push(NewLeg {
            leg,
            peer_has,
            cut,
            start,
            halves,
        });
        self.legs_ready.notify_one();
    }

    /// A leg was handed the bytes before `to`. Called by the outbound
    /// direction only, so a plain store does (no locked instruction on
    /// every write).
    fn sent(&self, to: Offset) {
        if to.0 > self.sent_to.load(Ordering::Relaxed) {
            self.sent_to.store(to.0, Ordering::Relaxed);
        }
    }

    /// Bytes handed to legs that the peer has not confirmed: the most it
    /// may have received beyond its last acknowledgement.
    pub(crate) fn sent_unconfirmed(&self) -> u64 {
        let sent = self.sent_to.load(Ordering::Relaxed);
        sent.saturating_sub(self.peer_acked.load(Ordering::Relaxed))
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
        self.ack_requested.store(0, Ordering::Relaxed);
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
        let unconfirmed = total - self.acked_to_peer.load(Ordering::Relaxed);
        let due = if unconfirmed >= self.ack_every {
            AckDue::Now
        } else if unconfirmed >= ACK_FEW_BYTES {
            AckDue::Soon
        } else {
            AckDue::Later
        };
        // Asked once per acknowledgement, and again only to hurry it.
        if due as u8 > self.ack_requested.fetch_max(due as u8, Ordering::Relaxed) {
            let _ = to.send(ToSession::Ack {
                stream: self.id,
                due,
            });
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

/// Unconfirmed bytes below which a stream's acknowledgement waits
/// [`ACK_DELAY_FEW`]: its sender holds so little that freeing it sooner is
/// not worth a message each way. A request/response stream then costs one
/// acknowledgement per 100 ms instead of one per 5 ms, and each is work that
/// lands in the middle of some message's round trip: with 5 ms, one in 40
/// round trips of 64 B waits on one, which is the 99th percentile
/// (bench/README.md, finding 24). A bulk stream passes this in well under
/// [`ACK_DELAY`] and is acknowledged as before.
const ACK_FEW_BYTES: u64 = 64 * 1024;

/// How long an acknowledgement of fewer than [`ACK_FEW_BYTES`] may wait.
const ACK_DELAY_FEW: Duration = Duration::from_millis(100);

/// The most a direction keeps unconfirmed on a path short enough that its
/// leg's send buffer is sized to it (`send_buffers = "path"`: a round trip
/// that the largest buffer allowed carries at 100 Gbit/s, such as loopback
/// or a rack). The full replay buffer is for long paths, whose round trips
/// need it; on a short one it only lets the relay read megabytes ahead of
/// its peer, and every page those bytes sit in is cold by the time the page
/// is used again. 2 MiB still covers an acknowledgement round trip of 1.3
/// ms at 12 Gbit/s. Measured side by side on loopback (`bench/README.md`,
/// finding 27): one stream down 10.6-15.2 Gbit/s against 7.1-10.5 with
/// 8 MiB.
const SHORT_PATH_WINDOW: usize = 2 << 20;

/// How soon a stream's deliveries are to be acknowledged, by how much its
/// sender holds unconfirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum AckDue {
    /// Fewer than [`ACK_FEW_BYTES`]: within [`ACK_DELAY_FEW`].
    Later = 1,
    /// Within [`ACK_DELAY`].
    Soon = 2,
    /// A quarter of the sender's buffer: at once, so that it never waits
    /// on a full buffer for an acknowledgement that is merely batched.
    Now = 3,
}

impl AckDue {
    fn delay(self) -> Duration {
        match self {
            Self::Later => ACK_DELAY_FEW,
            Self::Soon => ACK_DELAY,
            Self::Now => Duration::ZERO,
        }
    }
}

/// Acknowledgements due to the peer, batched: a stream that delivered asks
/// once, and all waiting streams are acknowledged in as few frames as
/// possible after a short delay (at once when urgent).
#[derive(Debug, Default)]
pub(crate) struct AckBatch {
    dirty: std::collections::HashSet<StreamId>,
    flush_at: Option<tokio::time::Instant>,
}

impl AckBatch {
    pub(crate) fn request(&mut self, stream: StreamId, due: AckDue) {
        self.dirty.insert(stream);
        let at = tokio::time::Instant::now() + due.delay();
        self.flush_at = Some(self.flush_at.map_or(at, |f| f.min(at)));
    }

    /// Flush as soon as possible (a control connection came up).
    pub(crate) fn hurry(&mut self) {
        if !self.dirty.is_empty() {
            self.flush_at = Some(tokio::time::Instant::now());
        }
    }

    /// Resolves when a flush is due. One due already is not left to the
    /// timer: tokio rounds deadlines up to its next millisecond tick, and an
    /// urgent acknowledgement that waited for it would hold the sender's
    /// buffer (and the pages it pins) that much longer.
    pub(crate) async fn due(&self) {
        match self.flush_at {
            Some(t) if t <= tokio::time::Instant::now() => {}
            at => sleep_until_opt(at).await,
        }
    }

    /// The Acks frames to send now; `delivered` gives a stream's ack if one
    /// is due. Streams stay pending while `connected` is false.
    pub(crate) fn take(
        &mut self,
        connected: bool,
        delivered: impl Fn(StreamId) -> Option<Offset>,
    ) -> Vec<Message> {
        self.flush_at = None;
        if !connected {
            return Vec::new();
        }
        let entries: Vec<_> = self
            .dirty
            .drain()
            .filter_map(|id| delivered(id).map(|o| (id, o)))
            .collect();
        entries
            .chunks(baton_proto::wire::MAX_ACKS)
            .map(|c| Message::Acks {
                entries: c.to_vec(),
            })
            .collect()
    }
}

impl StreamShared {
    /// Memory held now for the stream's read and replay buffers: none
    /// while it is idle.
    pub(crate) fn buffer_bytes(&self) -> usize {
        self.out_buffer.load(Ordering::Relaxed) + self.in_buffer.load(Ordering::Relaxed)
    }

    /// Bytes on the legs, both directions.
    pub(crate) fn wire_bytes(&self) -> u64 {
        self.wire_out.load(Ordering::Relaxed) + self.wire_in.load(Ordering::Relaxed)
    }

    /// The application's bytes per byte on the legs, both directions.
    pub(crate) fn compression_ratio(&self) -> f64 {
        let plain = self.plain_out.load(Ordering::Relaxed) + self.plain_in.load(Ordering::Relaxed);
        match self.wire_bytes() {
            0 => 1.0,
            wire => plain as f64 / wire as f64,
        }
    }

    pub(crate) fn tombstone(&self) -> Tombstone {
        Tombstone {
            id: self.id,
            delivered: Offset(self.delivered.load(Ordering::Acquire)),
            fin_at: *lock(&self.fin_at),
        }
    }
}

/// Messages that tell the peer what it may have missed of a finished stream.
pub(crate) fn tombstone_messages(t: &Tombstone) -> Vec<Message> {
    let mut v = vec![Message::Acks {
        entries: vec![(t.id, t.delivered)],
    }];
    if let Some(offset) = t.fin_at {
        v.push(Message::StreamFin {
            stream: t.id,
            offset,
        });
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

impl From<AckError> for DirError {
    fn from(e: AckError) -> Self {
        match e {
            AckError::Replay(e) => Self::Unrecoverable(e),
            AckError::Io(e) => Self::Local(e),
        }
    }
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
        // New legs are registered here, on the stream's thread, then split
        // between the two directions. (Their order against acks and
        // half-closes, which come over the control connection, never
        // mattered: those travel apart from legs on the wire too.)
        let legs = async {
            loop {
                // A leg attached before this waits as a stored permit.
                shared.legs_ready.notified().await;
                let arrived = std::mem::take(&mut *lock(&shared.new_legs));
                for NewLeg {
                    leg,
                    peer_has,
                    cut,
                    start,
                    halves,
                } in arrived
                {
                    match leg.arrive() {
                        Ok(leg) => {
                            let (r, w) = leg.into_split();
                            if halves == Halves::Read {
                                // The writer is on the other descriptor: this
                                // one must not shut the socket's sending side.
                                w.forget();
                            } else {
                                let _ = shared.out_tx.send(OutEvent::Leg(
                                    w,
                                    peer_has,
                                    cut.clone(),
                                    start,
                                ));
                            }
                            if halves != Halves::Write {
                                let _ = shared.in_tx.send(InEvent::Leg(r, cut));
                            }
                        }
                        Err(e) => {
                            debug!(stream = %shared.id, "leg lost arriving on the stream's thread: {e}")
                        }
                    }
                }
            }
        };
        // The stream's four parts, each polled only when something it waits
        // on woke it: a message wakes one direction, and neither the other
        // direction's loop nor the leg and abort waits are polled for it
        // (`join!` and `select!` poll every branch at every wake-up;
        // bench/README.md, finding 22). The first error ends the stream.
        type Part<'a> = Pin<Box<dyn Future<Output = Result<(), DirError>> + Send + 'a>>;
        let mut parts: FuturesUnordered<Part<'_>> = FuturesUnordered::new();
        parts.push(Box::pin(outbound(r, out_rx, &shared, limits, &to_session)));
        parts.push(Box::pin(inbound(
            w,
            in_rx,
            &shared,
            limits.size_send_buffers,
            &to_session,
        )));
        parts.push(Box::pin(async {
            legs.await;
            unreachable!("the leg loop never ends")
        }));
        parts.push(Box::pin(async {
            shared.abort.cancelled().await;
            Err(DirError::Closed)
        }));
        // Only the two directions end well.
        let mut finished = 0;
        loop {
            match parts.next().await {
                Some(Ok(())) => {
                    finished += 1;
                    if finished == 2 {
                        break Ok(());
                    }
                }
                Some(Err(e)) => break Err(e),
                None => break Ok(()),
            }
        }
    };
    match result {
        Ok(()) => StreamEnd::Finished,
        Err(e) => {
            baton_os::reset(local);
            let (end, code) = match e {
                DirError::Local(e) => (StreamEnd::LocalReset(e), ResetCode::Peer),
                DirError::Unrecoverable(e) => {
                    (StreamEnd::Unrecoverable(e), ResetCode::Unrecoverable)
                }
                DirError::Closed => (StreamEnd::Aborted, ResetCode::Peer),
            };
            if !matches!(end, StreamEnd::Aborted) {
                let _ = to_session.send(ToSession::Control(Message::StreamReset {
                    stream: shared.id,
                    code,
                }));
            }
            end
        }
    }
}

/// The writing half of a leg and where its writer stands.
struct OutLeg {
    w: OwnedWriteHalf,
    /// Offset of the next byte to write.
    at: Offset,
    cut: CancellationToken,
    /// The start offset that opens the leg, and how much of it is written.
    head: [u8; LEG_START_LEN],
    head_sent: usize,
    /// For a compressed stream: the compressor, and the offset of the first
    /// byte of the chunk whose compressed form is still being written.
    zip: Option<(Compressor, Offset)>,
    /// The leg's send buffer, sized to its path while it is busy.
    sndbuf: SendBuffer,
}

impl OutLeg {
    fn new(
        w: OwnedWriteHalf,
        at: Offset,
        cut: CancellationToken,
        compression: Compression,
        size_send_buffer: bool,
    ) -> io::Result<Self> {
        let zip = match compression {
            Compression::None => None,
            Compression::Zstd => Some((Compressor::new()?, at)),
        };
        Ok(Self {
            w,
            at,
            cut,
            head: at.0.to_be_bytes(),
            head_sent: 0,
            zip,
            sndbuf: SendBuffer::new(size_send_buffer),
        })
    }

    /// Whether the peer can have read all this leg carried so far: it
    /// started properly and its path is not cut.
    fn is_good(&self) -> bool {
        self.head_sent == LEG_START_LEN && !self.cut.is_cancelled()
    }

    /// Where a successor leg may go on: the peer decodes whole chunks only,
    /// so a chunk not completely written counts as not sent.
    fn resume_point(&self) -> Offset {
        match &self.zip {
            Some((z, start)) if !z.pending().is_empty() => *start,
            _ => self.at,
        }
    }

    /// Accounts for `n` bytes written past the start offset.
    fn written(&mut self, n: usize, shared: &StreamShared) {
        let set = self.sndbuf.written(self.w.as_ref(), n);
        shared.leg_sndbuf.store(set, Ordering::Relaxed);
        shared.wire_out.fetch_add(n as u64, Ordering::Relaxed);
        match &mut self.zip {
            Some((z, _)) => z.consume(n),
            None => {
                self.at = self.at.advance(n);
                shared.plain_out.fetch_add(n as u64, Ordering::Relaxed);
                shared.sent(self.at);
            }
        }
    }

    /// Whether there is something to write with `end` the buffer's end.
    fn wants_write(&self, end: Offset) -> bool {
        self.head_sent < LEG_START_LEN
            || self.at < end
            || self
                .zip
                .as_ref()
                .is_some_and(|(z, _)| !z.pending().is_empty())
    }
}

async fn outbound(
    local: ReadHalf<'_>,
    mut events: mpsc::UnboundedReceiver<OutEvent>,
    shared: &StreamShared,
    limits: StreamLimits,
    to_session: &mpsc::UnboundedSender<ToSession>,
) -> Result<(), DirError> {
    // Bytes are read from the application straight into the replay
    // buffer's free room: no copy in between. Its ring is allocated when
    // the first bytes are there. A busy stream on one plain leg keeps and
    // sends them through pipes instead: no copy at all.
    let mut buf = Outbox::new(limits.replay_buffer);
    // The application's (or service's) receive queue, bounded on short
    // paths so that its bytes are still in cache when read (finding 26).
    let mut rcvbuf = RecvBuffer::new(limits.size_send_buffers);
    let mut idle = IdleTimer::default();
    let mut leg: Option<OutLeg> = None;
    let mut had_leg = false;
    let mut eof = false;
    // The last read was large: pipes are worth making.
    let mut busy = false;
    loop {
        // Done once the peer has been told where this direction ends: an
        // application that closed before the first leg (a port probe) is
        // told with that leg, so the stream waits for it.
        if eof && buf.is_empty() && had_leg {
            return Ok(());
        }
        // Pipes start at the end, so the leg must have written everything
        // before: from then on it writes only what the pipes queue.
        if busy && shared.compression == Compression::None {
            if let Some(l) = &leg {
                if l.is_good() && l.zip.is_none() && l.at == buf.end() {
                    buf.use_pipes();
                    busy = false;
                }
            }
        }
        let want_write = leg.as_ref().is_some_and(|l| l.wants_write(buf.end()));
        // A leg whose send buffer is sized to its path is on a short path.
        buf.set_window(match leg.as_ref().and_then(|l| l.sndbuf.size()) {
            Some(_) => SHORT_PATH_WINDOW,
            None => limits.replay_buffer,
        });
        let can_read = buf.can_read().map_err(DirError::Local)?;
        idle.watch(buf.holding());
        shared.out_buffer.store(buf.allocated(), Ordering::Relaxed);
        tokio::select! {
            biased;
            ev = events.recv() => match ev {
                None => return Err(DirError::Closed),
                Some(OutEvent::Ack(upto)) => {
                    // An ack beyond what was sent is a peer bug: never trust it to drop bytes.
                    buf.ack(upto).map_err(DirError::from)?;
                    shared.peer_acked.store(buf.start().0, Ordering::Relaxed);
                }
                Some(OutEvent::Leg(w, peer_has, cut, start)) => {
                    // `peer_has` may lie before the buffer's start: an ack
                    // sent after the peer chose it can overtake the new
                    // leg's reply. Those bytes were delivered, so the peer
                    // discards whatever comes at their offsets; past the
                    // end is a bug.
                    if peer_has > buf.end() {
                        return Err(DirError::Unrecoverable(ReplayError::BeyondEnd(peer_has.0, buf.end().0)));
                    }
                    buf.ack(peer_has).map_err(DirError::from)?;
                    shared.peer_acked.store(buf.start().0, Ordering::Relaxed);
                    let from = match (&leg, start) {
                        // Everything written to a good old leg reaches the
                        // peer before that leg's end, so the new one goes on
                        // from there.
                        (Some(old), LegStart::Continue) if old.is_good() => old.resume_point().max(peer_has),
                        _ => peer_has,
                    };
                    if let Some(old) = &leg {
                        if old.at > from {
                            shared.resent.fetch_add(old.at.0 - from.0, Ordering::Relaxed);
                        }
                    }
                    // A leg that goes on where the pipes' queue starts
                    // writes from it; any other start reads the ring.
                    if buf.queue_at() != Some(from) {
                        buf.back_to_ring().map_err(DirError::Local)?;
                    }
                    // Dropping the old writer ends that leg after the bytes
                    // already handed to it: the peer drains it up to `from`.
                    leg = Some(OutLeg::new(w, from, cut, shared.compression, limits.size_send_buffers).map_err(DirError::Local)?);
                    shared.leg_sndbuf.store(0, Ordering::Relaxed);
                    if !had_leg && eof {
                        let offset = buf.end();
                        let _ = to_session.send(ToSession::Control(Message::StreamFin { stream: shared.id, offset }));
                    }
                    had_leg = true;
                }
            },
            r = write_leg(&mut leg, &mut buf, shared), if want_write => {
                if let Err(_e) = r {
                    leg = None;
                    // The next leg starts where the peer says: from the ring.
                    buf.back_to_ring().map_err(DirError::Local)?;
                    let _ = to_session.send(ToSession::LegLost(shared.id));
                }
            }
            r = local.readable(), if !eof && buf.free() > 0 && can_read => {
                r.map_err(DirError::Local)?;
                let fresh = !buf.holding();
                let free = buf.free();
                let read = if let Some(pipes) = buf.pipes() {
                    let sock: &TcpStream = local.as_ref();
                    sock.try_io(Interest::READABLE, || pipes.take_from(sock, free))
                } else {
                    // Not empty: there is free room.
                    read_drained(local.as_ref(), buf.spare(CHUNK.min(free)))
                };
                match read {
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
                        if buf.pipes().is_none() {
                            buf.commit(n);
                            busy = n >= BUSY_READ;
                            // Straight on to the leg, if it takes them now.
                            if let Err(_e) = write_now(&mut leg, &buf, shared) {
                                leg = None;
                                let _ = to_session.send(ToSession::LegLost(shared.id));
                            }
                        } else if buf.queue_at().is_none() {
                            // The queue could not take the read whole: the
                            // leg goes on from the ring.
                            buf.back_to_ring().map_err(DirError::Local)?;
                        }
                        shared.taken.fetch_add(n as u64, Ordering::Relaxed);
                        rcvbuf.read(local.as_ref(), n);
                        idle.touch();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Readiness without bytes: an idle stream keeps no ring.
                        if fresh {
                            buf.release();
                        }
                    }
                    Err(e) => return Err(DirError::Local(e)),
                }
            }
            _ = idle.expired() => {
                // Freed only with nothing held; otherwise it is still needed.
                buf.release();
            }
        }
    }
}

/// Ends when a direction has moved no byte for [`IDLE_FREE`] while holding
/// buffers, so that they can be freed. Costs one timer firing per
/// `IDLE_FREE` while the direction is busy, nothing while it holds nothing.
#[derive(Default)]
struct IdleTimer {
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A byte moved since the timer was last set.
    busy: bool,
}

impl IdleTimer {
    /// Runs the timer while the direction holds buffers.
    fn watch(&mut self, holding: bool) {
        match (holding, &self.sleep) {
            (true, None) => {
                self.sleep = Some(Box::pin(tokio::time::sleep(IDLE_FREE)));
                self.busy = false;
            }
            (false, Some(_)) => self.sleep = None,
            _ => {}
        }
    }

    /// A byte moved.
    fn touch(&mut self) {
        self.busy = true;
    }

    /// Resolves once no byte moved for `IDLE_FREE`; the timer is then
    /// stopped ([`watch`](Self::watch) starts it again).
    async fn expired(&mut self) {
        let Some(sleep) = &mut self.sleep else {
            return std::future::pending().await;
        };
        loop {
            sleep.as_mut().await;
            if !std::mem::take(&mut self.busy) {
                break;
            }
            sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + IDLE_FREE);
        }
        self.sleep = None;
    }
}

/// Stands in for bytes the peer confirmed but a new leg must still carry
/// (see [`OutEvent::Leg`]): the peer skips offsets it already delivered.
static FILLER: [u8; 16 * 1024] = [0; 16 * 1024];

/// One write to the leg: the rest of its start offset, or bytes. Each call
/// makes at most one write, so dropping it in a `select!` loses nothing.
async fn write_leg(
    leg: &mut Option<OutLeg>,
    buf: &mut Outbox,
    shared: &StreamShared,
) -> io::Result<()> {
    let Some(l) = leg else {
        return std::future::pending().await;
    };
    let head = l.head_sent < LEG_START_LEN;
    if !head && l.zip.is_none() && buf.queue_at() == Some(l.at) {
        if let Some(pipes) = buf.pipes() {
            // Spliced from the pipes' queue: page references, no copy.
            let sock: &TcpStream = l.w.as_ref();
            if l.cut.is_cancelled() {
                return Err(io::ErrorKind::NotConnected.into());
            }
            // The socket first: when it is ready, as it is for most writes,
            // the cut is not waited on at all (no waiter to add and remove).
            tokio::select! {
                biased;
                r = sock.writable() => r?,
                _ = l.cut.cancelled() => return Err(io::ErrorKind::NotConnected.into()),
            }
            let n = match sock.try_io(Interest::WRITABLE, || pipes.send_to(sock)) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            l.at = l.at.advance(n);
            shared.sent(l.at);
            let set = l.sndbuf.written(sock, n);
            shared.leg_sndbuf.store(set, Ordering::Relaxed);
            shared.wire_out.fetch_add(n as u64, Ordering::Relaxed);
            shared.plain_out.fetch_add(n as u64, Ordering::Relaxed);
            shared.spliced_out.fetch_add(n as u64, Ordering::Relaxed);
            return Ok(());
        }
    }
    let buf = buf.ring();
    if !head {
        if let Some((z, chunk_at)) = &mut l.zip {
            if z.pending().is_empty() {
                // The next chunk, compressed and flushed whole; `at` moves
                // past it now, `resume_point` still says where it began.
                let plain = plain_from(l.at, buf)?;
                let plain = &plain[..plain.len().min(crate::codec::MAX_INPUT)];
                z.compress(plain)?;
                *chunk_at = l.at;
                l.at = l.at.advance(plain.len());
                shared.sent(l.at);
                shared
                    .plain_out
                    .fetch_add(plain.len() as u64, Ordering::Relaxed);
            }
        }
    }
    let bytes = if head {
        &l.head[l.head_sent..]
    } else if let Some((z, _)) = &l.zip {
        z.pending()
    } else {
        plain_from(l.at, buf)?
    };
    if l.cut.is_cancelled() {
        return Err(io::ErrorKind::NotConnected.into());
    }
    // The socket first, as above.
    let n = tokio::select! {
        biased;
        r = l.w.write(bytes) => r?,
        _ = l.cut.cancelled() => return Err(io::ErrorKind::NotConnected.into()),
    };
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    if head {
        l.head_sent += n;
        return Ok(());
    }
    l.written(n, shared);
    Ok(())
}

/// Writes the bytes just read from the application to the leg at once,
/// if it is a plain leg that takes them without waiting: a message then
/// costs one turn of the direction's loop instead of two (the second would
/// only find the leg writable and write). Anything else (the leg's start
/// offset, compression, pipes, a full send buffer) is left to [`write_leg`].
fn write_now(leg: &mut Option<OutLeg>, buf: &Outbox, shared: &StreamShared) -> io::Result<()> {
    let Some(l) = leg else { return Ok(()) };
    if !l.is_good() || l.zip.is_some() || l.at >= buf.end() {
        return Ok(());
    }
    let bytes = plain_from(l.at, buf.ring())?;
    match l.w.try_write(bytes) {
        Ok(0) => Err(io::ErrorKind::WriteZero.into()),
        Ok(n) => {
            l.written(n, shared);
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// The bytes to send from `at`: filler for what the peer already confirmed.
fn plain_from(at: Offset, buf: &ReplayBuffer) -> io::Result<&[u8]> {
    if at < buf.start() {
        Ok(&FILLER[..FILLER.len().min((buf.start().0 - at.0) as usize)])
    } else {
        buf.bytes_from(at)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// The reading half of a leg and where its reader stands.
struct InLeg {
    r: OwnedReadHalf,
    cut: CancellationToken,
    head: [u8; LEG_START_LEN],
    head_read: usize,
    /// Offset of the next byte to read, once the start offset is read.
    at: u64,
    /// For a compressed stream: the decompressor, and compressed bytes read
    /// but not consumed yet (kept between reads).
    unzip: Option<(Decompressor, Vec<u8>)>,
    /// The decompressor filled the last buffer it was given: it may hold
    /// more output.
    unzip_full: bool,
}

impl InLeg {
    fn new(r: OwnedReadHalf, cut: CancellationToken, compression: Compression) -> io::Result<Self> {
        let unzip = match compression {
            Compression::None => None,
            Compression::Zstd => Some((Decompressor::new()?, Vec::new())),
        };
        Ok(Self {
            r,
            cut,
            head: [0; LEG_START_LEN],
            head_read: 0,
            at: 0,
            unzip,
            unzip_full: false,
        })
    }

    /// The offset this leg's next byte belongs at, once known.
    fn next_offset(&self) -> Option<u64> {
        (self.head_read == LEG_START_LEN).then_some(self.at)
    }
}

/// Time a drained old leg may stay silent while a new leg waits for it.
const DRAIN_IDLE: Duration = Duration::from_secs(1);

async fn inbound(
    mut local: WriteHalf<'_>,
    mut events: mpsc::UnboundedReceiver<InEvent>,
    shared: &StreamShared,
    size_send_buffer: bool,
    to_session: &mpsc::UnboundedSender<ToSession>,
) -> Result<(), DirError> {
    let mut delivered = 0u64;
    let mut fin: Option<u64> = None;
    // The leg being read, and a newer one that takes over from it.
    let mut leg: Option<InLeg> = None;
    let mut next: Option<InLeg> = None;
    // Read buffers for `leg` and `next`, allocated when bytes are there.
    let mut buf = Vec::new();
    let mut buf2 = Vec::new();
    // While one uncompressed leg carries a busy stream, its bytes go from
    // the leg to the local connection through this pipe (`splice(2)`), never
    // through user space: this end keeps nothing it received. Made when a
    // large read marks the stream busy, dropped with the buffers when idle.
    let mut pipe: Option<SplicePipe> = None;
    // Set by a read of at least SPLICE_IN_READ, cleared by one under SMALL_READ.
    let mut busy = false;
    // The local connection's send buffer, sized to its path while busy.
    let mut sndbuf = SendBuffer::new(size_send_buffer);
    let mut idle = IdleTimer::default();
    // A leg that ends cleanly was closed by the peer: replaced (a new one is
    // on its way) or because the peer's side finished (the half-close is on
    // its way). Only if nothing comes within the grace is a new leg asked for.
    let mut lost_at: Option<tokio::time::Instant> = None;
    // Set while a new leg waits for the old one to reach its start.
    let mut drain_by: Option<tokio::time::Instant> = None;
    loop {
        if fin == Some(delivered) {
            local.shutdown().await.map_err(DirError::Local)?;
            // The final ack goes out now and explicitly: the stream may be
            // gone from the session before a batched flush would run.
            shared.acked_to_peer.store(delivered, Ordering::Relaxed);
            let ack = Message::Acks {
                entries: vec![(shared.id, Offset(delivered))],
            };
            let _ = to_session.send(ToSession::Control(ack));
            return Ok(());
        }
        // A leg that starts beyond what was delivered is read only once the
        // gap is filled: its bytes could not be delivered yet.
        let ready = |l: &Option<InLeg>| {
            l.as_ref()
                .is_some_and(|l| l.next_offset().is_none_or(|at| at <= delivered))
        };
        let (leg_ready, next_ready) = (ready(&leg), ready(&next));
        idle.watch(!buf.is_empty() || !buf2.is_empty() || pipe.is_some());
        // Splicing needs the leg's bytes to be exactly the next ones due:
        // a rewound leg (bytes to skip) or a second leg goes through `buf`.
        let splice = busy
            && next.is_none()
            && leg.as_ref().is_some_and(|l| {
                l.unzip.is_none() && l.next_offset().is_none_or(|at| at == delivered)
            });
        if splice && pipe.is_none() {
            // Out of descriptors, the bytes go through `buf` as before.
            pipe = SplicePipe::new(RECV_PIPE).ok();
            if pipe.is_some() {
                // Spliced bytes never enter it: its pages go back.
                buf = Vec::new();
            }
        }
        // A pipe's pages are the kernel's, and only while it holds bytes;
        // its capacity is what it may take.
        let piped = pipe.as_ref().map_or(0, SplicePipe::capacity);
        shared
            .in_buffer
            .store(buf.capacity() + buf2.capacity() + piped, Ordering::Relaxed);
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
                Some(InEvent::Leg(r, cut)) => {
                    let l = InLeg::new(r, cut, shared.compression).map_err(DirError::Local)?;
                    if leg.is_some() {
                        next = Some(l);
                        drain_by = None;
                    } else {
                        leg = Some(l);
                    }
                }
            },
            r = read_leg(&mut next, &mut buf2, NEXT_CHUNK, None, shared), if next_ready => match r {
                Ok(0) => {
                    // The start offset is in. Ahead of the delivered bytes,
                    // it waits for the old leg to bring the ones between.
                    if next.as_ref().and_then(InLeg::next_offset).is_some_and(|at| at > delivered) {
                        drain_by = Some(tokio::time::Instant::now() + DRAIN_IDLE);
                    }
                }
                Ok(n) => {
                    idle.touch();
                    // Both legs carry the same bytes at the same offsets; a
                    // rewound one starts a little behind. Until it brings
                    // bytes the old one has not, both are read, so the old
                    // path keeps the application fed; then the new leg
                    // takes over.
                    if let Some(l) = &mut next {
                        let start = l.at;
                        l.at += n as u64;
                        let before = delivered;
                        delivered = deliver(&mut local, &mut sndbuf, &buf2[..n], start, delivered, shared, to_session).await?;
                        if delivered > before {
                            leg = next.take();
                            drain_by = None;
                        }
                    }
                }
                Err(_) => {
                    next = None;
                    drain_by = None;
                }
            },
            r = read_leg(&mut leg, &mut buf, CHUNK, pipe.as_mut().filter(|_| splice), shared), if leg_ready => match r {
                Ok(0) => {
                    if leg.as_ref().and_then(InLeg::next_offset).is_some_and(|at| at > delivered) {
                        // The only leg starts past a gap (the peer went on
                        // from an old leg this end lost): ask for a rewound one.
                        leg = None;
                        let _ = to_session.send(ToSession::LegLost(shared.id));
                    }
                }
                Ok(n) => {
                    idle.touch();
                    if n >= SPLICE_IN_READ {
                        busy = true;
                    } else if n < SMALL_READ {
                        busy = false;
                    }
                    if let Some(l) = &mut leg {
                        let start = l.at;
                        l.at += n as u64;
                        delivered = match &mut pipe {
                            Some(p) if p.held() > 0 => deliver_spliced(&mut local, &mut sndbuf, p, start, delivered, shared, to_session).await?,
                            _ => deliver(&mut local, &mut sndbuf, &buf[..n], start, delivered, shared, to_session).await?,
                        };
                    }
                    if drain_by.is_some() {
                        drain_by = Some(tokio::time::Instant::now() + DRAIN_IDLE);
                    }
                }
                Err(e) => {
                    drain_by = None;
                    let gap = next.as_ref().and_then(InLeg::next_offset).is_some_and(|at| at > delivered);
                    if gap {
                        // The old leg ended before the new one's start: the
                        // bytes between are only in the peer's replay buffer.
                        next = None;
                        leg = None;
                        let _ = to_session.send(ToSession::LegLost(shared.id));
                    } else {
                        leg = next.take();
                        if leg.is_none() && fin != Some(delivered) {
                            if e.kind() == io::ErrorKind::UnexpectedEof {
                                lost_at = Some(tokio::time::Instant::now() + LEG_EOF_GRACE);
                            } else {
                                let _ = to_session.send(ToSession::LegLost(shared.id));
                            }
                        }
                    }
                }
            },
            _ = sleep_until_opt(drain_by) => {
                // The old leg stopped moving short of the new leg's start.
                drain_by = None;
                leg = None;
                next = None;
                let _ = to_session.send(ToSession::LegLost(shared.id));
            }
            _ = sleep_until_opt(lost_at) => {
                lost_at = None;
                if leg.is_none() && fin != Some(delivered) {
                    let _ = to_session.send(ToSession::LegLost(shared.id));
                }
            }
            _ = idle.expired() => {
                // A decompressor holding output gets a new buffer when read.
                buf = Vec::new();
                buf2 = Vec::new();
                pipe = None;
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

/// Compressed bytes a leg may hold undecoded: far more than one flushed
/// chunk needs, so only a hostile or broken peer reaches it.
const MAX_UNDECODED: usize = 1 << 20;

/// One read from the leg: part of its start offset (returns 0) or the
/// application's bytes (decompressed if the stream is). EOF is an error: a
/// leg only ends because it is replaced or broken. `buf` is allocated
/// (`size` bytes) only when bytes are there. Given `pipe` (the leg's bytes
/// are the next due, uncompressed), they are spliced into the pipe instead:
/// they are there when it holds any. Cancel-safe: state lives in the leg,
/// `buf` is scratch, and a pipe is filled only in the call's last step.
async fn read_leg(
    leg: &mut Option<InLeg>,
    buf: &mut Vec<u8>,
    size: usize,
    mut pipe: Option<&mut SplicePipe>,
    shared: &StreamShared,
) -> io::Result<usize> {
    let Some(l) = leg else {
        return std::future::pending().await;
    };
    loop {
        let head = l.head_read < LEG_START_LEN;
        if !head {
            if let Some((d, pending)) = &mut l.unzip {
                if !pending.is_empty() || l.unzip_full {
                    if buf.is_empty() {
                        *buf = vec![0; size];
                    }
                    // Decode what is held first: a read may carry more than fits.
                    let (used, made) = d.decompress(pending, buf)?;
                    pending.drain(..used);
                    l.unzip_full = made == buf.len();
                    if made > 0 {
                        shared.plain_in.fetch_add(made as u64, Ordering::Relaxed);
                        return Ok(made);
                    }
                    if pending.len() > MAX_UNDECODED {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "compressed data does not decode",
                        ));
                    }
                }
            }
        }
        if l.cut.is_cancelled() {
            return Err(io::ErrorKind::NotConnected.into());
        }
        // The socket first: a leg with bytes waiting is read without
        // waiting on the cut (no waiter to add and remove).
        tokio::select! {
            biased;
            r = l.r.readable() => r?,
            _ = l.cut.cancelled() => return Err(io::ErrorKind::NotConnected.into()),
        }
        let read = if head {
            l.r.try_read(&mut l.head[l.head_read..])
        } else if let Some(p) = pipe.as_deref_mut() {
            let sock: &TcpStream = l.r.as_ref();
            sock.try_io(Interest::READABLE, || p.fill_from(sock, RECV_PIPE))
        } else if buf.is_empty() {
            // The first read after an idle spell goes to the stack: the
            // readiness may be stale (the leg's preamble was read before
            // this task had the leg), and a leg with nothing to read must
            // not cost an allocation, let alone a zeroed one.
            let mut first = [0u8; 2048];
            let r = read_drained(l.r.as_ref(), &mut first);
            if let Ok(n @ 1..) = r {
                // calloc'd, not written: pages no read reaches stay unused.
                *buf = vec![0; size];
                buf[..n].copy_from_slice(&first[..n]);
            }
            r
        } else {
            read_drained(l.r.as_ref(), buf)
        };
        let n = match read {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if head {
            l.head_read += n;
            if l.head_read == LEG_START_LEN {
                l.at = u64::from_be_bytes(l.head);
            }
            return Ok(0);
        }
        shared.wire_in.fetch_add(n as u64, Ordering::Relaxed);
        match &mut l.unzip {
            Some((_, pending)) => pending.extend_from_slice(&buf[..n]),
            None => {
                shared.plain_in.fetch_add(n as u64, Ordering::Relaxed);
                return Ok(n);
            }
        }
    }
}

/// One read from a socket that said it was readable. A read that fills less
/// than `buf` emptied the socket's receive queue, so its readiness is
/// cleared then, as tokio's own `poll_read` does on epoll (tokio issue
/// 5866): the next wait goes straight to the event loop instead of first
/// making a read that finds nothing. For a stream of messages that is one
/// system call fewer per message at each socket. Should bytes come in
/// between, their readiness event is newer than the one cleared and stands.
fn read_drained(sock: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let len = buf.len();
    let mut short = 0;
    let r = sock.try_io(Interest::READABLE, || {
        let n = sock.try_read(buf)?;
        if n > 0 && n < len {
            short = n;
            // Makes `try_io` clear the readiness it saw.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => Ok(short),
        r => r,
    }
}

/// Writes the part of `data` (which starts at stream offset `start`) that
/// lies beyond `delivered`; returns the new delivered offset.
async fn deliver(
    local: &mut WriteHalf<'_>,
    sndbuf: &mut SendBuffer,
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
        return Err(DirError::Unrecoverable(ReplayError::Missing(
            delivered, start,
        )));
    }
    let skip = (delivered - start) as usize;
    local
        .write_all(&data[skip..])
        .await
        .map_err(DirError::Local)?;
    let set = sndbuf.written(local.as_ref(), data.len() - skip);
    shared.local_sndbuf.store(set, Ordering::Relaxed);
    shared.on_delivered(Instant::now(), to_session, end);
    Ok(end)
}

/// [`deliver`] for bytes spliced into `pipe` (which start at `start`, the
/// delivered offset): moves them all to the local connection.
async fn deliver_spliced(
    local: &mut WriteHalf<'_>,
    sndbuf: &mut SendBuffer,
    pipe: &mut SplicePipe,
    start: u64,
    delivered: u64,
    shared: &StreamShared,
    to_session: &mpsc::UnboundedSender<ToSession>,
) -> Result<u64, DirError> {
    if start != delivered {
        // Splicing is only chosen for a leg whose next byte is the next due.
        return Err(DirError::Unrecoverable(ReplayError::Missing(
            delivered, start,
        )));
    }
    let sock: &TcpStream = local.as_ref();
    let mut at = start;
    while pipe.held() > 0 {
        sock.writable().await.map_err(DirError::Local)?;
        match sock.try_io(Interest::WRITABLE, || pipe.drain_to(sock)) {
            Ok(n) => {
                at += n as u64;
                shared.spliced_in.fetch_add(n as u64, Ordering::Relaxed);
                let set = sndbuf.written(sock, n);
                shared.local_sndbuf.store(set, Ordering::Relaxed);
                shared.on_delivered(Instant::now(), to_session, at);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(DirError::Local(e)),
        }
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Two ends of a loopback TCP connection.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn pattern(from: u64, to: u64) -> Vec<u8> {
        (from..to).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A stream whose peer is played by hand: returns the application's
    /// end, the stream, what the stream asks of its session, and the task.
    async fn receiver() -> (
        TcpStream,
        Arc<StreamShared>,
        mpsc::UnboundedReceiver<ToSession>,
        tokio::task::JoinHandle<StreamEnd>,
    ) {
        let (app, local) = pair().await;
        let limits = StreamLimits {
            replay_buffer: 1 << 20,
            ..StreamLimits::default()
        };
        let (shared, inbox) = StreamShared::new(StreamId(1), limits, CancellationToken::new());
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(local, shared.clone(), inbox, limits, tx));
        (app, shared, rx, task)
    }

    /// The acknowledgement requests a stream sent its session so far.
    fn ack_requests(rx: &mut mpsc::UnboundedReceiver<ToSession>) -> Vec<AckDue> {
        let mut dues = Vec::new();
        while let Ok(m) = rx.try_recv() {
            if let ToSession::Ack { stream, due } = m {
                assert_eq!(stream, StreamId(1));
                dues.push(due);
            }
        }
        dues
    }

    #[test]
    fn an_acknowledgement_waits_longer_while_the_sender_holds_little() {
        let limits = StreamLimits {
            replay_buffer: 1 << 20,
            ..StreamLimits::default()
        };
        let (s, _inbox) = StreamShared::new(StreamId(1), limits, CancellationToken::new());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        // Small deliveries ask once, to be acknowledged later.
        for total in [64, 128, 4096] {
            s.on_delivered(now, &tx, total);
        }
        assert_eq!(ack_requests(&mut rx), [AckDue::Later]);
        // Past ACK_FEW_BYTES unconfirmed, once more, sooner.
        s.on_delivered(now, &tx, ACK_FEW_BYTES);
        s.on_delivered(now, &tx, ACK_FEW_BYTES + 10);
        assert_eq!(ack_requests(&mut rx), [AckDue::Soon]);
        // A quarter of the sender's buffer (256 KiB here): at once.
        s.on_delivered(now, &tx, 256 * 1024);
        s.on_delivered(now, &tx, 300 * 1024);
        assert_eq!(ack_requests(&mut rx), [AckDue::Now]);
        // The session acknowledges: the next deliveries count from there.
        assert_eq!(s.take_ack(), Some(Offset(300 * 1024)));
        s.on_delivered(now, &tx, 300 * 1024 + 64);
        assert_eq!(ack_requests(&mut rx), [AckDue::Later]);
        assert_eq!(s.take_ack(), Some(Offset(300 * 1024 + 64)));
        s.on_delivered(now, &tx, 300 * 1024 + 64 + ACK_FEW_BYTES);
        assert_eq!(ack_requests(&mut rx), [AckDue::Soon]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_batch_flushes_at_its_most_pressing_request() {
        let mut acks = AckBatch::default();
        let t0 = tokio::time::Instant::now();
        acks.request(StreamId(1), AckDue::Later);
        acks.due().await;
        assert_eq!(t0.elapsed(), ACK_DELAY_FEW);
        let entries = |acks: &mut AckBatch| {
            acks.take(true, |id| Some(Offset(id.0)))
                .into_iter()
                .flat_map(|m| match m {
                    Message::Acks { entries } => entries,
                    other => panic!("not an ack: {other:?}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(entries(&mut acks), [(StreamId(1), Offset(1))]);
        // A stream asking sooner brings the flush forward for both.
        let t1 = tokio::time::Instant::now();
        acks.request(StreamId(1), AckDue::Later);
        acks.request(StreamId(2), AckDue::Soon);
        acks.due().await;
        assert_eq!(t1.elapsed(), ACK_DELAY);
        let mut got = entries(&mut acks);
        got.sort_by_key(|(id, _)| id.0);
        assert_eq!(got, [(StreamId(1), Offset(1)), (StreamId(2), Offset(2))]);
        // Now is now.
        let t2 = tokio::time::Instant::now();
        acks.request(StreamId(3), AckDue::Later);
        acks.request(StreamId(3), AckDue::Now);
        acks.due().await;
        assert_eq!(t2.elapsed(), Duration::ZERO);
    }

    /// On the real clock an urgent flush is ready when first polled: it does
    /// not wait for the timer's next millisecond tick while the peer's
    /// buffer is full.
    #[tokio::test]
    async fn an_urgent_ack_does_not_wait_for_the_timer() {
        // Whether a future is ready at its first poll.
        async fn ready_at_once(f: impl Future<Output = ()>) -> bool {
            let mut f = std::pin::pin!(f);
            std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_ready())).await
        }
        let mut acks = AckBatch::default();
        for round in 0..100 {
            acks.request(StreamId(round), AckDue::Now);
            assert!(
                ready_at_once(acks.due()).await,
                "round {round}: the flush waited for a tick"
            );
            assert_eq!(acks.take(true, |id| Some(Offset(id.0))).len(), 1);
        }
        // One not yet due still waits.
        acks.request(StreamId(1), AckDue::Soon);
        assert!(!ready_at_once(acks.due()).await);
    }

    /// Attaches a leg and returns the peer's end of it.
    async fn leg(s: &StreamShared) -> TcpStream {
        let (mine, peer) = pair().await;
        s.attach_leg(mine, Offset(0), LegStart::Rewind, CancellationToken::new());
        peer
    }

    async fn send(leg: &mut TcpStream, start: u64, upto: u64) {
        leg.write_all(&start.to_be_bytes()).await.unwrap();
        leg.write_all(&pattern(start, upto)).await.unwrap();
    }

    async fn read_exact(app: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(Duration::from_secs(5), app.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        got
    }

    async fn leg_lost(rx: &mut mpsc::UnboundedReceiver<ToSession>) -> bool {
        let wait = async {
            loop {
                match rx.recv().await {
                    Some(ToSession::LegLost(_)) => return true,
                    Some(_) => {}
                    None => return false,
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(3), wait)
            .await
            .unwrap_or(false)
    }

    /// The peer's first leg has delivered `0..delivered`; a second leg then
    /// opens and brings `from..upto`. Returns both legs' peer ends.
    async fn two_legs(
        s: &StreamShared,
        app: &mut TcpStream,
        delivered: u64,
        from: u64,
        upto: u64,
    ) -> (TcpStream, TcpStream) {
        let mut old = leg(s).await;
        send(&mut old, 0, delivered).await;
        assert_eq!(
            read_exact(app, delivered as usize).await,
            pattern(0, delivered)
        );
        let mut new = leg(s).await;
        send(&mut new, from, upto).await;
        (old, new)
    }

    #[tokio::test]
    async fn a_leg_that_starts_ahead_waits_until_the_old_leg_is_drained() {
        let (mut app, s, mut rx, _task) = receiver().await;
        // The peer goes on at 1500 on the new leg before the old one has
        // brought 1000..1500: the new leg's bytes must wait.
        let (mut old, _new) = two_legs(&s, &mut app, 1000, 1500, 3000).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        old.write_all(&pattern(1000, 1500)).await.unwrap();
        drop(old);
        assert_eq!(read_exact(&mut app, 2000).await, pattern(1000, 3000));
        assert!(rx
            .try_recv()
            .map_or(true, |m| !matches!(m, ToSession::LegLost(_))));
        assert_eq!(s.delivered.load(Ordering::Acquire), 3000);
    }

    #[tokio::test]
    async fn an_old_leg_that_breaks_short_of_the_new_start_asks_for_a_rewound_leg() {
        let (mut app, s, mut rx, _task) = receiver().await;
        let (mut old, _new) = two_legs(&s, &mut app, 1000, 1500, 3000).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // 1200..1500 never arrive on the old leg.
        old.write_all(&pattern(1000, 1200)).await.unwrap();
        drop(old);
        assert!(
            leg_lost(&mut rx).await,
            "the gap must be refilled by a rewound leg"
        );
        assert_eq!(read_exact(&mut app, 200).await, pattern(1000, 1200));
        // The rewound leg starts at what was delivered; nothing skipped, nothing doubled.
        let mut again = leg(&s).await;
        send(&mut again, 1200, 4000).await;
        assert_eq!(read_exact(&mut app, 2800).await, pattern(1200, 4000));
    }

    #[tokio::test]
    async fn an_old_leg_that_stops_moving_is_given_up_after_the_drain_time() {
        let (mut app, s, mut rx, _task) = receiver().await;
        let (old, _new) = two_legs(&s, &mut app, 500, 900, 1000).await;
        // The old leg stays open but silent (a black-holed path).
        let started = Instant::now();
        assert!(leg_lost(&mut rx).await);
        assert!(
            started.elapsed() >= DRAIN_IDLE - Duration::from_millis(50),
            "gave up after {:?}",
            started.elapsed()
        );
        let mut again = leg(&s).await;
        send(&mut again, 500, 1000).await;
        assert_eq!(read_exact(&mut app, 500).await, pattern(500, 1000));
        drop(old);
    }

    #[tokio::test]
    async fn a_rewound_leg_is_read_alongside_the_old_one_and_skips_what_was_delivered() {
        let (mut app, s, _rx, _task) = receiver().await;
        let (old, _new) = two_legs(&s, &mut app, 800, 300, 2000).await;
        assert_eq!(read_exact(&mut app, 1200).await, pattern(800, 2000));
        drop(old);
    }

    /// Whether the socket's readiness is still set (looked at without
    /// changing it: no read is made).
    fn still_readable(s: &TcpStream) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        s.poll_read_ready(&mut cx).is_ready()
    }

    /// A read that leaves room in the buffer clears the readiness (no empty
    /// read follows it), one that fills it keeps the readiness for what is
    /// left, and bytes sent after a clear wake the reader again.
    #[tokio::test]
    async fn a_short_read_clears_readiness_and_later_bytes_wake_again() {
        let (mut a, b) = pair().await;
        let mut buf = [0u8; 100];
        for i in 0..50u8 {
            a.write_all(&[i; 10]).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), b.readable())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(read_drained(&b, &mut buf).unwrap(), 10);
            assert_eq!(buf[..10], [i; 10]);
            assert!(!still_readable(&b), "readiness kept after a short read");
        }
        a.write_all(&[7; 30]).await.unwrap();
        b.readable().await.unwrap();
        let mut ten = [0u8; 10];
        // A read that fills the buffer says nothing about what is left.
        assert_eq!(read_drained(&b, &mut ten).unwrap(), 10);
        assert!(still_readable(&b), "readiness cleared with bytes left");
        assert_eq!(read_drained(&b, &mut buf).unwrap(), 20);
        assert!(!still_readable(&b));
        drop(a);
        b.readable().await.unwrap();
        assert_eq!(read_drained(&b, &mut buf).unwrap(), 0, "end of stream");
    }

    /// Buffers are taken when bytes come and given back when the stream has
    /// been idle; the replay ring only once the peer confirmed its bytes.
    #[tokio::test]
    async fn an_idle_stream_holds_no_buffer() {
        let (mut app, s, _rx, _task) = receiver().await;
        let (mine, mut peer) = pair().await;
        s.attach_leg(mine, Offset(0), LegStart::Rewind, CancellationToken::new());
        peer.write_all(&0u64.to_be_bytes()).await.unwrap();
        // The writer opened the leg: the stream runs, and holds nothing.
        assert_eq!(read_exact(&mut peer, 8).await, 0u64.to_be_bytes());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.buffer_bytes(), 0);

        app.write_all(&pattern(0, 1000)).await.unwrap();
        assert_eq!(read_exact(&mut peer, 1000).await, pattern(0, 1000));
        // More than the first read after an idle spell takes: the rest is
        // spliced, through a pipe made for it.
        peer.write_all(&pattern(0, 3000)).await.unwrap();
        assert_eq!(read_exact(&mut app, 3000).await, pattern(0, 3000));
        let inbound = || s.in_buffer.load(Ordering::Relaxed);
        assert!(eventually(|| inbound() > 4096).await, "{}", inbound());
        assert!(s.out_buffer.load(Ordering::Relaxed) > 0);

        // Idle: the read buffer and pipe go; the ring stays while it holds
        // bytes the peer has not confirmed.
        assert!(eventually(|| inbound() == 0).await, "{}", inbound());
        assert!(s.buffer_bytes() > 0);
        s.out_tx.send(OutEvent::Ack(Offset(1000))).unwrap();
        assert!(
            eventually(|| s.buffer_bytes() == 0).await,
            "{}",
            s.buffer_bytes()
        );

        // And the stream goes on, byte-exact, with new buffers.
        app.write_all(&pattern(1000, 2000)).await.unwrap();
        assert_eq!(read_exact(&mut peer, 1000).await, pattern(1000, 2000));
        peer.write_all(&pattern(3000, 4000)).await.unwrap();
        assert_eq!(read_exact(&mut app, 1000).await, pattern(3000, 4000));
        assert!(s.buffer_bytes() > 0);
    }

    /// Reads the leg until it has been quiet for 300 ms.
    async fn read_until_quiet(peer: &mut TcpStream, got: &mut Vec<u8>) {
        let mut chunk = vec![0; 64 * 1024];
        while let Ok(r) =
            tokio::time::timeout(Duration::from_millis(300), peer.read(&mut chunk)).await
        {
            let n = r.unwrap();
            assert!(n > 0, "the leg closed");
            got.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads until `got` holds `want` bytes (a sender starved on a busy
    /// machine may pause longer than a quiet spell), then until quiet, so
    /// that anything sent beyond `want` is in `got` too.
    async fn read_at_least(peer: &mut TcpStream, got: &mut Vec<u8>, want: usize) {
        let mut chunk = vec![0; 64 * 1024];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while got.len() < want {
            let n = tokio::time::timeout_at(deadline, peer.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("{} of {want} bytes came", got.len()))
                .unwrap();
            assert!(n > 0, "the leg closed");
            got.extend_from_slice(&chunk[..n]);
        }
        read_until_quiet(peer, got).await;
    }

    /// A sender with an 8 MiB replay buffer whose application offers 6 MiB,
    /// and a peer that reads all the leg brings and confirms nothing: how
    /// many bytes the stream sends before it stops taking the application's,
    /// and how many in all once the peer confirmed the first MiB (read until
    /// at least `expect` of each has come, and then until quiet).
    async fn sent_unconfirmed(size_send_buffers: bool, expect: (usize, usize)) -> (usize, usize) {
        let (app, local) = pair().await;
        let limits = StreamLimits {
            replay_buffer: 8 << 20,
            size_send_buffers,
            ..StreamLimits::default()
        };
        let (s, inbox) = StreamShared::new(StreamId(1), limits, CancellationToken::new());
        let (tx, _session) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(local, s.clone(), inbox, limits, tx));
        let (mine, mut peer) = pair().await;
        s.attach_leg(mine, Offset(0), LegStart::Rewind, CancellationToken::new());
        let (_app_r, mut app_w) = app.into_split();
        let writer = tokio::spawn(async move {
            let _ = app_w.write_all(&pattern(0, 6 << 20)).await;
            app_w
        });
        let mut got = Vec::new();
        read_at_least(&mut peer, &mut got, 8 + expect.0).await;
        let first = got.len() - 8;
        s.out_tx.send(OutEvent::Ack(Offset(1 << 20))).unwrap();
        read_at_least(&mut peer, &mut got, 8 + expect.1).await;
        let then = got.len() - 8;
        assert_eq!(&got[..8], &0u64.to_be_bytes());
        assert!(
            got[8..] == pattern(0, then as u64)[..],
            "the bytes sent differ"
        );
        writer.abort();
        task.abort();
        (first, then)
    }

    /// On loopback, where the leg's send buffer is sized to the path, a
    /// direction keeps at most the short path's window unconfirmed, not its
    /// whole replay buffer; with the kernel's sizing it uses the buffer.
    #[tokio::test]
    async fn a_short_path_keeps_a_small_window_unconfirmed() {
        let short = (SHORT_PATH_WINDOW, SHORT_PATH_WINDOW + (1 << 20));
        let (first, then) = sent_unconfirmed(true, short).await;
        assert_eq!(first, short.0, "sent before any confirmation");
        assert_eq!(then, short.1, "sent after 1 MiB was confirmed");
        let (first, then) = sent_unconfirmed(false, (6 << 20, 6 << 20)).await;
        assert_eq!((first, then), (6 << 20, 6 << 20));
    }

    async fn eventually(f: impl Fn() -> bool) -> bool {
        for _ in 0..500 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        f()
    }

    /// Gives the stream its first leg and has the application send `n`
    /// bytes through it; returns the leg's far end, past those bytes.
    async fn first_leg(s: &StreamShared, app: &mut TcpStream, n: u64) -> TcpStream {
        let (mine, mut peer) = pair().await;
        s.attach_leg(mine, Offset(0), LegStart::Rewind, CancellationToken::new());
        app.write_all(&pattern(0, n)).await.unwrap();
        let mut got = vec![0; 8 + n as usize];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..8], &0u64.to_be_bytes());
        assert_eq!(&got[8..], &pattern(0, n)[..]);
        peer
    }

    /// The writer: after a planned switch it goes on where the old leg
    /// stopped; after a failure it rewinds to what the peer has.
    #[tokio::test]
    async fn the_writer_continues_on_a_planned_switch_and_rewinds_otherwise() {
        let (mut app, s, _rx, _task) = receiver().await;
        let mut old = first_leg(&s, &mut app, 5000).await;

        // Planned: the peer reports 3000 delivered, but the old leg is good
        // and has carried up to 5000, so the new leg starts at 5000.
        let (mine, mut planned) = pair().await;
        s.attach_leg(
            mine,
            Offset(3000),
            LegStart::Continue,
            CancellationToken::new(),
        );
        app.write_all(&pattern(5000, 6000)).await.unwrap();
        let mut got = vec![0; 8 + 1000];
        planned.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..8], &5000u64.to_be_bytes());
        assert_eq!(&got[8..], &pattern(5000, 6000)[..]);
        // The old leg is closed after what it carried.
        let mut rest = Vec::new();
        old.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(s.resent.load(Ordering::Relaxed), 0);

        // After a failure: rewind to what the peer reports (4500).
        let (mine, mut rewound) = pair().await;
        s.attach_leg(
            mine,
            Offset(4500),
            LegStart::Rewind,
            CancellationToken::new(),
        );
        let mut got = vec![0; 8 + 1500];
        rewound.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..8], &4500u64.to_be_bytes());
        assert_eq!(&got[8..], &pattern(4500, 6000)[..]);
        assert_eq!(s.resent.load(Ordering::Relaxed), 1500);
    }

    /// What a stream handed to legs and the peer did not confirm is
    /// counted whichever way it was written (straight after the
    /// application's read, or by the leg's writer for a bulk read): it
    /// bounds what a leg written before the peer's reply sends twice.
    #[tokio::test]
    async fn bytes_sent_and_unconfirmed_are_counted_on_every_write_path() {
        let (mut app, s, _rx, _task) = receiver().await;
        let mut peer = first_leg(&s, &mut app, 5000).await;
        assert!(
            eventually(|| s.sent_unconfirmed() == 5000).await,
            "{}",
            s.sent_unconfirmed()
        );
        s.out_tx.send(OutEvent::Ack(Offset(3000))).unwrap();
        assert!(
            eventually(|| s.sent_unconfirmed() == 2000).await,
            "{}",
            s.sent_unconfirmed()
        );
        let big = pattern(5000, 5000 + (600 << 10));
        let (w, r) = tokio::join!(app.write_all(&big), async {
            let mut got = vec![0; big.len()];
            peer.read_exact(&mut got).await.map(|_| got)
        });
        w.unwrap();
        assert!(r.unwrap() == big);
        let want = 2000 + (600 << 10);
        assert!(
            eventually(|| s.sent_unconfirmed() == want).await,
            "{} != {want}",
            s.sent_unconfirmed()
        );
    }

    /// A leg's writer handed over before its reader (a leg written before
    /// the peer's reply): the writer starts at the offset given, the reader
    /// comes later on the same socket, and handing it over does not end
    /// the writing side.
    #[tokio::test]
    async fn a_leg_writer_handed_over_before_its_reader_keeps_writing() {
        let (mut app, s, _rx, _task) = receiver().await;
        first_leg(&s, &mut app, 3000).await;
        // A new leg: its writer first, from 1000 (the peer confirmed no more).
        let (mine, mut peer) = pair().await;
        let mine = mine.into_std().unwrap();
        let writer = mine.try_clone().unwrap();
        let cut = CancellationToken::new();
        s.attach_writer(writer, Offset(1000), LegStart::Rewind, cut.clone());
        app.write_all(&pattern(3000, 4000)).await.unwrap();
        let mut got = vec![0; 8 + 3000];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..8], &1000u64.to_be_bytes());
        assert_eq!(&got[8..], &pattern(1000, 4000)[..]);
        // Then its reader: the peer's bytes reach the application.
        s.attach_reader(TcpStream::from_std(mine).unwrap(), cut);
        peer.write_all(&0u64.to_be_bytes()).await.unwrap();
        peer.write_all(b"hello").await.unwrap();
        let mut hello = [0u8; 5];
        app.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello");
        // And the writer still writes.
        app.write_all(&pattern(4000, 4500)).await.unwrap();
        let mut got = vec![0; 500];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got, pattern(4000, 4500));
    }
}
