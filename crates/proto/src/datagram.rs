//! Relayed datagrams of UDP services.
//!
//! A UDP service's datagrams cross between the client agent and the
//! gateway's UDP port (the one that answers path probes) one for one, each
//! in a datagram of its own with a small header in front and a tag behind;
//! the application's payload is carried unchanged:
//!
//! ```text
//! magic "BTND" | version | kind | session id (8) | flow id (4) | seq (8) | payload | tag (32)
//! ```
//!
//! `kind` says what the datagram is and who sent it: 1 data from the
//! client agent, 2 data from the gateway, 3 an announce (client agent, no
//! payload: "this is my address now", sent after every switch so that the
//! gateway follows a flow that only receives), 4 the gateway's answer to
//! it. The tag is HMAC-SHA256 under the session's datagram key over
//! everything before it; since `kind` names the sender, a datagram
//! reflected back to its sender never opens. Each sender numbers its
//! datagrams from 1 in one sequence per session (all flows together); the
//! receiver keeps a [`ReplayWindow`] so that a replayed datagram is
//! refused, and only the newest datagram may move the peer's address.
//!
//! Flows are announced on the control connection (`FlowOpen`, `FlowReply`,
//! `FlowClose`) by the side that opens them: the client agent for a UDP
//! service, the gateway for a UDP client service; while a flow cannot be sent on (no path, no answer yet)
//! its datagrams wait in a bounded [`HoldQueue`] that drops the oldest.

use std::collections::VecDeque;

use ring::hmac;

use crate::crypto::{LegKey, Role};

/// Header length: magic, version, kind, session id, flow id, sequence.
pub const HEADER_LEN: usize = 4 + 1 + 1 + 8 + 4 + 8;
/// Length of the tag after the payload.
pub const DATAGRAM_TAG_LEN: usize = 32;
/// What baton adds to each application datagram.
pub const OVERHEAD: usize = HEADER_LEN + DATAGRAM_TAG_LEN;
/// Largest relayed datagram on the wire, below IPv4's UDP limit (65,507)
/// with room to spare for IP options and tunnels.
pub const MAX_DATAGRAM: usize = 65_000;
/// Largest application payload relayed; larger datagrams are dropped and
/// counted.
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM - OVERHEAD;

const MAGIC: &[u8; 4] = b"BTND";
const VERSION: u8 = 1;

/// Identifies a flow within its session: one application source address
/// of one UDP service, allocated by the client agent counting up from 1, or
/// one server source address of one UDP client service (server → client),
/// allocated by the gateway with [`FlowId::GATEWAY`] set, so that the two
/// spaces never meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub u32);

impl FlowId {
    /// The bit that marks an id allocated by the gateway.
    pub const GATEWAY: u32 = 1 << 31;

    /// Whether the gateway opened this flow (a UDP client service's).
    pub fn is_gateway_opened(self) -> bool {
        self.0 & Self::GATEWAY != 0
    }
}

impl std::fmt::Display for FlowId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_gateway_opened() {
            write!(f, "gf{}", self.0 & !Self::GATEWAY)
        } else {
            write!(f, "f{}", self.0)
        }
    }
}

/// What a datagram carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An application datagram of a flow.
    Data,
    /// From the client agent: its address for the session (no flow, no
    /// payload). From the gateway: the answer, which tells the client agent
    /// that the gateway follows its new address.
    Announce,
}

impl Kind {
    fn code(self, sender: Role) -> u8 {
        match (self, sender) {
            (Self::Data, Role::Client) => 1,
            (Self::Data, Role::Gateway) => 2,
            (Self::Announce, Role::Client) => 3,
            (Self::Announce, Role::Gateway) => 4,
        }
    }

    fn from_code(code: u8, sender: Role) -> Option<Self> {
        [Self::Data, Self::Announce]
            .into_iter()
            .find(|k| k.code(sender) == code)
    }
}

/// The header of a relayed datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Data or announce.
    pub kind: Kind,
    /// The session the datagram belongs to.
    pub session_id: u64,
    /// The flow (0 for an announce).
    pub flow: FlowId,
    /// The sender's sequence number in this session, from 1.
    pub seq: u64,
}

/// A payload too large to relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "datagram of {0} bytes is larger than the {MAX_PAYLOAD} bytes a relayed datagram can carry"
)]
pub struct TooLarge(pub usize);

impl Header {
    /// The session id of bytes that look like a relayed datagram (either
    /// direction), to find the key to open them with.
    pub fn peek_session(bytes: &[u8]) -> Option<u64> {
        if bytes.len() < OVERHEAD
            || bytes.len() > MAX_DATAGRAM
            || &bytes[..4] != MAGIC
            || bytes[4] != VERSION
        {
            return None;
        }
        Some(u64::from_be_bytes(bytes[6..14].try_into().ok()?))
    }

    /// Appends the datagram carrying `payload`, sent by `sender`, to `out`.
    pub fn seal(
        &self,
        sender: Role,
        payload: &[u8],
        key: &LegKey,
        out: &mut Vec<u8>,
    ) -> Result<(), TooLarge> {
        if payload.len() > MAX_PAYLOAD {
            return Err(TooLarge(payload.len()));
        }
        let start = out.len();
        out.reserve(OVERHEAD + payload.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.kind.code(sender));
        out.extend_from_slice(&self.session_id.to_be_bytes());
        out.extend_from_slice(&self.flow.0.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(payload);
        let tag = hmac::sign(key.datagram_key(), &out[start..]);
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Checks a datagram that `sender` must have sent under `key`; returns
    /// its header and payload, or `None` for anything else (wrong length,
    /// magic, version or kind, reflected, forged or corrupted). Replays
    /// open: the caller's [`ReplayWindow`] refuses them.
    pub fn open<'a>(bytes: &'a [u8], key: &LegKey, sender: Role) -> Option<(Self, &'a [u8])> {
        let session_id = Self::peek_session(bytes)?;
        let body = bytes.len() - DATAGRAM_TAG_LEN;
        hmac::verify(key.datagram_key(), &bytes[..body], &bytes[body..]).ok()?;
        let kind = Kind::from_code(bytes[5], sender)?;
        let flow = FlowId(u32::from_be_bytes(bytes[14..18].try_into().ok()?));
        let seq = u64::from_be_bytes(bytes[18..26].try_into().ok()?);
        if seq == 0 {
            return None;
        }
        Some((
            Self {
                kind,
                session_id,
                flow,
                seq,
            },
            &bytes[HEADER_LEN..body],
        ))
    }
}

/// Sequence numbers remembered behind the newest one.
pub const WINDOW: u64 = 4096;
const WORDS: usize = (WINDOW / 64) as usize;

/// Why a datagram's sequence number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WindowReject {
    /// Already received: a replay (or a duplicate from the network).
    #[error("sequence number already received")]
    Replay,
    /// So far behind the newest that the window no longer knows it.
    #[error("sequence number too old")]
    TooOld,
}

/// The receiver's sliding window over the peer's sequence numbers: each
/// number is accepted at most once, and only within [`WINDOW`] of the
/// newest. Fed only with authenticated datagrams, so a forger cannot move
/// it.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    top: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self {
            top: 0,
            bits: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// The newest sequence number accepted so far (0: none).
    pub fn top(&self) -> u64 {
        self.top
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    /// Accepts `seq` once. `Ok(true)` when it is the newest so far: only
    /// such a datagram may move the peer's address, so that a late one
    /// from the old path never moves it back.
    pub fn accept(&mut self, seq: u64) -> Result<bool, WindowReject> {
        if seq == 0 {
            return Err(WindowReject::TooOld);
        }
        if seq > self.top {
            if seq - self.top >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for s in self.top + 1..seq {
                    let (w, m) = Self::bit(s);
                    self.bits[w] &= !m;
                }
            }
            self.top = seq;
            let (w, m) = Self::bit(seq);
            self.bits[w] |= m;
            return Ok(true);
        }
        if self.top - seq >= WINDOW {
            return Err(WindowReject::TooOld);
        }
        let (w, m) = Self::bit(seq);
        if self.bits[w] & m != 0 {
            return Err(WindowReject::Replay);
        }
        self.bits[w] |= m;
        Ok(false)
    }
}

/// Datagrams of one flow waiting for a path, oldest first. Bounded in
/// count and in bytes: when either bound would be passed the oldest are
/// dropped (UDP tolerates loss; stale datagrams are the least useful) and
/// counted.
#[derive(Debug, Clone)]
pub struct HoldQueue {
    queue: VecDeque<Vec<u8>>,
    bytes: usize,
    max_datagrams: usize,
    max_bytes: usize,
}

impl HoldQueue {
    /// An empty queue holding at most `max_datagrams` datagrams and
    /// `max_bytes` bytes of payload (a single datagram larger than that is
    /// still held alone).
    pub fn new(max_datagrams: usize, max_bytes: usize) -> Self {
        assert!(
            max_datagrams > 0,
            "a hold queue needs room for one datagram"
        );
        Self {
            queue: VecDeque::new(),
            bytes: 0,
            max_datagrams,
            max_bytes,
        }
    }

    /// Holds `d`; returns how many older datagrams were dropped for it.
    pub fn push(&mut self, d: Vec<u8>) -> u64 {
        let mut dropped = 0;
        while !self.queue.is_empty()
            && (self.queue.len() >= self.max_datagrams || self.bytes + d.len() > self.max_bytes)
        {
            if let Some(old) = self.queue.pop_front() {
                self.bytes -= old.len();
                dropped += 1;
            }
        }
        self.bytes += d.len();
        self.queue.push_back(d);
        dropped
    }

    /// Takes every held datagram, oldest first.
    pub fn take(&mut self) -> VecDeque<Vec<u8>> {
        self.bytes = 0;
        std::mem::take(&mut self.queue)
    }

    /// Datagrams held.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Nothing held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Payload bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crypto::tests_support::keys_pair;
    use proptest::prelude::*;

    fn data(seq: u64) -> Header {
        Header {
            kind: Kind::Data,
            session_id: 7,
            flow: FlowId(3),
            seq,
        }
    }

    #[test]
    fn roundtrip_carries_payload_unchanged() {
        let (c, g) = keys_pair();
        for payload in [&b""[..], b"hello", &[0xAB; MAX_PAYLOAD]] {
            let mut out = Vec::new();
            data(1)
                .seal(Role::Client, payload, &c.leg_key(), &mut out)
                .unwrap();
            assert_eq!(out.len(), OVERHEAD + payload.len());
            assert_eq!(
                &out[HEADER_LEN..HEADER_LEN + payload.len()],
                payload,
                "payload bytes unchanged"
            );
            assert_eq!(Header::peek_session(&out), Some(7));
            let (h, p) = Header::open(&out, &g.leg_key(), Role::Client).unwrap();
            assert_eq!((h, p), (data(1), payload));
        }
        let a = Header {
            kind: Kind::Announce,
            session_id: 7,
            flow: FlowId(0),
            seq: 2,
        };
        let mut out = Vec::new();
        a.seal(Role::Gateway, &[], &g.leg_key(), &mut out).unwrap();
        assert_eq!(
            Header::open(&out, &c.leg_key(), Role::Gateway).unwrap().0,
            a
        );
    }

    #[test]
    fn forged_reflected_and_oversized_datagrams_fail() {
        let (c, g) = keys_pair();
        let mut out = Vec::new();
        data(5)
            .seal(Role::Client, b"payload", &c.leg_key(), &mut out)
            .unwrap();
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x01;
            assert!(
                Header::open(&bad, &g.leg_key(), Role::Client).is_none(),
                "flipped byte {i} opened"
            );
        }
        // Reflected: a client's datagram is not a gateway's.
        assert!(Header::open(&out, &c.leg_key(), Role::Gateway).is_none());
        // Another session's key.
        let (other, _) = keys_pair();
        assert!(Header::open(&out, &other.leg_key(), Role::Client).is_none());
        // Truncated anywhere.
        for n in 0..out.len() {
            assert!(Header::open(&out[..n], &g.leg_key(), Role::Client).is_none());
        }
        assert_eq!(
            data(1).seal(
                Role::Client,
                &vec![0; MAX_PAYLOAD + 1],
                &c.leg_key(),
                &mut Vec::new()
            ),
            Err(TooLarge(MAX_PAYLOAD + 1))
        );
        // A probe is not a datagram, and a datagram key is not a probe key.
        let probe = crate::probe::Probe {
            reply: false,
            session_id: 7,
            seq: 1,
            sent_us: 0,
        }
        .seal(&c.leg_key());
        assert!(Header::open(&probe, &g.leg_key(), Role::Client).is_none());
    }

    #[test]
    fn window_accepts_each_number_once() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.accept(0), Err(WindowReject::TooOld));
        assert_eq!(w.accept(1), Ok(true));
        assert_eq!(w.accept(1), Err(WindowReject::Replay));
        assert_eq!(w.accept(10), Ok(true));
        assert_eq!(w.accept(5), Ok(false), "late but new: accepted, not newest");
        assert_eq!(w.accept(5), Err(WindowReject::Replay));
        assert_eq!(w.accept(10 + WINDOW - 1), Ok(true));
        assert_eq!(w.accept(9), Err(WindowReject::TooOld));
        assert_eq!(w.accept(11), Ok(false), "still inside the window");
        assert_eq!(w.accept(10 + 3 * WINDOW), Ok(true));
        assert_eq!(w.accept(10 + WINDOW - 1), Err(WindowReject::TooOld));
        assert_eq!(w.top(), 10 + 3 * WINDOW);
    }

    #[test]
    fn hold_queue_drops_the_oldest() {
        let mut q = HoldQueue::new(3, 1 << 20);
        let dropped: u64 = (0u8..10).map(|i| q.push(vec![i])).sum();
        assert_eq!(dropped, 7);
        assert_eq!(
            q.take().into_iter().collect::<Vec<_>>(),
            vec![vec![7], vec![8], vec![9]]
        );
        assert!(q.is_empty());
        let mut q = HoldQueue::new(100, 10);
        assert_eq!(q.push(vec![0; 6]), 0);
        assert_eq!(q.push(vec![1; 6]), 1, "the byte bound drops the oldest too");
        assert_eq!(
            q.push(vec![2; 30]),
            1,
            "one oversized datagram is held alone"
        );
        assert_eq!((q.len(), q.bytes()), (1, 30));
    }

    proptest! {
        /// The window accepts exactly the numbers a set-based model accepts
        /// (each once, none older than the window), whatever the order.
        #[test]
        fn window_model(seqs in proptest::collection::vec(1u64..20_000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::HashSet::new();
            let mut top = 0u64;
            for s in seqs {
                let want = if s + WINDOW <= top { Err(WindowReject::TooOld) }
                    else if !seen.insert(s) { Err(WindowReject::Replay) }
                    else { Ok(s > top) };
                prop_assert_eq!(w.accept(s), want);
                top = top.max(s);
            }
        }

        #[test]
        fn open_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (c, _) = keys_pair();
            let _ = Header::peek_session(&bytes);
            let _ = Header::open(&bytes, &c.leg_key(), Role::Client);
        }
    }
}
