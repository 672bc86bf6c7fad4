//! The replay buffer: the bytes of one direction of a stream that the peer
//! has not yet confirmed.
//!
//! Bytes taken from the local application go in at the end; the peer's
//! acknowledgements trim the start. When a leg is replaced, the sender
//! resumes from the offset the receiver reports, which must still be in the
//! buffer. The buffer is bounded: when it is full the sender stops reading
//! from the application (backpressure), and memory is only held while bytes
//! are unconfirmed.

use crate::stream::Offset;

/// A request the replay buffer cannot serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The bytes from this offset were already confirmed and dropped: the
    /// stream cannot resume there (a peer bug or a forged offset).
    #[error("bytes from offset {0} are no longer held (held from {1})")]
    Missing(u64, u64),
    /// The offset is past anything ever sent.
    #[error("offset {0} is beyond the end of the stream so far ({1})")]
    BeyondEnd(u64, u64),
}

/// Unconfirmed bytes of one direction of a stream, at most `capacity`.
#[derive(Debug, Clone)]
pub struct ReplayBuffer {
    ring: Vec<u8>,
    capacity: usize,
    start: u64,
    end: u64,
}

impl ReplayBuffer {
    /// An empty buffer holding at most `capacity` bytes. Nothing is
    /// allocated until bytes arrive.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a replay buffer needs room for at least one byte");
        Self { ring: Vec::new(), capacity, start: 0, end: 0 }
    }

    /// Offset of the oldest unconfirmed byte.
    pub fn start(&self) -> Offset {
        Offset(self.start)
    }

    /// Offset just past the last byte taken from the application.
    pub fn end(&self) -> Offset {
        Offset(self.end)
    }

    /// Unconfirmed bytes held.
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Nothing unconfirmed.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Room left before backpressure.
    pub fn free(&self) -> usize {
        self.capacity - self.len()
    }

    /// Memory currently held by the buffer.
    pub fn allocated(&self) -> usize {
        self.ring.capacity()
    }

    /// Appends as much of `data` as fits; returns how much was taken.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.free());
        if n == 0 {
            return 0;
        }
        if self.ring.is_empty() {
            self.ring = vec![0u8; self.capacity];
        }
        let at = (self.end % self.capacity as u64) as usize;
        let first = n.min(self.capacity - at);
        self.ring[at..at + first].copy_from_slice(&data[..first]);
        self.ring[..n - first].copy_from_slice(&data[first..n]);
        self.end += n as u64;
        n
    }

    /// The peer confirmed everything before `upto`. Stale confirmations
    /// (before the start) are ignored; one past the end is an error.
    pub fn ack(&mut self, upto: Offset) -> Result<(), ReplayError> {
        if upto.0 > self.end {
            return Err(ReplayError::BeyondEnd(upto.0, self.end));
        }
        if upto.0 > self.start {
            self.start = upto.0;
        }
        if self.is_empty() {
            // An idle stream holds no buffer.
            self.ring = Vec::new();
        }
        Ok(())
    }

    /// The longest contiguous run of held bytes starting at `from` (empty
    /// at the end).
    pub fn bytes_from(&self, from: Offset) -> Result<&[u8], ReplayError> {
        if from.0 < self.start {
            return Err(ReplayError::Missing(from.0, self.start));
        }
        if from.0 > self.end {
            return Err(ReplayError::BeyondEnd(from.0, self.end));
        }
        if from.0 == self.end {
            return Ok(&[]);
        }
        let at = (from.0 % self.capacity as u64) as usize;
        let n = ((self.end - from.0) as usize).min(self.capacity - at);
        Ok(&self.ring[at..at + n])
    }

    /// Checks that a resume from `from` is possible.
    pub fn check_resume(&self, from: Offset) -> Result<(), ReplayError> {
        self.bytes_from(from).map(|_| ())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wraps_acks_and_resumes() {
        let mut b = ReplayBuffer::new(8);
        assert_eq!(b.allocated(), 0);
        assert_eq!(b.push(b"abcdef"), 6);
        assert_eq!(b.push(b"ghijk"), 2, "only the free room is taken");
        assert_eq!(b.free(), 0);
        b.ack(Offset(5)).unwrap();
        assert_eq!(b.push(b"ijklmn"), 5);
        // Held: offsets 5..13 = "fghijklm", wrapping in the ring.
        let mut got = Vec::new();
        let mut at = Offset(5);
        while at < b.end() {
            let s = b.bytes_from(at).unwrap();
            got.extend_from_slice(s);
            at = at.advance(s.len());
        }
        assert_eq!(got, b"fghijklm");
        assert_eq!(b.bytes_from(Offset(4)), Err(ReplayError::Missing(4, 5)));
        assert_eq!(b.bytes_from(Offset(14)), Err(ReplayError::BeyondEnd(14, 13)));
        assert_eq!(b.ack(Offset(14)), Err(ReplayError::BeyondEnd(14, 13)));
        b.ack(Offset(3)).unwrap(); // stale: ignored
        assert_eq!(b.start(), Offset(5));
        b.ack(Offset(13)).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.allocated(), 0, "an idle stream holds no buffer");
    }

    proptest! {
        /// Whatever the interleaving of pushes, acks and resumes, the bytes
        /// read back from any held offset are the bytes pushed there.
        #[test]
        fn model(cap in 1usize..64, ops in proptest::collection::vec((0u8..3, 0usize..80), 1..200)) {
            let mut b = ReplayBuffer::new(cap);
            let mut all: Vec<u8> = Vec::new();
            for (i, (op, n)) in ops.into_iter().enumerate() {
                match op {
                    0 => {
                        let data: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
                        let took = b.push(&data);
                        prop_assert_eq!(took, n.min(cap - b.len() + took));
                        all.extend_from_slice(&data[..took]);
                    }
                    1 => {
                        let upto = b.start().0 + (n as u64 % (b.len() as u64 + 1));
                        b.ack(Offset(upto)).unwrap();
                    }
                    _ => {
                        let from = b.start().0 + (n as u64 % (b.len() as u64 + 1));
                        let mut at = Offset(from);
                        while at < b.end() {
                            let s = b.bytes_from(at).unwrap();
                            prop_assert!(!s.is_empty());
                            prop_assert_eq!(s, &all[at.0 as usize..at.0 as usize + s.len()]);
                            at = at.advance(s.len());
                        }
                    }
                }
                prop_assert!(b.len() <= cap);
                prop_assert_eq!(b.end().0, all.len() as u64);
            }
        }
    }
}
