//! A kernel pipe used to move bytes from one socket to another with
//! `splice(2)`, so that they never enter user space.
//!
//! A relay's receiving end has nothing to keep: the bytes a leg brings go
//! straight to the local connection, and what was delivered is acknowledged.
//! Reading them into a buffer and writing them out again is two copies per
//! byte; splicing through a pipe moves page references instead.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;

/// Pipes open in this process.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// How many pipes may be open at once in this process: an eighth of its
/// open-files limit (each takes two descriptors), so that pipes, which only
/// save copies, never take the descriptors that connections need.
pub fn pipe_budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        use nix::sys::resource::{getrlimit, Resource};
        let soft = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        usize::try_from(soft / 8).unwrap_or(usize::MAX).max(16)
    })
}

/// Pipes open in this process now.
pub fn open_pipes() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// A pipe between two sockets, and how many bytes it holds.
#[derive(Debug)]
pub struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    held: usize,
    capacity: usize,
    _slot: Slot,
}

/// One pipe's place in the budget, given back when dropped.
#[derive(Debug)]
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SplicePipe {
    /// A non-blocking pipe of (at least) `size` bytes if the system allows,
    /// else of the system's default size. Fails when the process's
    /// [`pipe_budget`] is used up or no pipe can be made: the caller then
    /// copies through user space.
    pub fn new(size: usize) -> io::Result<Self> {
        if OPEN.fetch_add(1, Ordering::Relaxed) >= pipe_budget() {
            OPEN.fetch_sub(1, Ordering::Relaxed);
            return Err(io::Error::other("pipe budget used up"));
        }
        // Counted from here: dropping it, with `Self` or on an error below,
        // gives the place back.
        let slot = Slot;
        let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let wanted = i32::try_from(size).unwrap_or(i32::MAX);
        // A larger pipe moves more per system call; the size may be refused
        // (above `/proc/sys/fs/pipe-max-size`, or the user's pipe pages used
        // up), and then the default pipe still works.
        let capacity = match fcntl(&write, FcntlArg::F_SETPIPE_SZ(wanted)) {
            Ok(got) => got,
            Err(_) => fcntl(&write, FcntlArg::F_GETPIPE_SZ)?,
        };
        Ok(Self {
            read,
            write,
            held: 0,
            capacity: usize::try_from(capacity).unwrap_or(0),
            _slot: slot,
        })
    }

    /// Bytes in the pipe, moved in but not out yet.
    pub fn held(&self) -> usize {
        self.held
    }

    /// How much the pipe can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Moves up to `max` bytes (at most what the pipe has room for) from the
    /// socket `from` into the pipe. `Ok(0)` is the socket's end of file;
    /// `WouldBlock` means it has nothing to read now.
    pub fn fill_from(&mut self, from: impl AsFd, max: usize) -> io::Result<usize> {
        let room = self.capacity.saturating_sub(self.held).min(max);
        if room == 0 {
            // Asking for nothing would look like end of file.
            return Err(io::Error::other("pipe full"));
        }
        let n = retry(|| {
            splice(
                from.as_fd(),
                None,
                &self.write,
                None,
                room,
                SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
            )
        })?;
        self.held += n;
        Ok(n)
    }

    /// Moves what the pipe holds, or as much as `to` takes now, into the
    /// socket `to`. `WouldBlock` means its send buffer is full.
    pub fn drain_to(&mut self, to: impl AsFd) -> io::Result<usize> {
        if self.held == 0 {
            return Ok(0);
        }
        let n = retry(|| {
            splice(
                &self.read,
                None,
                to.as_fd(),
                None,
                self.held,
                SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
            )
        })?;
        self.held -= n;
        Ok(n)
    }
}

fn retry(mut f: impl FnMut() -> nix::Result<usize>) -> io::Result<usize> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn bytes_go_from_one_socket_to_another_unchanged() {
        let (mut src_w, src_r) = pair();
        let (dst_w, mut dst_r) = pair();
        src_r.set_nonblocking(true).unwrap();
        let mut pipe = SplicePipe::new(256 * 1024).unwrap();
        assert!(pipe.capacity() >= 4096);
        let e = pipe.fill_from(&src_r, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);

        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let writer = std::thread::spawn(move || {
            src_w.write_all(&data).unwrap();
            data
        });
        // Read as it comes: the bytes may not all fit in the socket buffers.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            dst_r.read_to_end(&mut got).unwrap();
            got
        });
        let mut moved = 0;
        while moved < 200_000 {
            match pipe.fill_from(&src_r, 1 << 20) {
                Ok(0) => panic!("early end of file"),
                Ok(n) => {
                    assert_eq!(pipe.held(), n);
                    while pipe.held() > 0 {
                        moved += pipe.drain_to(&dst_w).unwrap();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            pipe.drain_to(&dst_w).unwrap(),
            0,
            "an empty pipe moves nothing"
        );
        drop(dst_w);
        assert_eq!(reader.join().unwrap(), writer.join().unwrap());
    }

    #[test]
    fn end_of_file_reads_as_zero() {
        let (src_w, src_r) = pair();
        drop(src_w);
        let mut pipe = SplicePipe::new(4096).unwrap();
        assert_eq!(pipe.fill_from(&src_r, 4096).unwrap(), 0);
    }
}
