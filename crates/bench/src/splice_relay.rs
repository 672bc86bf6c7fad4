//! `baton-bench splice-relay`: the cheapest relay there is, as a yardstick.
//!
//! Accepts connections, connects each to the next hop, and moves the bytes
//! both ways with `splice(2)` through a 1 MiB pipe: no user-space copy, no
//! event loop (a blocking thread per direction), no protocol, nothing kept.
//! Two of them chained are what two relay hops cost the kernel alone; a
//! relay that must also keep what it sends for a resume cannot beat them.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use nix::unistd::pipe2;

const PIPE: usize = 1 << 20;

pub(crate) fn run(listen: SocketAddr, to: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    for conn in l.incoming() {
        let a = conn.context("accepting")?;
        let b = match TcpStream::connect(to) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("splice-relay: connecting to {to}: {e}");
                continue;
            }
        };
        // As baton, HAProxy and socat set it: compare relays, not Nagle.
        a.set_nodelay(true)?;
        b.set_nodelay(true)?;
        let (a2, b2) = (a.try_clone()?, b.try_clone()?);
        std::thread::spawn(move || pump(&a, &b));
        std::thread::spawn(move || pump(&b2, &a2));
    }
    Ok(())
}

/// Moves bytes from `from` to `to` until `from` ends, then half-closes `to`.
fn pump(from: &TcpStream, to: &TcpStream) {
    if let Err(e) = pump_inner(from, to) {
        if e != Errno::ECONNRESET && e != Errno::EPIPE {
            eprintln!("splice-relay: {e}");
        }
        let _ = from.shutdown(Shutdown::Both);
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn pump_inner(from: &TcpStream, to: &TcpStream) -> nix::Result<()> {
    let (r, w) = pipe2(OFlag::O_CLOEXEC)?;
    // Above pipe-max-size it stays at the default 64 KiB: still a splice.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE as i32));
    loop {
        let n = retry(|| {
            splice(
                from.as_fd(),
                None,
                &w,
                None,
                PIPE,
                SpliceFFlags::SPLICE_F_MOVE,
            )
        })?;
        if n == 0 {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= retry(|| {
                splice(
                    &r,
                    None,
                    to.as_fd(),
                    None,
                    left,
                    SpliceFFlags::SPLICE_F_MOVE,
                )
            })?;
        }
    }
}

fn retry(mut f: impl FnMut() -> nix::Result<usize>) -> nix::Result<usize> {
    loop {
        match f() {
            Err(Errno::EINTR) => continue,
            r => return r,
        }
    }
}
