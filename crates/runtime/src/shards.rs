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
    pub(crate) fn start(n: usize, name: &str) -> io::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
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
