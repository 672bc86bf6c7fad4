//! Session threads: each runs its own single-threaded runtime, and every
//! connection of a session (its control connection, its legs, its
//! streams' local connections) lives on the one thread its client id
//! hashes to.
//!
//! Why: in a work-stealing runtime the tasks of one session (a stream's
//! relay, the session task batching its acknowledgements) wake each other
//! across threads, and at moderate rates those wake-ups (futex, eventfd,
//! context switches) cost more than the relaying itself (bench/README.md,
//! finding 17). On one thread they are plain function calls; the gateway
//! still uses every core by spreading its sessions over the threads.

use std::hash::{Hash as _, Hasher as _};
use std::io;
use std::net::TcpStream as StdTcpStream;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The session threads of one gateway.
#[derive(Debug)]
pub(crate) struct Shards {
    handles: Vec<Handle>,
    /// Stops the threads (their runtimes drop whatever tasks are left).
    stop: CancellationToken,
}

impl Shards {
    /// Starts `n` threads named `{name}-{i}`, each running a
    /// current-thread runtime with I/O and timers.
    ///
    /// Work handed to a thread from outside it (a connection moved here, a
    /// wake-up from another thread) runs before the thread's own queue.
    /// Tokio's default takes one such task per 31 polls of local ones: a
    /// thread busy relaying 100 streams then took 30-40 ms to start the 100
    /// new legs of a session whose link went down, one every ~0.4 ms, while
    /// each needs only tens of microseconds (bench/README.md, finding 29).
    /// Checking first costs one atomic load per poll when nothing waits.
    pub(crate) fn start(n: usize, name: &str) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .global_queue_interval(1)
                .build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || rt.block_on(stop.cancelled()))?;
        }
        Ok(Self { handles, stop })
    }

    /// How many threads.
    pub(crate) fn len(&self) -> usize {
        self.handles.len()
    }

    /// The thread a client's sessions live on: the same for every
    /// connection of the client, so that they never wake each other
    /// across threads.
    pub(crate) fn index_of(&self, client_id: &str) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        client_id.hash(&mut h);
        (h.finish() % self.handles.len() as u64) as usize
    }

    pub(crate) fn handle(&self, index: usize) -> &Handle {
        &self.handles[index % self.handles.len()]
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A connection on its way to another thread: out of this runtime's
/// readiness registration, into the other's when [`Moving::arrive`] runs
/// there.
#[derive(Debug)]
pub(crate) struct Moving(StdTcpStream);

impl Moving {
    pub(crate) fn leave(conn: TcpStream) -> io::Result<Self> {
        // `into_std` leaves the socket non-blocking, as `from_std` needs.
        conn.into_std().map(Self)
    }

    /// A connection no runtime has registered yet (it must be non-blocking).
    pub(crate) fn from_std(conn: StdTcpStream) -> Self {
        Self(conn)
    }

    /// Registers the connection with the runtime this is called on.
    pub(crate) fn arrive(self) -> io::Result<TcpStream> {
        TcpStream::from_std(self.0)
    }
}

/// The index of the session thread this code runs on, if it is one of
/// `name`'s.
pub(crate) fn current_index(name: &str) -> Option<usize> {
    let t = std::thread::current();
    t.name()?
        .strip_prefix(name)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_moved_connection_works_on_its_thread() {
        let shards = Shards::start(3, "t-shard").unwrap();
        assert_eq!(shards.len(), 3);
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        let k = shards.index_of("laptop");
        assert_eq!(k, shards.index_of("laptop"), "stable");
        let moving = Moving::leave(s).unwrap();
        let echo = shards.handle(k).spawn(async move {
            let mut s = moving.arrive().unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            current_index("t-shard")
        });
        c.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
        assert_eq!(echo.await.unwrap(), Some(k), "ran on the client's thread");
        assert_eq!(current_index("t-shard"), None);
    }

    /// A thread kept busy by its own tasks (here pairs passing a token back
    /// and forth, as a relay's tasks wake each other) still starts what
    /// another thread hands it at once, not one task per so many polls.
    #[test]
    fn work_handed_to_a_busy_thread_runs_before_its_own() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;

        const PAIRS: usize = 20;
        const HANDED: u64 = 100;
        let shards = Shards::start(1, "t-busy").unwrap();
        let passes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        for _ in 0..PAIRS {
            let (to_b, mut at_b) = tokio::sync::mpsc::unbounded_channel::<()>();
            let (to_a, mut at_a) = tokio::sync::mpsc::unbounded_channel::<()>();
            to_b.send(()).unwrap();
            let (p, s) = (passes.clone(), stop.clone());
            shards.handle(0).spawn(async move {
                while at_b.recv().await.is_some() && !s.load(Ordering::Relaxed) {
                    p.fetch_add(1, Ordering::Relaxed);
                    let _ = to_a.send(());
                }
            });
            let (p, s) = (passes.clone(), stop.clone());
            shards.handle(0).spawn(async move {
                while at_a.recv().await.is_some() && !s.load(Ordering::Relaxed) {
                    p.fetch_add(1, Ordering::Relaxed);
                    let _ = to_b.send(());
                }
            });
        }
        // Wait until the pairs are busy.
        while passes.load(Ordering::Relaxed) < 10_000 {
            std::thread::yield_now();
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        for _ in 0..HANDED {
            let (p, done) = (passes.clone(), done_tx.clone());
            shards.handle(0).spawn(async move {
                let _ = done.send(p.load(Ordering::Relaxed));
            });
        }
        let handed_at = passes.load(Ordering::Relaxed);
        let last = (0..HANDED)
            .map(|_| {
                done_rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .unwrap()
            })
            .max()
            .unwrap();
        stop.store(true, Ordering::Relaxed);
        // Counted from the last hand-over: Tokio's default (one handed task
        // per 31 local polls) lets ~2,500 passes happen before the last
        // handed task runs; handed work first, next to none.
        let between = last.saturating_sub(handed_at);
        assert!(
            between < 1_000,
            "{between} passes of the thread's own tasks ran while {HANDED} handed tasks waited"
        );
    }

    #[test]
    fn clients_spread_over_the_threads() {
        let shards = Shards::start(4, "t-spread").unwrap();
        let mut seen = [0usize; 4];
        for i in 0..400 {
            seen[shards.index_of(&format!("client-{i}"))] += 1;
        }
        assert!(seen.iter().all(|&n| (60..=140).contains(&n)), "{seen:?}");
    }
}
