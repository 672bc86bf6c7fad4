//! Streams: ids, byte offsets in both directions, and the gateway's table
//! that decides which legs may attach to which streams.
//!
//! A stream outlives its legs. Each direction of a stream counts bytes from
//! zero; a leg that (re)opens says from which offset each side needs the
//! other's bytes, so that the same bookkeeping serves a first open and a
//! resume after a switch.

use std::collections::{BTreeSet, HashMap};

/// Identifies a stream within its session. The client agent allocates the
/// streams it opens, counting up from 0; the gateway allocates the streams of
/// client services (server → client) with [`StreamId::GATEWAY`] set, so the
/// two spaces never meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl StreamId {
    /// The bit that marks an id allocated by the gateway.
    pub const GATEWAY: u64 = 1 << 63;

    /// Whether the gateway opened this stream (a client service's connection).
    pub fn is_gateway_opened(self) -> bool {
        self.0 & Self::GATEWAY != 0
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_gateway_opened() {
            write!(f, "g{}", self.0 & !Self::GATEWAY)
        } else {
            write!(f, "s{}", self.0)
        }
    }
}

/// A byte position in one direction of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Offset(pub u64);

impl Offset {
    /// The offset `n` bytes further on.
    #[must_use]
    pub fn advance(self, n: usize) -> Self {
        Offset(self.0 + n as u64)
    }
}

/// The sending side of one direction of a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendHalf {
    /// Bytes taken from the local application so far.
    pub sent: Offset,
    /// Bytes the peer has confirmed; everything before is no longer needed.
    pub acked: Offset,
    /// Set once the local application has finished writing (half-close).
    pub finished: bool,
}

/// The receiving side of one direction of a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecvHalf {
    /// Bytes received from the peer and handed to the local application.
    pub received: Offset,
    /// Set once the peer's application finished writing.
    pub finished: bool,
}

/// Both directions of a stream as seen from one end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamState {
    /// What this end sends.
    pub send: SendHalf,
    /// What this end receives.
    pub recv: RecvHalf,
}

impl StreamState {
    /// Records `n` bytes taken from the local application.
    pub fn on_sent(&mut self, n: usize) {
        self.send.sent = self.send.sent.advance(n);
    }

    /// Records `n` bytes received from the peer.
    pub fn on_received(&mut self, n: usize) {
        self.recv.received = self.recv.received.advance(n);
    }

    /// Both directions are finished: the stream is done.
    pub fn is_done(&self) -> bool {
        self.send.finished && self.recv.finished
    }
}

/// What an admitted leg does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Opens a new stream.
    New,
    /// Attaches to a live stream: a resume, or the first leg of a stream the
    /// gateway opened (its bytes may already wait in the replay buffer).
    Resume,
}

/// Why a leg was not admitted to a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdmitError {
    /// A stream id that was used and has ended: a replayed preamble or a
    /// confused peer.
    #[error("stream id already used")]
    Reused,
    /// A resume whose generation is not newer than the current leg's:
    /// a replayed preamble trying to take the stream over.
    #[error("stale leg generation")]
    StaleGeneration,
    /// A new stream id so far ahead of the others that accepting it would
    /// make the table track too many unused ids.
    #[error("stream id too far ahead")]
    TooFarAhead,
    /// The session holds its maximum of live streams.
    #[error("too many live streams")]
    TooMany,
    /// An id from the gateway's space that the gateway has not opened, or
    /// has closed: only the gateway starts such streams.
    #[error("stream id not opened by the gateway")]
    Unopened,
}

/// The gateway's view of a session's streams: which ids were ever used,
/// which are live, and the generation of each live stream's current leg.
///
/// Ids are handed out in order by the client agent but legs may arrive out
/// of order; ids skipped so far are kept as gaps (bounded) so that each id is
/// admitted as new at most once. Ids of the gateway's own space are never
/// admitted as new: [`StreamTable::open_gateway`] creates them, live and
/// waiting for their first leg.
#[derive(Debug, Clone)]
pub struct StreamTable {
    next_unseen: u64,
    gaps: BTreeSet<u64>,
    /// Live streams and the generation of their current leg; `None` until a
    /// gateway-opened stream's first leg arrives.
    live: HashMap<StreamId, Option<u32>>,
    max_live: usize,
    next_gateway: u64,
}

/// How far ahead of the highest admitted id a new stream may be.
pub const MAX_ID_GAP: u64 = 4096;

impl StreamTable {
    /// An empty table admitting at most `max_live` live streams.
    pub fn new(max_live: usize) -> Self {
        Self {
            next_unseen: 0,
            gaps: BTreeSet::new(),
            live: HashMap::new(),
            max_live,
            next_gateway: StreamId::GATEWAY,
        }
    }

    /// Opens a stream from the gateway's side (a client service's
    /// connection): a fresh id from the gateway's space, live and waiting
    /// for the client agent's first leg, which may carry any generation.
    pub fn open_gateway(&mut self) -> Result<StreamId, AdmitError> {
        if self.live.len() >= self.max_live {
            return Err(AdmitError::TooMany);
        }
        // 2^63 ids: a session would need centuries to wrap.
        let id = StreamId(self.next_gateway);
        self.next_gateway = StreamId::GATEWAY | (self.next_gateway + 1);
        self.live.insert(id, None);
        Ok(id)
    }

    /// Decides whether a leg announcing `(stream, generation)` may attach.
    /// On success the stream is live with that generation; the answer says
    /// whether it is new. A new id may come with any generation (the client
    /// agent may have retried an open whose first leg never arrived); a live
    /// one needs a newer generation than its current leg.
    pub fn admit(&mut self, stream: StreamId, generation: u32) -> Result<Admission, AdmitError> {
        if let Some(g) = self.live.get_mut(&stream) {
            if g.is_some_and(|g| g >= generation) {
                return Err(AdmitError::StaleGeneration);
            }
            *g = Some(generation);
            return Ok(Admission::Resume);
        }
        if stream.is_gateway_opened() {
            return Err(AdmitError::Unopened);
        }
        {
            if self.live.len() >= self.max_live {
                return Err(AdmitError::TooMany);
            }
            let id = stream.0;
            if id >= self.next_unseen {
                if id - self.next_unseen > MAX_ID_GAP
                    || self.gaps.len() as u64 + (id - self.next_unseen) > MAX_ID_GAP
                {
                    return Err(AdmitError::TooFarAhead);
                }
                self.gaps.extend(self.next_unseen..id);
                self.next_unseen = id + 1;
            } else if !self.gaps.remove(&id) {
                return Err(AdmitError::Reused);
            }
            self.live.insert(stream, Some(generation));
            Ok(Admission::New)
        }
    }

    /// The stream ended; its id is never admitted again.
    pub fn close(&mut self, stream: StreamId) {
        self.live.remove(&stream);
    }

    /// Number of live streams.
    pub fn live(&self) -> usize {
        self.live.len()
    }

    /// Current leg generation of a live stream (`None` also while a
    /// gateway-opened stream waits for its first leg).
    pub fn generation(&self, stream: StreamId) -> Option<u32> {
        self.live.get(&stream).copied().flatten()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ids_are_admitted_once_even_out_of_order() {
        let mut t = StreamTable::new(100);
        assert_eq!(t.admit(StreamId(2), 0), Ok(Admission::New));
        t.admit(StreamId(0), 0).unwrap();
        assert_eq!(t.admit(StreamId(2), 0), Err(AdmitError::StaleGeneration));
        t.admit(StreamId(1), 3).unwrap();
        t.close(StreamId(1));
        assert_eq!(t.admit(StreamId(1), 0), Err(AdmitError::Reused));
        assert_eq!(t.admit(StreamId(1), 9), Err(AdmitError::Reused));
        assert_eq!(t.live(), 2);
    }

    #[test]
    fn resumes_need_a_newer_generation() {
        let mut t = StreamTable::new(10);
        t.admit(StreamId(0), 0).unwrap();
        assert_eq!(t.admit(StreamId(0), 0), Err(AdmitError::StaleGeneration));
        assert_eq!(t.admit(StreamId(0), 1), Ok(Admission::Resume));
        assert_eq!(t.admit(StreamId(0), 1), Err(AdmitError::StaleGeneration));
        t.admit(StreamId(0), 5).unwrap();
        assert_eq!(t.generation(StreamId(0)), Some(5));
    }

    #[test]
    fn limits_hold() {
        let mut t = StreamTable::new(2);
        assert_eq!(
            t.admit(StreamId(MAX_ID_GAP + 1), 0),
            Err(AdmitError::TooFarAhead)
        );
        t.admit(StreamId(0), 0).unwrap();
        t.admit(StreamId(1), 0).unwrap();
        assert_eq!(t.admit(StreamId(2), 0), Err(AdmitError::TooMany));
    }

    #[test]
    fn gateway_opened_ids_never_meet_client_ids() {
        let mut t = StreamTable::new(3);
        let g = t.open_gateway().unwrap();
        assert!(g.is_gateway_opened());
        assert_eq!(g.to_string(), "g0");
        assert_eq!(StreamId(0).to_string(), "s0");
        assert_ne!(t.open_gateway().unwrap(), g);
        // The first leg may carry any generation (earlier attempts may have
        // been lost); then only newer ones.
        assert_eq!(t.generation(g), None);
        assert_eq!(t.admit(g, 2), Ok(Admission::Resume));
        assert_eq!(t.admit(g, 2), Err(AdmitError::StaleGeneration));
        assert_eq!(t.admit(g, 3), Ok(Admission::Resume));
        // A client cannot open or revive an id of the gateway's space.
        t.close(g);
        assert_eq!(t.admit(g, 9), Err(AdmitError::Unopened));
        assert_eq!(
            t.admit(StreamId(StreamId::GATEWAY | 77), 0),
            Err(AdmitError::Unopened)
        );
        // Client ids still count from 0, with the live limit shared.
        assert_eq!(t.admit(StreamId(0), 0), Ok(Admission::New));
        assert_eq!(t.admit(StreamId(1), 0), Ok(Admission::New));
        assert_eq!(t.open_gateway(), Err(AdmitError::TooMany));
    }

    proptest! {
        /// Whatever order legs arrive in, each id is admitted as new exactly once.
        #[test]
        fn each_id_admitted_once(ids in proptest::collection::vec(0u64..64, 1..200)) {
            let mut t = StreamTable::new(1000);
            let mut admitted = std::collections::HashSet::new();
            for id in ids {
                let ok = t.admit(StreamId(id), 0).is_ok();
                prop_assert_eq!(ok, admitted.insert(id));
                t.close(StreamId(id));
            }
        }
    }
}
