//! Streams: ids, byte offsets in both directions, and the gateway's table
//! that decides which legs may attach to which streams.
//!
//! A stream outlives its legs. Each direction of a stream counts bytes from
//! zero; a leg that (re)opens says from which offset each side needs the
//! other's bytes, so that the same bookkeeping serves a first open and a
//! resume after a switch.

use std::collections::{BTreeSet, HashMap};

/// Identifies a stream within its session. Allocated by the client agent,
/// counting up from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}", self.0)
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
    /// Resumes a live stream.
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
}

/// The gateway's view of a session's streams: which ids were ever used,
/// which are live, and the generation of each live stream's current leg.
///
/// Ids are handed out in order by the client agent but legs may arrive out
/// of order; ids skipped so far are kept as gaps (bounded) so that each id is
/// admitted as new at most once.
#[derive(Debug, Clone)]
pub struct StreamTable {
    next_unseen: u64,
    gaps: BTreeSet<u64>,
    live: HashMap<StreamId, u32>,
    max_live: usize,
}

/// How far ahead of the highest admitted id a new stream may be.
pub const MAX_ID_GAP: u64 = 4096;

impl StreamTable {
    /// An empty table admitting at most `max_live` live streams.
    pub fn new(max_live: usize) -> Self {
        Self { next_unseen: 0, gaps: BTreeSet::new(), live: HashMap::new(), max_live }
    }

    /// Decides whether a leg announcing `(stream, generation)` may attach.
    /// On success the stream is live with that generation; the answer says
    /// whether it is new. A new id may come with any generation (the client
    /// agent may have retried an open whose first leg never arrived); a live
    /// one needs a newer generation than its current leg.
    pub fn admit(&mut self, stream: StreamId, generation: u32) -> Result<Admission, AdmitError> {
        if let Some(g) = self.live.get_mut(&stream) {
            if *g >= generation {
                return Err(AdmitError::StaleGeneration);
            }
            *g = generation;
            return Ok(Admission::Resume);
        }
        {
            if self.live.len() >= self.max_live {
                return Err(AdmitError::TooMany);
            }
            let id = stream.0;
            if id >= self.next_unseen {
                if id - self.next_unseen > MAX_ID_GAP || self.gaps.len() as u64 + (id - self.next_unseen) > MAX_ID_GAP {
                    return Err(AdmitError::TooFarAhead);
                }
                self.gaps.extend(self.next_unseen..id);
                self.next_unseen = id + 1;
            } else if !self.gaps.remove(&id) {
                return Err(AdmitError::Reused);
            }
            self.live.insert(stream, generation);
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

    /// Current leg generation of a live stream.
    pub fn generation(&self, stream: StreamId) -> Option<u32> {
        self.live.get(&stream).copied()
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
        assert_eq!(t.admit(StreamId(MAX_ID_GAP + 1), 0), Err(AdmitError::TooFarAhead));
        t.admit(StreamId(0), 0).unwrap();
        t.admit(StreamId(1), 0).unwrap();
        assert_eq!(t.admit(StreamId(2), 0), Err(AdmitError::TooMany));
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
