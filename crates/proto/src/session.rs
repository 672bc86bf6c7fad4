//! Session liveness: keep-alives and the inactivity timeout, as a state
//! machine fed with `now`.
//!
//! The client agent pings every keep-alive interval; any authenticated frame
//! from the peer counts as life. A side that hears nothing for its timeout
//! considers the peer gone: the gateway then releases the session with
//! everything it holds.

use std::time::{Duration, Instant};

/// What the driver must do after [`Liveness::handle_timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum LivenessAction {
    /// Send a Ping with this sequence number.
    SendPing(u64),
    /// Nothing heard for the whole timeout: the peer is gone.
    Expired,
}

/// Keep-alive and inactivity timers of one end of a session.
#[derive(Debug, Clone)]
pub struct Liveness {
    keepalive: Option<Duration>,
    timeout: Duration,
    last_rx: Instant,
    next_ping: Option<Instant>,
    next_seq: u64,
}

impl Liveness {
    /// `keepalive` is `None` on an end that only listens (the gateway).
    pub fn new(now: Instant, keepalive: Option<Duration>, timeout: Duration) -> Self {
        Self {
            keepalive,
            timeout,
            last_rx: now,
            next_ping: keepalive.map(|k| now + k),
            next_seq: 0,
        }
    }

    /// An authenticated frame arrived from the peer.
    pub fn on_receive(&mut self, now: Instant) {
        self.last_rx = self.last_rx.max(now);
    }

    /// When the driver must next call [`Liveness::handle_timeout`].
    pub fn poll_timeout(&self) -> Instant {
        let expiry = self.last_rx + self.timeout;
        match self.next_ping {
            Some(p) => p.min(expiry),
            None => expiry,
        }
    }

    /// Advances the timers to `now`.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<LivenessAction> {
        if now >= self.last_rx + self.timeout {
            return Some(LivenessAction::Expired);
        }
        match (self.next_ping, self.keepalive) {
            (Some(at), Some(every)) if now >= at => {
                self.next_ping = Some(now + every);
                let seq = self.next_seq;
                self.next_seq += 1;
                Some(LivenessAction::SendPing(seq))
            }
            _ => None,
        }
    }

    /// How long the peer has been silent.
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_rx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pings_on_schedule_and_expires_when_silent() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Liveness::new(t0, Some(s), 3 * s);
        assert_eq!(l.poll_timeout(), t0 + s);
        assert_eq!(l.handle_timeout(t0 + s / 2), None);
        assert_eq!(l.handle_timeout(t0 + s), Some(LivenessAction::SendPing(0)));
        assert_eq!(
            l.handle_timeout(t0 + 2 * s),
            Some(LivenessAction::SendPing(1))
        );
        l.on_receive(t0 + 2 * s);
        assert_eq!(
            l.handle_timeout(t0 + 4 * s),
            Some(LivenessAction::SendPing(2))
        );
        assert_eq!(l.handle_timeout(t0 + 5 * s), Some(LivenessAction::Expired));
    }

    #[test]
    fn listener_only_expires() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0, None, Duration::from_secs(300));
        assert_eq!(l.poll_timeout(), t0 + Duration::from_secs(300));
        assert_eq!(l.handle_timeout(t0 + Duration::from_secs(299)), None);
        l.on_receive(t0 + Duration::from_secs(299));
        assert_eq!(l.handle_timeout(t0 + Duration::from_secs(300)), None);
        assert_eq!(
            l.silent_for(t0 + Duration::from_secs(310)),
            Duration::from_secs(11)
        );
        assert_eq!(
            l.handle_timeout(t0 + Duration::from_secs(599)),
            Some(LivenessAction::Expired)
        );
    }
}
