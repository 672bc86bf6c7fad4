//! Verified traffic: a server and a client that exchange deterministic byte
//! patterns and check every byte they receive. Used by `baton demo`, the
//! integration tests and the benchmarks to prove streams byte-exact.
//!
//! A client opens a connection and sends a 33-byte header (seed, bytes up,
//! bytes down, mode, pace), then `up` bytes of the pattern for `(seed, Up)`, then
//! half-closes. The server checks what it receives against the same
//! pattern and sends `down` bytes of the pattern for `(seed, Down)`. Both
//! ends compare byte by byte and keep a SHA-256 of what they received.

use std::io;

use ring::digest::{Context, SHA256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const BLOCK: usize = 1 << 20;

/// Which direction a pattern is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// A deterministic, non-periodic (within 256 MiB) byte sequence.
#[derive(Debug, Clone)]
pub struct Pattern {
    block: Vec<u8>,
    pos: u64,
}

impl Pattern {
    /// The pattern for `(seed, dir)`.
    pub fn new(seed: u64, dir: Dir) -> Self {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ if dir == Dir::Up { 0x5555 } else { 0xAAAA }
            | 1;
        let mut block = vec![0u8; BLOCK];
        for chunk in block.chunks_exact_mut(8) {
            // xorshift64*
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            chunk.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        Self { block, pos: 0 }
    }

    /// Fills `buf` with the next bytes of the sequence.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let off = (self.pos % BLOCK as u64) as usize;
            let n = (BLOCK - off).min(buf.len() - done);
            // The block repeats; XOR-ing in the block number makes a lost or
            // repeated whole block detectable.
            let twist = (self.pos / BLOCK as u64) as u8;
            for (d, s) in buf[done..done + n]
                .iter_mut()
                .zip(&self.block[off..off + n])
            {
                *d = s ^ twist;
            }
            done += n;
            self.pos += n as u64;
        }
    }
}

/// Checks incoming bytes against a pattern.
pub struct Checker {
    pattern: Pattern,
    expect: Vec<u8>,
    hash: Context,
    /// Bytes checked so far.
    pub received: u64,
    /// Offset of the first byte that differed, if any.
    pub first_mismatch: Option<u64>,
}

impl std::fmt::Debug for Checker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("received", &self.received)
            .field("first_mismatch", &self.first_mismatch)
            .finish()
    }
}

impl Checker {
    /// A checker for the pattern `(seed, dir)`.
    pub fn new(seed: u64, dir: Dir) -> Self {
        Self {
            pattern: Pattern::new(seed, dir),
            expect: Vec::new(),
            hash: Context::new(&SHA256),
            received: 0,
            first_mismatch: None,
        }
    }

    /// Checks the next received bytes.
    pub fn check(&mut self, data: &[u8]) {
        self.expect.resize(data.len(), 0);
        self.pattern.fill(&mut self.expect);
        if self.first_mismatch.is_none() && data != &self.expect[..] {
            let i = data
                .iter()
                .zip(&self.expect)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            self.first_mismatch = Some(self.received + i as u64);
        }
        self.hash.update(data);
        self.received += data.len() as u64;
    }

    /// SHA-256 of everything received.
    pub fn digest(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.hash.finish().as_ref());
        out
    }
}

/// SHA-256 of the first `len` bytes of the pattern `(seed, dir)`.
pub fn expected_digest(seed: u64, dir: Dir, len: u64) -> [u8; 32] {
    let mut p = Pattern::new(seed, dir);
    let mut h = Context::new(&SHA256);
    let mut buf = vec![0u8; BLOCK];
    let mut left = len;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(h.finish().as_ref());
    out
}

/// When the server sends relative to what it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Both directions at once.
    Concurrent,
    /// The server sends only after the client has half-closed: the
    /// client→server direction is finished while server→client still flows.
    AfterClientFin,
    /// The server sends everything and half-closes before it reads: the
    /// server→client direction is finished while client→server still flows.
    ServerFinFirst,
}

impl Mode {
    fn code(self) -> u8 {
        match self {
            Self::Concurrent => 0,
            Self::AfterClientFin => 1,
            Self::ServerFinFirst => 2,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => Self::Concurrent,
            1 => Self::AfterClientFin,
            2 => Self::ServerFinFirst,
            _ => return None,
        })
    }
}

/// What one side saw of one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The exchange's seed.
    pub seed: u64,
    /// Bytes received.
    pub received: u64,
    /// Bytes expected.
    pub expected: u64,
    /// First differing offset, if any.
    pub first_mismatch: Option<u64>,
    /// SHA-256 of what was received.
    pub digest: [u8; 32],
}

impl Report {
    /// Everything expected arrived, unchanged, and nothing more.
    pub fn is_exact(&self, dir: Dir) -> bool {
        self.received == self.expected
            && self.first_mismatch.is_none()
            && self.digest == expected_digest(self.seed, dir, self.expected)
    }
}

async fn send_pattern(
    w: &mut (impl AsyncWriteExt + Unpin),
    seed: u64,
    dir: Dir,
    len: u64,
    pace: u64,
) -> io::Result<()> {
    let mut p = Pattern::new(seed, dir);
    // Paced senders write small chunks so the rate is smooth.
    let chunk = if pace > 0 {
        (pace / 100).clamp(1024, 256 * 1024) as usize
    } else {
        256 * 1024
    };
    let mut buf = vec![0u8; chunk];
    let mut left = len;
    let start = tokio::time::Instant::now();
    let mut sent = 0u64;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
        sent += n as u64;
        if pace > 0 {
            let due = start + std::time::Duration::from_secs_f64(sent as f64 / pace as f64);
            tokio::time::sleep_until(due).await;
        }
    }
    w.shutdown().await
}

async fn receive_pattern(
    r: &mut (impl AsyncReadExt + Unpin),
    seed: u64,
    dir: Dir,
    expected: u64,
) -> io::Result<Report> {
    let mut c = Checker::new(seed, dir);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        c.check(&buf[..n]);
    }
    let (received, first_mismatch) = (c.received, c.first_mismatch);
    Ok(Report {
        seed,
        received,
        expected,
        first_mismatch,
        digest: c.digest(),
    })
}

/// Runs one exchange as the client over `stream`; returns what the client
/// received (the server→client direction).
pub async fn exchange(
    stream: TcpStream,
    seed: u64,
    up: u64,
    down: u64,
    mode: Mode,
) -> io::Result<Report> {
    exchange_paced(stream, seed, up, down, mode, 0).await
}

/// Like [`exchange`], with both ends sending at most `pace` bytes per
/// second (0: as fast as possible), so that a stream lasts long enough to
/// live through switches.
pub async fn exchange_paced(
    mut stream: TcpStream,
    seed: u64,
    up: u64,
    down: u64,
    mode: Mode,
    pace: u64,
) -> io::Result<Report> {
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(&seed.to_be_bytes());
    header[8..16].copy_from_slice(&up.to_be_bytes());
    header[16..24].copy_from_slice(&down.to_be_bytes());
    header[24] = mode.code();
    header[25..33].copy_from_slice(&pace.to_be_bytes());
    stream.write_all(&header).await?;
    let (mut r, mut w) = stream.split();
    let (_, report) = tokio::try_join!(
        send_pattern(&mut w, seed, Dir::Up, up, pace),
        receive_pattern(&mut r, seed, Dir::Down, down)
    )?;
    Ok(report)
}

const HEADER: usize = 33;

/// Serves exchanges on `listener` forever, sending a report of the
/// client→server direction of each on `reports`.
pub async fn serve(listener: TcpListener, reports: mpsc::UnboundedSender<io::Result<Report>>) {
    while let Ok((stream, _)) = listener.accept().await {
        let reports = reports.clone();
        tokio::spawn(async move {
            let _ = reports.send(serve_one(stream).await);
        });
    }
}

async fn serve_one(mut stream: TcpStream) -> io::Result<Report> {
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header).await?;
    let seed = u64::from_be_bytes(header[..8].try_into().expect("8 bytes"));
    let up = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let down = u64::from_be_bytes(header[16..24].try_into().expect("8 bytes"));
    let mode = Mode::from_code(header[24])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad mode"))?;
    let pace = u64::from_be_bytes(header[25..33].try_into().expect("8 bytes"));
    let (mut r, mut w) = stream.split();
    match mode {
        Mode::Concurrent => {
            let (_, rep) = tokio::try_join!(
                send_pattern(&mut w, seed, Dir::Down, down, pace),
                receive_pattern(&mut r, seed, Dir::Up, up)
            )?;
            Ok(rep)
        }
        Mode::AfterClientFin => {
            let rep = receive_pattern(&mut r, seed, Dir::Up, up).await?;
            send_pattern(&mut w, seed, Dir::Down, down, pace).await?;
            Ok(rep)
        }
        Mode::ServerFinFirst => {
            send_pattern(&mut w, seed, Dir::Down, down, pace).await?;
            receive_pattern(&mut r, seed, Dir::Up, up).await
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_deterministic_and_chunking_free() {
        let mut a = Pattern::new(7, Dir::Up);
        let mut whole = vec![0u8; 3 * BLOCK + 5];
        a.fill(&mut whole);
        let mut c = Checker::new(7, Dir::Up);
        for chunk in whole.chunks(70_001) {
            c.check(chunk);
        }
        assert_eq!(c.first_mismatch, None);
        assert_eq!(c.digest(), expected_digest(7, Dir::Up, whole.len() as u64));
        // Another seed or direction differs; a dropped block is caught.
        let mut other = vec![0u8; 64];
        Pattern::new(7, Dir::Down).fill(&mut other);
        assert_ne!(&other[..], &whole[..64]);
        let mut c = Checker::new(7, Dir::Up);
        c.check(&whole[..BLOCK]);
        c.check(&whole[2 * BLOCK..3 * BLOCK]);
        assert_eq!(c.first_mismatch, Some(BLOCK as u64));
    }
}
