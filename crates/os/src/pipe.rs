//! A kernel pipe used to move bytes from one socket to another with
//! `splice(2)`, so that they never enter user space.
//!
//! A relay's receiving end has nothing to keep: the bytes a leg brings go
//! straight to the local connection, and what was delivered is acknowledged.
//! Reading them into a buffer and writing them out again is two copies per
//! byte; splicing through a pipe moves page references instead.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, tee, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::{pipe2, read};

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
    /// else of the system's default size (refused if that is smaller than
    /// `size` and than 64 KiB). Fails when the process's
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
        let capacity = usize::try_from(capacity).unwrap_or(0);
        if capacity < size.min(64 * 1024) {
            // Past the user's pipe pages (`pipe-user-pages-soft`) a new
            // pipe gets two pages: splicing through it would cost more
            // system calls than the copies it saves.
            return Err(io::Error::other("pipe too small"));
        }
        Ok(Self {
            read,
            write,
            held: 0,
            capacity,
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

    /// Copies (page references, not bytes) everything this pipe holds to
    /// the end of `to`, leaving this pipe as it was. Returns how much was
    /// copied: less than held when `to` lacks room.
    fn tee_to(&self, to: &mut SplicePipe) -> io::Result<usize> {
        if self.held == 0 {
            return Ok(0);
        }
        let n = retry(|| {
            tee(
                &self.read,
                &to.write,
                self.held,
                SpliceFFlags::SPLICE_F_NONBLOCK,
            )
        })
        .or_else(would_block_is_none)?;
        to.held += n;
        Ok(n)
    }

    /// Moves up to `max` bytes from the front of this pipe to the end of
    /// `to` (page references). Returns how much was moved, 0 when `to` is
    /// full.
    fn move_to(&mut self, to: &mut SplicePipe, max: usize) -> io::Result<usize> {
        let len = self.held.min(max);
        if len == 0 {
            return Ok(0);
        }
        let n = retry(|| {
            splice(
                &self.read,
                None,
                &to.write,
                None,
                len,
                SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
            )
        })
        .or_else(would_block_is_none)?;
        self.held -= n;
        to.held += n;
        Ok(n)
    }

    /// Drops the first `n` bytes the pipe holds (at most all of them),
    /// without copying them: their pages go back when nothing else uses
    /// them. Returns how many were dropped.
    fn discard(&mut self, n: usize) -> io::Result<usize> {
        let len = self.held.min(n);
        if len == 0 {
            return Ok(0);
        }
        let null = dev_null()?;
        let n = retry(|| {
            splice(
                &self.read,
                None,
                null,
                None,
                len,
                SpliceFFlags::SPLICE_F_NONBLOCK,
            )
        })?;
        self.held -= n;
        Ok(n)
    }

    /// Copies bytes from the front of the pipe into `buf`, taking them out.
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = self.held.min(buf.len());
        if len == 0 {
            return Ok(0);
        }
        let n = retry(|| read(&self.read, &mut buf[..len]))?;
        self.held -= n;
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

/// A full pipe on the other end moved nothing: not an error.
fn would_block_is_none(e: io::Error) -> io::Result<usize> {
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(0)
    } else {
        Err(e)
    }
}

/// Where dropped bytes go: `/dev/null` takes spliced pages without a copy.
fn dev_null() -> io::Result<&'static File> {
    static NULL: OnceLock<Option<File>> = OnceLock::new();
    NULL.get_or_init(|| File::options().write(true).open("/dev/null").ok())
        .as_ref()
        .ok_or_else(|| io::Error::other("/dev/null cannot be opened"))
}

/// Most pipes one [`PipeReplay`] keeps bytes in: with page-sized pieces a
/// 1 MiB pipe may hold as little as 1 MiB, with smaller ones less.
const MAX_KEPT_PIPES: usize = 24;

/// The sending end of a stream, without copies: bytes read from a socket
/// are both queued to be written to another socket and kept until the peer
/// confirms them, as page references in pipes (`splice(2)`, `tee(2)`).
///
/// A resume that must send kept bytes again takes them out with
/// [`read_kept`](Self::read_kept), a copy; that happens once per switch,
/// not per byte sent.
///
/// Holds bytes only in order: everything the queue to send holds is the
/// newest part of what is kept.
#[derive(Debug)]
pub struct PipeReplay {
    /// What the last read brought, until it is both queued and kept.
    stage: SplicePipe,
    /// Bytes to write, oldest first.
    send: SplicePipe,
    /// Bytes kept for a resume, oldest first.
    kept: VecDeque<SplicePipe>,
    /// An emptied pipe, to be used again rather than closed and remade.
    spare: Option<SplicePipe>,
    /// The last read could not be queued whole: the queue is incomplete
    /// and only what is kept counts.
    queue_broken: bool,
    size: usize,
}

impl PipeReplay {
    /// Pipes of `size` bytes (two, and one more per `size` kept at least).
    /// Fails when the pipes cannot be made or come out smaller than the
    /// system's default pipe: the caller copies instead.
    pub fn new(size: usize) -> io::Result<Self> {
        let stage = SplicePipe::new(size)?;
        let send = SplicePipe::new(size)?;
        let kept = SplicePipe::new(size)?;
        if send.capacity() < stage.capacity() || stage.capacity() < 64 * 1024 {
            // A queue smaller than a read could not take it whole.
            return Err(io::Error::other("pipes too small"));
        }
        Ok(Self {
            stage,
            send,
            kept: VecDeque::from([kept]),
            spare: None,
            queue_broken: false,
            size,
        })
    }

    /// Bytes kept (not yet confirmed), the queued ones included.
    pub fn held(&self) -> usize {
        self.kept.iter().map(SplicePipe::held).sum::<usize>() + self.stage.held()
    }

    /// Bytes queued but not written yet: the last `queued()` of
    /// [`held`](Self::held).
    pub fn queued(&self) -> usize {
        self.send.held()
    }

    /// The queue lost bytes (a read that could not be queued whole): only
    /// [`read_kept`](Self::read_kept) can send them now.
    pub fn queue_broken(&self) -> bool {
        self.queue_broken
    }

    /// Whether [`take_from`](Self::take_from) may read: everything before
    /// is written and kept.
    pub fn can_take(&mut self) -> io::Result<bool> {
        self.settle()?;
        Ok(!self.queue_broken && self.send.held() == 0 && self.stage.held() == 0)
    }

    /// Reads up to `max` bytes from `from`, to be written and kept. `Ok(0)`
    /// is its end of file; `WouldBlock` means it has nothing now. Reading
    /// when [`can_take`](Self::can_take) is false is an error.
    pub fn take_from(&mut self, from: impl AsFd, max: usize) -> io::Result<usize> {
        if !self.can_take()? {
            return Err(io::Error::other("the last read is not written yet"));
        }
        let n = self.stage.fill_from(from, max.min(self.stage.capacity()))?;
        // The queue is empty and as large as the stage: it takes all.
        if self.stage.tee_to(&mut self.send)? < n {
            self.queue_broken = true;
        }
        self.settle()?;
        Ok(n)
    }

    /// Moves what the stage holds (already queued) behind what is kept,
    /// into a new pipe when the last is full.
    fn settle(&mut self) -> io::Result<()> {
        while self.stage.held() > 0 {
            let last = match self.kept.back_mut() {
                Some(p) => p,
                None => return Err(io::Error::other("no pipe to keep bytes in")),
            };
            if self.stage.move_to(last, usize::MAX)? > 0 {
                continue;
            }
            if self.kept.len() >= MAX_KEPT_PIPES {
                // Waits for confirmations to empty the oldest.
                return Ok(());
            }
            let next = match self.spare.take() {
                Some(p) => p,
                None => match SplicePipe::new(self.size) {
                    Ok(p) => p,
                    // Out of pipes: waits for confirmations.
                    Err(_) => return Ok(()),
                },
            };
            self.kept.push_back(next);
        }
        Ok(())
    }

    /// Writes queued bytes to the socket `to`. `WouldBlock` means its send
    /// buffer is full.
    pub fn send_to(&mut self, to: impl AsFd) -> io::Result<usize> {
        self.send.drain_to(to)
    }

    /// Drops the `n` oldest kept bytes (confirmed by the peer), without a
    /// copy.
    pub fn confirm(&mut self, mut n: usize) -> io::Result<()> {
        if n > self.held() {
            return Err(io::Error::other("confirmation beyond the kept bytes"));
        }
        while n > 0 {
            let front_held = self.kept.front().map_or(0, SplicePipe::held);
            let more = self.kept.len() > 1;
            let dropped = match self.kept.front_mut() {
                Some(front) if front_held > 0 => front.discard(n)?,
                _ if more => {
                    let empty = self.kept.pop_front();
                    if self.spare.is_none() {
                        self.spare = empty;
                    }
                    continue;
                }
                // The rest is in the stage, behind everything kept.
                _ => self.stage.discard(n)?,
            };
            if dropped == 0 {
                return Err(io::Error::other("kept bytes could not be dropped"));
            }
            n -= dropped;
        }
        self.settle()
    }

    /// Copies the oldest kept bytes into `buf` and drops them: what a
    /// resume needs is then in the caller's buffer.
    pub fn read_kept(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while let Some(front) = self.kept.front_mut() {
            if front.held() > 0 {
                return front.read_into(buf);
            }
            if self.kept.len() == 1 {
                break;
            }
            self.kept.pop_front();
        }
        self.stage.read_into(buf)
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
    fn a_pipe_replay_sends_keeps_confirms_and_gives_back_in_order() {
        let (mut src_w, src_r) = pair();
        let (dst_w, mut dst_r) = pair();
        src_r.set_nonblocking(true).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || src_w.write_all(&sent).unwrap());
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            dst_r.read_to_end(&mut got).unwrap();
            got
        });
        // Small pipes: the kept bytes need many of them.
        let mut r = PipeReplay::new(64 * 1024).unwrap();
        let (mut taken, mut confirmed) = (0, 0);
        loop {
            while r.queued() > 0 {
                r.send_to(&dst_w).unwrap();
            }
            if r.held() > 512 * 1024 || !r.can_take().unwrap() {
                // Confirm an odd amount: pieces are split.
                let c = r.held() / 2 + 1;
                r.confirm(c).unwrap();
                confirmed += c;
            }
            match r.take_from(&src_r, 1 << 20) {
                Ok(0) => break,
                Ok(n) => {
                    taken += n;
                    assert_eq!(r.held(), taken - confirmed);
                    assert_eq!(r.queued(), n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        writer.join().unwrap();
        assert!(!r.queue_broken());
        assert!(r.confirm(r.held() + 1).is_err(), "beyond what is kept");
        // What is kept is the unconfirmed tail, in order.
        let mut kept = Vec::new();
        let mut piece = [0u8; 7000];
        loop {
            let n = r.read_kept(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&piece[..n]);
        }
        assert_eq!(r.held(), 0);
        assert_eq!(kept, data[confirmed..]);
        drop(dst_w);
        assert_eq!(
            reader.join().unwrap(),
            data,
            "everything was sent once, in order"
        );
    }

    #[test]
    fn a_written_queue_leaves_the_kept_bytes() {
        let (mut src_w, src_r) = pair();
        src_w.write_all(b"hello, resume").unwrap();
        let mut r = PipeReplay::new(64 * 1024).unwrap();
        let n = loop {
            match r.take_from(&src_r, 5) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(n, 5);
        assert!(!r.can_take().unwrap(), "the queue must be written first");
        assert!(r.take_from(&src_r, 5).is_err());
        let (dst_w, _dst_r) = pair();
        assert_eq!(r.send_to(&dst_w).unwrap(), 5);
        assert_eq!((r.queued(), r.held()), (0, 5));
        assert!(r.can_take().unwrap());
        let mut b = [0u8; 16];
        assert_eq!(r.read_kept(&mut b).unwrap(), 5);
        assert_eq!(&b[..5], b"hello");
    }

    #[test]
    fn end_of_file_reads_as_zero() {
        let (src_w, src_r) = pair();
        drop(src_w);
        let mut pipe = SplicePipe::new(4096).unwrap();
        assert_eq!(pipe.fill_from(&src_r, 4096).unwrap(), 0);
    }
}
