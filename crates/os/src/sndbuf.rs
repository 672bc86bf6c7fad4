//! A relayed connection's send buffer, sized to its path.
//!
//! Linux sizes a TCP socket's send buffer at about twice its congestion
//! window. Counted in segments, that is sound on a network, but on loopback
//! a segment is 64 KiB and the window dozens of them, so every buffer grows
//! to `tcp_wmem`'s maximum (4 MiB), although the path holds a few KiB. A relay chains three such connections:
//! megabytes of page references wait in each, far more than the CPU's cache,
//! and every byte is fetched from memory again at each hop. Sized to what the
//! path needs (`bench/README.md`, finding 21) the same loopback relay moves
//! 30-80% more bytes, with less CPU per byte.
//!
//! [`SendBuffer`] looks at a busy connection now and then (once per
//! [`CHECK_EVERY`] bytes written) and sets `SO_SNDBUF` to four times its
//! bandwidth-delay product, as TCP itself measures them (`TCP_INFO`: the
//! delivery rate and the smallest round trip), but never below [`FLOOR`].
//! It takes the buffer over only where it can always give it enough: where
//! the largest buffer the system allows would carry 100 Gbit/s over the
//! path's round trip. Any longer path (a WAN, most LANs) keeps the kernel's
//! own sizing untouched.

use std::io;
use std::os::fd::AsFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use socket2::SockRef;

/// The smallest send buffer asked for (the kernel doubles it for its
/// bookkeeping). Below this the relay's system calls move too little each.
pub const FLOOR: usize = 64 << 10;

/// How many bytes are written between two looks at the path.
pub const CHECK_EVERY: u64 = 1 << 20;

/// How many bytes are written before the first look: a connection that never
/// gets busy keeps the kernel's sizing and costs no system call.
pub const FIRST_CHECK: u64 = 256 << 10;

/// The rate a path whose buffer is taken over must still be able to carry,
/// in bytes a second (100 Gbit/s).
const FASTEST: f64 = 12.5e9;

/// What TCP knows of a connection's path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathInfo {
    /// The smallest round trip seen.
    pub min_rtt: Duration,
    /// The most recent delivery rate, bytes a second.
    pub delivery_rate: u64,
}

/// Reads `TCP_INFO` for a connected TCP socket.
pub fn path_info(sock: &impl AsFd) -> io::Result<PathInfo> {
    let info = tcp_info(sock)?;
    Ok(PathInfo {
        min_rtt: Duration::from_micros(u64::from(info.tcpi_min_rtt)),
        delivery_rate: info.tcpi_delivery_rate,
    })
}

// Unsafe because neither the standard library nor rustix, socket2 or nix
// wraps `TCP_INFO`: this is the one `getsockopt` baton makes itself.
#[allow(unsafe_code)]
fn tcp_info(sock: &impl AsFd) -> io::Result<libc::tcp_info> {
    use std::os::fd::AsRawFd;
    let fd = sock.as_fd();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `tcp_info` is plain integers, so all zeroes is a valid value;
    // the kernel writes at most `len` bytes into it and the descriptor is
    // borrowed for the call.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let r = libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        );
        if r == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(info)
    }
}

/// The largest send buffer this process may set: `net.core.wmem_max`, or
/// `tcp_wmem`'s maximum (what autotuning would reach) if that is smaller.
fn ceiling() -> usize {
    static CEILING: OnceLock<usize> = OnceLock::new();
    *CEILING
        .get_or_init(|| read_ceiling("/proc/sys/net/core/wmem_max", "/proc/sys/net/ipv4/tcp_wmem"))
}

/// The largest receive buffer: `net.core.rmem_max`, or `tcp_rmem`'s maximum
/// if that is smaller.
fn recv_ceiling() -> usize {
    static CEILING: OnceLock<usize> = OnceLock::new();
    *CEILING
        .get_or_init(|| read_ceiling("/proc/sys/net/core/rmem_max", "/proc/sys/net/ipv4/tcp_rmem"))
}

fn read_ceiling(core_max: &str, tcp_mem: &str) -> usize {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let core = read(core_max).and_then(|s| s.trim().parse::<usize>().ok());
    let tcp = read(tcp_mem).and_then(|s| {
        s.split_whitespace()
            .nth(2)
            .and_then(|v| v.parse::<usize>().ok())
    });
    match (core, tcp) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        // Linux's defaults.
        (None, None) => 212_992,
    }
}

/// The send buffer for a path: four bandwidth-delay products (two measured
/// slower on loopback, finding 21), at least [`FLOOR`], at most `ceiling`.
/// `None` leaves the kernel's sizing: the path is too long for `ceiling` to
/// carry [`FASTEST`], so a buffer set now could one day be too small and
/// not grow.
pub fn target(path: PathInfo, ceiling: usize) -> Option<usize> {
    sized(path.min_rtt, path.delivery_rate as f64, ceiling, FLOOR)
}

/// Four bandwidth-delay products of `rate` (bytes a second) over `rtt`,
/// within `floor..=ceiling`; `None` where `ceiling` could not carry
/// [`FASTEST`] over `rtt`.
fn sized(rtt: Duration, rate: f64, ceiling: usize, floor: usize) -> Option<usize> {
    let rtt = rtt.as_secs_f64();
    // Loopback's round trip is often 0-1 µs in TCP's clock: the floor.
    if rtt > ceiling as f64 / FASTEST || ceiling < floor {
        return None;
    }
    Some(((4.0 * rate * rtt) as usize).clamp(floor, ceiling))
}

/// Whether `want` differs enough from what is `set` (0: nothing yet) to be
/// worth a system call: by a quarter or more.
fn worth_changing(set: usize, want: usize) -> bool {
    set == 0 || want >= set + set / 4 || want <= set - set / 4
}

/// The smallest receive buffer asked for (the kernel doubles it, and
/// advertises about half of that as its window). Half of it measured slower
/// on loopback (`bench/README.md`, finding 26).
pub const RECV_FLOOR: usize = 256 << 10;

/// The receive buffer for a path whose reader takes `rate` bytes a second:
/// as [`target`], at least [`RECV_FLOOR`].
pub fn recv_target(min_rtt: Duration, rate: f64, ceiling: usize) -> Option<usize> {
    sized(min_rtt, rate, ceiling, RECV_FLOOR)
}

/// Sizes the receive buffer of a connection a relay reads from, the
/// counterpart of [`SendBuffer`]. Left to itself Linux grows a busy
/// connection's receive buffer towards `tcp_rmem`'s maximum (32 MiB on
/// Debian) whenever the reader falls behind for a moment; on loopback the
/// sender then fills megabytes of fresh pages that are cold by the time
/// they are read, and a relayed download falls into a mode at half its
/// speed (finding 26). Same rule as the send side: after [`FIRST_CHECK`]
/// bytes read and then once per [`CHECK_EVERY`], `SO_RCVBUF` is set to
/// four times the rate the reader took the bytes at times the path's
/// smallest round trip, at least [`RECV_FLOOR`], only on paths short enough
/// that the largest buffer allowed would carry 100 Gbit/s. A window that
/// holds the rate back makes the next look ask for four times it, so the
/// buffer follows a faster path up.
#[derive(Debug)]
pub struct RecvBuffer {
    read: u64,
    next_check: u64,
    /// When the bytes counted since the last look began to arrive.
    since: Option<Instant>,
    since_read: u64,
    /// What was last set; 0 while the kernel sizes the buffer.
    set: usize,
}

impl RecvBuffer {
    /// A sizer; with `enabled` false it never touches the buffer.
    pub fn new(enabled: bool) -> Self {
        Self {
            read: 0,
            next_check: if enabled { FIRST_CHECK } else { u64::MAX },
            since: None,
            since_read: 0,
            set: 0,
        }
    }

    /// What this sizer last set, if it took the buffer over.
    pub fn size(&self) -> Option<usize> {
        (self.set > 0).then_some(self.set)
    }

    /// Counts `n` bytes read from `sock` and now and then sizes its
    /// receive buffer; returns what is set, 0 while the kernel sizes it.
    /// Best effort, like [`SendBuffer::written`].
    pub fn read(&mut self, sock: &impl AsFd, n: usize) -> usize {
        if self.next_check == u64::MAX {
            return self.set;
        }
        // The clock is read at the first byte and at each look only: not
        // once per read on the relay's busiest path.
        let since = *self.since.get_or_insert_with(Instant::now);
        self.read += n as u64;
        if self.read >= self.next_check {
            self.next_check = self.read + CHECK_EVERY;
            let now = Instant::now();
            let secs = now.duration_since(since).as_secs_f64();
            let bytes = (self.read - self.since_read) as f64;
            self.since = Some(now);
            self.since_read = self.read;
            if secs > 0.0 {
                self.look(sock, bytes / secs);
            }
        }
        self.set
    }

    fn look(&mut self, sock: &impl AsFd, rate: f64) {
        let Ok(path) = path_info(sock) else { return };
        let Some(want) = recv_target(path.min_rtt, rate, recv_ceiling()) else {
            return;
        };
        if !worth_changing(self.set, want) {
            return;
        }
        if SockRef::from(sock).set_recv_buffer_size(want).is_ok() {
            self.set = want;
        }
    }
}

/// Sizes one connection's send buffer while it is written to; see the
/// module's text. Costs nothing on a connection that moves less than
/// [`FIRST_CHECK`].
#[derive(Debug)]
pub struct SendBuffer {
    written: u64,
    next_check: u64,
    /// What was last set; 0 while the kernel sizes the buffer.
    set: usize,
}

impl Default for SendBuffer {
    fn default() -> Self {
        Self::new(true)
    }
}

impl SendBuffer {
    /// A sizer; with `enabled` false it never touches the buffer (the
    /// kernel's sizing, `send_buffers = "kernel"`).
    pub fn new(enabled: bool) -> Self {
        Self {
            written: 0,
            next_check: if enabled { FIRST_CHECK } else { u64::MAX },
            set: 0,
        }
    }

    /// What this sizer last set, if it took the buffer over.
    pub fn size(&self) -> Option<usize> {
        (self.set > 0).then_some(self.set)
    }

    /// Counts `n` bytes written to `sock` and, after [`FIRST_CHECK`] and
    /// then once per [`CHECK_EVERY`], sizes its send buffer; returns what is
    /// set, 0 while the kernel sizes it. Best effort: a socket whose options
    /// cannot be read or set keeps the kernel's sizing.
    pub fn written(&mut self, sock: &impl AsFd, n: usize) -> usize {
        self.written += n as u64;
        if self.written >= self.next_check {
            self.next_check = self.written + CHECK_EVERY;
            self.look(sock);
        }
        self.set
    }

    fn look(&mut self, sock: &impl AsFd) {
        let Ok(path) = path_info(sock) else { return };
        let Some(want) = target(path, ceiling()) else {
            return;
        };
        if !worth_changing(self.set, want) {
            return;
        }
        if SockRef::from(sock).set_send_buffer_size(want).is_ok() {
            self.set = want;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn path(rtt_us: u64, rate: u64) -> PathInfo {
        PathInfo {
            min_rtt: Duration::from_micros(rtt_us),
            delivery_rate: rate,
        }
    }

    #[test]
    fn a_loopback_path_gets_the_floor() {
        // Loopback: a round trip of a few µs at 1.5 GB/s is a few KiB.
        assert_eq!(target(path(0, 1_500_000_000), 4 << 20), Some(FLOOR));
        assert_eq!(target(path(5, 1_500_000_000), 4 << 20), Some(FLOOR));
    }

    #[test]
    fn a_fast_short_path_gets_four_bandwidth_delay_products() {
        // 10 Gbit/s over 50 µs: 62.5 KB in flight.
        assert_eq!(target(path(50, 1_250_000_000), 4 << 20), Some(250_000));
        // 100 Gbit/s over 300 µs needs more than 4 MiB: capped.
        assert_eq!(target(path(300, 12_500_000_000), 4 << 20), Some(4 << 20));
    }

    #[test]
    fn a_long_path_keeps_the_kernels_sizing() {
        // A WAN, even a slow one: the kernel's buffer may have to grow.
        assert_eq!(target(path(20_000, 1_000_000), 4 << 20), None);
        // 1 ms of LAN with 4 MiB allowed: 4 MiB would carry only 4.2 GB/s.
        assert_eq!(target(path(1_000, 100_000), 4 << 20), None);
        // With Debian's default wmem_max (208 KiB) only a few µs qualify.
        assert_eq!(target(path(100, 100_000), 212_992), None);
        assert_eq!(target(path(10, 100_000), 212_992), Some(FLOOR));
        // A ceiling below the floor: nothing is set.
        assert_eq!(target(path(0, 1), 32 << 10), None);
    }

    /// On loopback a busy connection's buffer is taken over and set well
    /// below the kernel's 4 MiB (the kernel reports twice what was set); a
    /// connection that moved less than `FIRST_CHECK` is left alone.
    #[test]
    fn a_busy_loopback_connection_gets_a_small_buffer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut total = 0usize;
            let mut b = vec![0u8; 1 << 16];
            loop {
                match rx.read(&mut b).unwrap() {
                    0 => return total,
                    n => total += n,
                }
            }
        });
        let before = SockRef::from(&tx).send_buffer_size().unwrap();
        let mut sizer = SendBuffer::default();
        let chunk = vec![7u8; 64 << 10];
        let mut sent = 0usize;
        let write = |tx: &mut TcpStream, sizer: &mut SendBuffer| {
            tx.write_all(&chunk).unwrap();
            sizer.written(tx, chunk.len());
            chunk.len()
        };
        while sent + chunk.len() < FIRST_CHECK as usize {
            sent += write(&mut tx, &mut sizer);
        }
        assert_eq!(sizer.size(), None, "not busy yet: the kernel's sizing");
        assert_eq!(SockRef::from(&tx).send_buffer_size().unwrap(), before);
        while sent < 8 * CHECK_EVERY as usize {
            sent += write(&mut tx, &mut sizer);
            if let Some(set) = sizer.size() {
                assert!(
                    (FLOOR..=1 << 20).contains(&set),
                    "loopback needs little: {set}"
                );
                assert_eq!(SockRef::from(&tx).send_buffer_size().unwrap(), 2 * set);
            }
        }
        assert!(sizer.size().is_some(), "taken over");
        drop(tx);
        assert_eq!(reader.join().unwrap(), sent, "every byte arrives");
    }

    #[test]
    fn a_receive_buffer_follows_the_same_rule_with_its_own_floor() {
        let us = Duration::from_micros;
        // Loopback at 1.5 GB/s: the floor.
        assert_eq!(recv_target(us(5), 1.5e9, 4 << 20), Some(RECV_FLOOR));
        // 10 Gbit/s over 50 µs: four bandwidth-delay products.
        assert_eq!(
            recv_target(us(50), 1.25e9, 4 << 20),
            Some(250_000.max(RECV_FLOOR))
        );
        assert_eq!(recv_target(us(200), 1.25e9, 4 << 20), Some(1_000_000));
        // A path too long for the ceiling keeps the kernel's autotuning.
        assert_eq!(recv_target(us(1_000), 1e6, 4 << 20), None);
        assert_eq!(recv_target(us(10), 1e6, 128 << 10), None);
    }

    /// A busy loopback connection read by the sizer gets a bounded receive
    /// buffer (the kernel reports twice what was set); one that moved less
    /// than `FIRST_CHECK` and a disabled sizer keep the kernel's.
    #[test]
    fn a_busy_loopback_reader_gets_a_bounded_receive_buffer() {
        let run = |enabled: bool| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut rx, _) = l.accept().unwrap();
            let total = 8 * CHECK_EVERY as usize;
            let writer = std::thread::spawn(move || {
                let chunk = vec![9u8; 64 << 10];
                let mut sent = 0;
                while sent < total {
                    tx.write_all(&chunk).unwrap();
                    sent += chunk.len();
                }
            });
            let mut sizer = RecvBuffer::new(enabled);
            let mut b = vec![0u8; 64 << 10];
            let mut got = 0usize;
            let mut seen_before_check = None;
            while got < total {
                let n = rx.read(&mut b).unwrap();
                assert!(n > 0, "early end after {got}");
                assert!(b[..n].iter().all(|&x| x == 9));
                got += n;
                sizer.read(&rx, n);
                if got < FIRST_CHECK as usize {
                    seen_before_check = sizer.size();
                }
            }
            writer.join().unwrap();
            assert_eq!(seen_before_check, None, "not busy yet: the kernel's sizing");
            (sizer.size(), SockRef::from(&rx).recv_buffer_size().unwrap())
        };
        let (set, now) = run(true);
        let set = set.expect("taken over");
        assert!(
            (RECV_FLOOR..=4 << 20).contains(&set),
            "loopback needs little: {set}"
        );
        assert_eq!(now, 2 * set);
        let (set, _) = run(false);
        assert_eq!(set, None);
    }

    /// `send_buffers = "kernel"`: however busy, the buffer is the kernel's.
    #[test]
    fn a_disabled_sizer_never_sets_the_buffer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        let reader = std::thread::spawn(move || io::copy(&mut rx, &mut io::sink()).unwrap());
        let mut sizer = SendBuffer::new(false);
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..64 {
            tx.write_all(&chunk).unwrap();
            sizer.written(&tx, chunk.len());
        }
        assert_eq!(sizer.size(), None);
        // The kernel's autotuning has moved it off any value the sizer sets.
        let now = SockRef::from(&tx).send_buffer_size().unwrap();
        drop(tx);
        assert_eq!(reader.join().unwrap(), 64 * (64 << 10));
        assert!(now > 2 * FLOOR, "{now}");
    }
}
