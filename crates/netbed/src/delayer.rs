//! The delayer: holds every packet of one NFQUEUE queue for a fixed time, then accepts it.
//!
//! The delay is the same for every packet, so release order is arrival order and the packets
//! due at any moment are a prefix of the queue: one batch verdict ("accept every id up to N")
//! releases them all. Packets are queued whole (GSO), so a bulk TCP flow costs one message
//! per 64 KiB super-packet rather than one per segment.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nfqueue::{Event, NfQueue};

/// How long the loop may sleep before it looks at the stop flag again.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Datagrams read in a row before due packets are released again.
const RECV_BURST: usize = 256;

/// What to delay and how much room to give the kernel.
#[derive(Debug, Clone)]
pub struct DelayConfig {
    /// NFQUEUE queue number (iptables `--queue-num`).
    pub queue: u16,
    /// Time each packet is held.
    pub delay: Duration,
    /// Kernel queue length: packets held at once before the kernel drops new ones.
    pub max_len: u32,
    /// Netlink socket receive buffer in bytes (forced past `net.core.rmem_max`).
    pub rcvbuf: usize,
}

impl DelayConfig {
    /// A config with room for well over 100 Mbit/s at 100 ms of delay.
    pub fn new(queue: u16, delay: Duration) -> DelayConfig {
        DelayConfig {
            queue,
            delay,
            max_len: 65_536,
            rcvbuf: 16 << 20,
        }
    }
}

/// Counters a running delayer keeps; read them with [`DelayCounters::snapshot`].
#[derive(Debug, Default)]
pub struct DelayCounters {
    received: AtomicU64,
    released: AtomicU64,
    overruns: AtomicU64,
    errors: AtomicU64,
}

/// A copy of the delayer's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DelayStats {
    /// Packets read from the queue.
    pub received: u64,
    /// Packets accepted after their delay.
    pub released: u64,
    /// Socket overruns (`ENOBUFS`): the kernel could not deliver some packets and dropped them.
    pub overruns: u64,
    /// Error answers from the kernel to verdicts.
    pub errors: u64,
}

impl DelayCounters {
    /// Reads the counters.
    pub fn snapshot(&self) -> DelayStats {
        DelayStats {
            received: self.received.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            overruns: self.overruns.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// A queue bound and ready to delay; [`Delayer::run`] does the work.
pub struct Delayer {
    q: NfQueue,
    delay: Duration,
    held: VecDeque<(Instant, u32)>,
    counters: Arc<DelayCounters>,
}

impl Delayer {
    /// Binds the queue in the calling thread's network namespace.
    ///
    /// Bind before the iptables rule that feeds the queue exists: without `--queue-bypass`
    /// the kernel drops packets for a queue nobody listens on.
    pub fn bind(cfg: &DelayConfig) -> io::Result<Delayer> {
        Ok(Delayer {
            q: NfQueue::bind(cfg.queue, cfg.max_len, cfg.rcvbuf)?,
            delay: cfg.delay,
            held: VecDeque::new(),
            counters: Arc::default(),
        })
    }

    /// The counters, shared with whoever wants to watch them while [`run`](Self::run) works.
    pub fn counters(&self) -> Arc<DelayCounters> {
        self.counters.clone()
    }

    /// Delays packets until `stop` is set, then accepts everything still held and returns.
    pub fn run(mut self, stop: &AtomicBool) -> io::Result<DelayStats> {
        while !stop.load(Ordering::Relaxed) {
            self.release_due(Instant::now())?;
            let wait = match self.held.front() {
                Some(&(due, _)) => due.saturating_duration_since(Instant::now()),
                None => STOP_POLL,
            };
            if self.q.wait(wait.min(STOP_POLL))? {
                self.read_burst()?;
            }
        }
        if let Some(&(_, last)) = self.held.back() {
            self.q.accept_through(last)?;
            self.counters
                .released
                .fetch_add(self.held.len() as u64, Ordering::Relaxed);
            self.held.clear();
        }
        Ok(self.counters.snapshot())
    }

    fn release_due(&mut self, now: Instant) -> io::Result<()> {
        let mut last = None;
        let mut n = 0;
        while let Some(&(due, id)) = self.held.front() {
            if due > now {
                break;
            }
            last = Some(id);
            n += 1;
            self.held.pop_front();
        }
        if let Some(id) = last {
            self.q.accept_through(id)?;
            self.counters.released.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    }

    fn read_burst(&mut self) -> io::Result<()> {
        for _ in 0..RECV_BURST {
            let now = Instant::now();
            let due = now + self.delay;
            let (held, counters) = (&mut self.held, &self.counters);
            let got = self.q.recv_events(|ev| match ev {
                Event::Packet { id } => {
                    held.push_back((due, id));
                    counters.received.fetch_add(1, Ordering::Relaxed);
                }
                Event::Overrun => {
                    counters.overruns.fetch_add(1, Ordering::Relaxed);
                }
                Event::Ack { errno, .. } => {
                    if errno != 0 {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })?;
            if !got {
                break;
            }
            // Keep release times honest under a long burst of arrivals.
            if self.held.front().is_some_and(|&(d, _)| d <= now) {
                self.release_due(now)?;
            }
        }
        Ok(())
    }
}
