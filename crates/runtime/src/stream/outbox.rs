//! What one direction of a stream has taken from the application and the
//! peer has not confirmed: in a ring in user space, or, while one
//! uncompressed leg carries a busy stream, as page references in pipes.
//!
//! The ring costs two copies per byte sent (socket → ring → leg). The pipes
//! cost none: each read is spliced into a pipe, `tee`d into the leg's queue
//! and kept. A resume that must send kept bytes again first copies them
//! back into the ring ([`Outbox::back_to_ring`]), once per switch.

use std::io;
use std::time::{Duration, Instant};

use baton_os::PipeReplay;
use baton_proto::{Offset, ReplayBuffer, ReplayError};

/// Size of each pipe: the most a read moves at once, so the fewer system
/// calls per byte (`pipe-max-size` is 1 MiB by default, and larger pipes
/// need privileges). The receiving end's 256 KiB pipe measured the same
/// at 1 MiB, so it keeps the smaller one.
pub(super) const PIPE_SIZE: usize = 1 << 20;

/// How long to copy again after pipes could not be made (out of
/// descriptors, or of the user's pipe pages).
const REFUSED_FOR: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub(super) struct Outbox {
    /// Holds `[ring.start, ring.end)`; while pipes are used it takes no
    /// new bytes, and its end is where the pipes' bytes start (or it is
    /// empty).
    ring: ReplayBuffer,
    piped: Option<Piped>,
    capacity: usize,
    /// How much may be unconfirmed now: `capacity`, or less on a path that
    /// needs less ([`set_window`](Self::set_window)).
    window: usize,
    refused_at: Option<Instant>,
}

#[derive(Debug)]
struct Piped {
    pipes: PipeReplay,
    /// Offset of the oldest byte the pipes keep.
    kept_start: u64,
}

impl Outbox {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            ring: ReplayBuffer::new(capacity),
            piped: None,
            capacity,
            window: capacity,
            refused_at: None,
        }
    }

    /// Offset of the oldest unconfirmed byte.
    pub(super) fn start(&self) -> Offset {
        match &self.piped {
            Some(p) if self.ring.is_empty() => Offset(p.kept_start),
            _ => self.ring.start(),
        }
    }

    /// Offset just past the last byte taken from the application.
    pub(super) fn end(&self) -> Offset {
        match &self.piped {
            Some(p) => Offset(p.kept_start + p.pipes.held() as u64),
            None => self.ring.end(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start() == self.end()
    }

    /// Room left before backpressure.
    pub(super) fn free(&self) -> usize {
        self.window
            .saturating_sub((self.end().0 - self.start().0) as usize)
    }

    /// Holds at most `window` unconfirmed bytes from now on (never more than
    /// the capacity). Bytes already held beyond it stay, and nothing more is
    /// taken until confirmations bring them under it.
    pub(super) fn set_window(&mut self, window: usize) {
        self.window = window.min(self.capacity);
    }

    /// Memory held for the direction: the ring, and the bytes the pipes
    /// keep (their pages).
    pub(super) fn allocated(&self) -> usize {
        self.ring.allocated() + self.piped.as_ref().map_or(0, |p| p.pipes.held())
    }

    /// Something to free once idle.
    pub(super) fn holding(&self) -> bool {
        self.ring.allocated() > 0 || self.piped.is_some()
    }

    /// The ring, where bytes are read to while no pipes are used, and sent
    /// from when not queued in the pipes.
    pub(super) fn ring(&self) -> &ReplayBuffer {
        &self.ring
    }

    /// The ring's free room to read into, while no pipes are used (see
    /// [`ReplayBuffer::spare`]); empty while they are.
    pub(super) fn spare(&mut self, max: usize) -> &mut [u8] {
        let max = if self.piped.is_some() { 0 } else { max };
        self.ring.spare(max)
    }

    /// Takes `n` bytes read into [`spare`](Self::spare).
    pub(super) fn commit(&mut self, n: usize) {
        self.ring.commit(n);
    }

    pub(super) fn pipes(&mut self) -> Option<&mut PipeReplay> {
        self.piped.as_mut().map(|p| &mut p.pipes)
    }

    /// Offset of the first byte queued in the pipes to be written, when
    /// they are used and their queue is whole: a leg that stands there
    /// writes from the queue.
    pub(super) fn queue_at(&self) -> Option<Offset> {
        let p = self.piped.as_ref()?;
        (!p.pipes.queue_broken()).then(|| Offset(self.end().0 - p.pipes.queued() as u64))
    }

    /// Whether the application may be read now: with pipes, only once the
    /// last read is written and kept.
    pub(super) fn can_read(&mut self) -> io::Result<bool> {
        match &mut self.piped {
            Some(p) => p.pipes.can_take(),
            None => Ok(true),
        }
    }

    /// The peer confirmed everything before `upto`.
    pub(super) fn ack(&mut self, upto: Offset) -> Result<(), AckError> {
        let end = self.end();
        if upto > end {
            return Err(AckError::Replay(ReplayError::BeyondEnd(upto.0, end.0)));
        }
        let in_ring = Offset(upto.0.min(self.ring.end().0));
        self.ring.ack(in_ring).map_err(AckError::Replay)?;
        if let Some(p) = &mut self.piped {
            if upto.0 > p.kept_start {
                p.pipes
                    .confirm((upto.0 - p.kept_start) as usize)
                    .map_err(AckError::Io)?;
                p.kept_start = upto.0;
            }
        }
        Ok(())
    }

    /// Starts keeping and sending through pipes, from the end: the bytes
    /// the ring holds stay there until confirmed. Returns whether pipes
    /// are used now; after a refusal none are tried for a while.
    pub(super) fn use_pipes(&mut self) -> bool {
        if self.piped.is_some() {
            return true;
        }
        if self.refused_at.is_some_and(|t| t.elapsed() < REFUSED_FOR) {
            return false;
        }
        match PipeReplay::new(PIPE_SIZE) {
            Ok(pipes) => {
                self.piped = Some(Piped {
                    pipes,
                    kept_start: self.ring.end().0,
                });
                true
            }
            Err(_) => {
                self.refused_at = Some(Instant::now());
                false
            }
        }
    }

    /// Moves what the pipes keep back into the ring (a copy) and stops
    /// using them: a resume from any offset, or a compressed leg, reads the
    /// ring.
    pub(super) fn back_to_ring(&mut self) -> io::Result<()> {
        let Some(mut p) = self.piped.take() else {
            return Ok(());
        };
        self.ring.restart_at(Offset(p.kept_start));
        if self.ring.end().0 != p.kept_start {
            return Err(io::Error::other("kept bytes do not follow the ring"));
        }
        while p.pipes.held() > 0 {
            let room = self.ring.spare(p.pipes.held());
            if room.is_empty() {
                return Err(io::Error::other("no room for the kept bytes"));
            }
            let n = p.pipes.read_kept(room)?;
            if n == 0 {
                return Err(io::Error::other("kept bytes missing"));
            }
            self.ring.commit(n);
        }
        Ok(())
    }

    /// Frees what an idle direction holds, if nothing unconfirmed is in it.
    pub(super) fn release(&mut self) {
        if !self.is_empty() {
            return;
        }
        if let Some(p) = self.piped.take() {
            self.ring.restart_at(Offset(p.kept_start));
        }
        self.ring.release();
    }
}

#[derive(Debug)]
pub(super) enum AckError {
    /// A confirmation beyond anything sent: a peer bug.
    Replay(ReplayError),
    Io(io::Error),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design
    use super::*;

    fn take(b: &mut Outbox, n: usize) {
        let room = b.spare(n);
        assert_eq!(room.len(), n);
        room.fill(7);
        b.commit(n);
    }

    #[test]
    fn a_window_bounds_what_is_held_until_confirmations_free_room() {
        let mut b = Outbox::new(1000);
        assert_eq!(b.free(), 1000);
        take(&mut b, 400);
        assert_eq!(b.free(), 600);
        // Smaller than what is held: nothing more is taken, nothing is lost.
        b.set_window(300);
        assert_eq!(b.free(), 0);
        assert_eq!((b.start(), b.end()), (Offset(0), Offset(400)));
        b.ack(Offset(200)).unwrap();
        assert_eq!(b.free(), 100);
        // Never beyond the buffer.
        b.set_window(5000);
        assert_eq!(b.free(), 800);
    }
}
