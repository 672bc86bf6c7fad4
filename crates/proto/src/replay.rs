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
///
/// The ring grows as bytes come (a stream that never holds more than a few
/// KiB never allocates more) and is kept while the stream is busy: zeroing
/// or faulting in a fresh ring each time the peer catches up costs more than
/// the bytes it holds. [`ReplayBuffer::release`] frees it once the stream is
/// idle.
#[derive(Debug, Clone)]
pub struct ReplayBuffer {
    /// `ring[i]` holds the byte at offset `base + i`, modulo `capacity`;
    /// its length grows up to `capacity`.
    ring: Vec<u8>,
    capacity: usize,
    /// The offset that maps to `ring[0]`: moved to `end` whenever the buffer
    /// is empty, so that writing starts at the front of the ring again and
    /// the ring grows only as far as the bytes held at once.
    base: u64,
    start: u64,
    end: u64,
}

/// First size of a ring, then it doubles: small streams stay small.
const MIN_RING: usize = 16 * 1024;

impl ReplayBuffer {
    /// An empty buffer holding at most `capacity` bytes. Nothing is
    /// allocated until bytes arrive.
    pub fn new(capacity: usize) -> Self {
        assert!(
            capacity > 0,
            "a replay buffer needs room for at least one byte"
        );
        Self {
            ring: Vec::new(),
            capacity,
            base: 0,
            start: 0,
            end: 0,
        }
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
        let mut took = 0;
        while took < data.len() {
            let room = self.spare(data.len() - took);
            let n = room.len();
            if n == 0 {
                break;
            }
            room.copy_from_slice(&data[took..took + n]);
            self.commit(n);
            took += n;
        }
        took
    }

    /// The free space right after the last byte held, as one contiguous
    /// slice of at most `max` bytes, for the caller to fill (a socket read
    /// straight into the buffer) and then [`commit`](Self::commit). It ends
    /// where the ring wraps, or where the ring has grown so far (the next
    /// call grows it); it is empty only when the buffer is full or `max` is
    /// 0. Its contents are whatever the ring held there before.
    pub fn spare(&mut self, max: usize) -> &mut [u8] {
        if self.is_empty() {
            self.base = self.end;
        }
        let at = self.index(self.end);
        if at == self.ring.len() && self.ring.len() < self.capacity && max > 0 && self.free() > 0 {
            // Doubling: a bulk stream reaches its working size in a few
            // steps; each byte is zeroed once per ring, not once per refill.
            let len = (self.ring.len() * 2).max(MIN_RING).min(self.capacity);
            // Exact: the last step must not overshoot the capacity.
            self.ring.reserve_exact(len - self.ring.len());
            self.ring.resize(len, 0);
        }
        let n = max.min(self.free()).min(self.ring.len() - at);
        &mut self.ring[at..at + n]
    }

    /// Takes the first `n` bytes of the slice [`spare`](Self::spare) gave
    /// as written.
    ///
    /// # Panics
    /// If `n` is more than that slice held.
    pub fn commit(&mut self, n: usize) {
        let at = self.index(self.end);
        assert!(
            n <= self.free() && at + n <= self.ring.len(),
            "commit of {n} bytes beyond the spare slice"
        );
        self.end += n as u64;
    }

    /// Frees the ring if nothing is held (a stream gone idle); the next
    /// bytes allocate it again.
    pub fn release(&mut self) {
        if self.is_empty() {
            self.ring = Vec::new();
        }
    }

    /// Moves an empty buffer to `at`: the bytes before it were held
    /// elsewhere (and confirmed or taken back), so the next byte taken is
    /// the one at `at`. Ignored unless the buffer is empty and `at` is not
    /// before its end.
    pub fn restart_at(&mut self, at: Offset) {
        if self.is_empty() && at.0 >= self.end {
            self.start = at.0;
            self.end = at.0;
            self.base = at.0;
        }
    }

    /// Where the byte at `offset` lives in the ring.
    fn index(&self, offset: u64) -> usize {
        ((offset - self.base) % self.capacity as u64) as usize
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
        let at = self.index(from.0);
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
    fn an_empty_buffer_restarts_further_on() {
        let mut b = ReplayBuffer::new(8);
        assert_eq!(b.push(b"ab"), 2);
        b.restart_at(Offset(100));
        assert_eq!(b.end(), Offset(2), "not while bytes are held");
        b.ack(Offset(2)).unwrap();
        b.restart_at(Offset(100));
        assert_eq!((b.start(), b.end()), (Offset(100), Offset(100)));
        assert_eq!(b.push(b"cdefghijk"), 8);
        assert_eq!(b.bytes_from(Offset(100)).unwrap(), b"cdefghij");
        b.ack(Offset(108)).unwrap();
        b.restart_at(Offset(50));
        assert_eq!(b.end(), Offset(108), "never back");
    }

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
        assert_eq!(
            b.bytes_from(Offset(14)),
            Err(ReplayError::BeyondEnd(14, 13))
        );
        assert_eq!(b.ack(Offset(14)), Err(ReplayError::BeyondEnd(14, 13)));
        b.ack(Offset(3)).unwrap(); // stale: ignored
        assert_eq!(b.start(), Offset(5));
        b.ack(Offset(13)).unwrap();
        assert!(b.is_empty());
        assert_eq!(b.allocated(), 8, "a busy stream keeps its ring");
        b.release();
        assert_eq!(b.allocated(), 0, "an idle stream holds no buffer");
    }

    /// Reads everything held from `from` on.
    fn held(b: &ReplayBuffer, from: u64) -> Vec<u8> {
        let mut got = Vec::new();
        let mut at = Offset(from);
        while at < b.end() {
            let s = b.bytes_from(at).unwrap();
            assert!(!s.is_empty());
            got.extend_from_slice(s);
            at = at.advance(s.len());
        }
        got
    }

    /// Fills the spare slice with `data` (as much as fits) and commits it.
    fn fill(b: &mut ReplayBuffer, data: &[u8]) -> usize {
        let room = b.spare(data.len());
        let n = room.len();
        room.copy_from_slice(&data[..n]);
        b.commit(n);
        n
    }

    #[test]
    fn spare_wraps_at_the_end_of_the_ring() {
        let mut b = ReplayBuffer::new(10);
        assert_eq!(fill(&mut b, b"abcdefgh"), 8);
        b.ack(Offset(6)).unwrap();
        // Held: "gh" at ring[6..8]; free: ring[8..10] then ring[0..6].
        assert_eq!(b.spare(100).len(), 2, "the slice ends where the ring wraps");
        assert_eq!(fill(&mut b, b"ij"), 2);
        assert_eq!(b.spare(100).len(), 6);
        assert_eq!(fill(&mut b, b"klmnopqr"), 6);
        assert_eq!(held(&b, 6), b"ghijklmnop");
        assert_eq!(b.free(), 0);
    }

    #[test]
    fn a_full_ring_has_no_spare_room_until_acked() {
        let mut b = ReplayBuffer::new(4);
        assert_eq!(fill(&mut b, b"abcd"), 4);
        assert!(b.spare(4).is_empty());
        b.commit(0);
        assert_eq!(b.push(b"x"), 0);
        b.ack(Offset(1)).unwrap();
        assert_eq!(b.spare(4).len(), 1);
        assert_eq!(fill(&mut b, b"efgh"), 1);
        assert_eq!(held(&b, 1), b"bcde");
    }

    #[test]
    fn ack_while_a_slice_is_partly_filled() {
        let mut b = ReplayBuffer::new(8);
        assert_eq!(fill(&mut b, b"abc"), 3);
        // A read filled only part of the slice it was given.
        let room = b.spare(5);
        assert_eq!(room.len(), 5);
        room[..2].copy_from_slice(b"de");
        b.commit(2);
        b.ack(Offset(4)).unwrap();
        assert_eq!(held(&b, 4), b"e");
        // The next slice starts right after the last committed byte.
        assert_eq!(fill(&mut b, b"fghijklm"), 3, "up to the end of the ring");
        assert_eq!(
            fill(&mut b, b"ijklm"),
            4,
            "then from its front, up to the unconfirmed byte"
        );
        assert_eq!(held(&b, 4), b"efghijkl");
        assert!(b.spare(1).is_empty());
    }

    #[test]
    fn an_emptied_ring_is_written_from_its_front_and_kept() {
        let mut b = ReplayBuffer::new(1 << 20);
        assert_eq!(fill(&mut b, &[1; 1000]), 1000);
        assert_eq!(b.allocated(), MIN_RING, "the ring grows as bytes come");
        b.ack(Offset(1000)).unwrap();
        assert_eq!(b.allocated(), MIN_RING, "kept while the stream is busy");
        // Empty again: the next bytes go to the front, so the ring does
        // not grow although the stream's offsets moved on.
        assert_eq!(b.spare(usize::MAX).len(), MIN_RING);
        assert_eq!(fill(&mut b, &[2; 3000]), 3000);
        assert_eq!(b.allocated(), MIN_RING);
        assert_eq!(held(&b, 1000), vec![2; 3000]);
        b.release();
        assert_eq!(b.allocated(), MIN_RING, "bytes held: not freed");
        b.ack(Offset(4000)).unwrap();
        b.release();
        assert_eq!(b.allocated(), 0);
        assert_eq!(fill(&mut b, b"after"), 5);
        assert_eq!(held(&b, 4000), b"after");
    }

    #[test]
    fn the_ring_doubles_up_to_its_capacity() {
        let cap = 5 * MIN_RING;
        let mut b = ReplayBuffer::new(cap);
        let data: Vec<u8> = (0..cap).map(|i| (i % 251) as u8).collect();
        assert_eq!(b.push(&data), cap);
        assert_eq!(b.allocated(), cap);
        assert_eq!(held(&b, 0), data);
    }

    #[test]
    #[should_panic(expected = "beyond the spare slice")]
    fn committing_more_than_the_slice_panics() {
        let mut b = ReplayBuffer::new(8);
        let n = b.spare(3).len();
        b.commit(n + 6);
    }

    proptest! {
        /// Whatever the interleaving of pushes, acks and resumes, the bytes
        /// read back from any held offset are the bytes pushed there.
        #[test]
        fn model(cap in 1usize..64, ops in proptest::collection::vec((0u8..5, 0usize..80), 1..200)) {
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
                    3 => {
                        // A read straight into the ring that fills part of its slice.
                        let room = b.spare(n);
                        let take = room.len() / 2 + room.len() % 2;
                        for (j, x) in room[..take].iter_mut().enumerate() {
                            *x = (i * 17 + j) as u8;
                        }
                        all.extend_from_slice(&room[..take]);
                        b.commit(take);
                    }
                    4 => b.release(),
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
