//! Moving a stream's bytes between two TCP connections.
//!
//! Each direction is copied independently, so a half-close (FIN) in one
//! direction is passed on as a half-close while the other keeps flowing. An
//! error in either direction (a reset, most often) resets both sides: the
//! reset is carried as a reset, never turned into a clean end.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Size of each direction's copy buffer.
pub const RELAY_BUFFER: usize = 256 * 1024;

/// Byte counters of a relayed stream, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes copied from the first connection to the second.
    pub forward: AtomicU64,
    /// Bytes copied from the second connection to the first.
    pub backward: AtomicU64,
}

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions finished cleanly (each side half-closed).
    Finished,
    /// One side failed or reset; both were reset.
    Reset(io::Error),
    /// The relay was cancelled (session released); both were reset.
    Cancelled,
}

async fn pump<R, W>(mut r: R, mut w: W, counter: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Relays between `a` and `b` until both directions end, one fails, or
/// `cancel` fires.
pub async fn relay(mut a: TcpStream, mut b: TcpStream, counters: &Counters, cancel: &CancellationToken) -> RelayEnd {
    let end = {
        let (ar, aw) = a.split();
        let (br, bw) = b.split();
        let both = async {
            tokio::try_join!(pump(ar, bw, &counters.forward), pump(br, aw, &counters.backward))
        };
        tokio::select! {
            r = both => match r {
                Ok(_) => RelayEnd::Finished,
                Err(e) => RelayEnd::Reset(e),
            },
            _ = cancel.cancelled() => RelayEnd::Cancelled,
        }
    };
    if !matches!(end, RelayEnd::Finished) {
        baton_os::reset(a);
        baton_os::reset(b);
    }
    end
}
