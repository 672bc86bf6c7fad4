//! OS glue: the socket options baton needs, behind safe functions; the live
//! interface table ([`iface`]); connections out of a chosen interface
//! ([`bind`]). Linux only.

// Unsafe only where a socket option has no safe wrapper (`sndbuf`, `fastopen`).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bind;
pub mod fastopen;
pub mod handoff;
pub mod iface;
pub mod pipe;
pub mod sndbuf;

pub use bind::{connect_via, connect_via_with};
pub use handoff::{Handed, Handoff};
pub use iface::{watch, IfaceAddr, IfaceEvent, Interface, InterfaceTable, Kind, Watcher};
pub use pipe::{open_pipes, pipe_budget, PipeReplay, SplicePipe};
pub use sndbuf::{RecvBuffer, SendBuffer};

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Makes the next close of `stream` send a TCP reset instead of a FIN, so that
/// a reset seen on one side of the relay is carried as a reset to the other.
pub fn arm_reset(stream: &TcpStream) -> io::Result<()> {
    SockRef::from(stream).set_linger(Some(Duration::ZERO))
}

/// Options every relayed TCP connection gets: no Nagle delay (the
/// application's own writes decide the segments), and TCP keep-alive so that a
/// dead peer is noticed even on an idle connection.
pub fn tune_relay(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    sock.set_keepalive(true)?;
    Ok(())
}

/// Connections a listener's accept queue holds (the kernel caps it at
/// `net.core.somaxconn`).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Listens on `addr` with a deep accept queue. After a network change every
/// client agent reconnects at once, each with a control connection and a leg
/// per stream: the usual backlog of 128 overflows, the kernel drops the SYNs
/// beyond it, and each of those connections waits a second for its retry.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    listen_shared(addr, false)
}

/// [`listen`], and with `share_port` the port is shared (`SO_REUSEPORT`)
/// with the other processes of the same program that do the same: the
/// kernel spreads new connections over them.
pub fn listen_shared(addr: SocketAddr, share_port: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted daemon binds at once while its
    // old connections linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    if share_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Has the kernel send this process `SIGTERM` when its parent exits, and
/// fails if the parent is no longer `parent` (it exited before the request
/// was made): a gateway's worker must not outlive its supervisor.
pub fn die_with_parent(parent: u32) -> io::Result<()> {
    use nix::sys::signal::Signal;
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(io::Error::from)?;
    let now = nix::unistd::getppid().as_raw();
    if u32::try_from(now).ok() != Some(parent) {
        return Err(io::Error::other(format!(
            "the supervisor (pid {parent}) is gone"
        )));
    }
    Ok(())
}

/// Sends `SIGTERM` to process `pid`.
pub fn terminate(pid: u32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::other("no such pid"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(io::Error::from)
}

/// Closes `stream` with a reset.
pub fn reset(stream: TcpStream) {
    // Best effort: if the option cannot be set the close is a FIN, which is
    // still a close; the control connection carries the reset explicitly.
    let _ = arm_reset(&stream);
    drop(stream);
}

/// Raises this process's soft limit on open files to its hard limit, and
/// returns both as they now are. Every session, leg and relayed connection
/// is a descriptor: a gateway under the usual soft limit of 1,024 would
/// turn clients away at a few hundred streams while the system allows far
/// more. The hard limit is the administrator's; it is not touched.
pub fn raise_open_files_limit() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)
}

#[cfg(test)]
mod limit_tests {
    #[test]
    fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Lower the soft limit first so that the raise has something to do;
        // only by one, since other tests of this binary run meanwhile.
        setrlimit(Resource::RLIMIT_NOFILE, hard - 1, hard).unwrap();
        let (soft, after_hard) = super::raise_open_files_limit().unwrap();
        assert_eq!((soft, after_hard), (hard, hard));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// More connections than the default backlog of 128 complete their
    /// handshake while none is accepted yet: none waits on a dropped SYN.
    #[tokio::test]
    async fn a_listener_queues_more_than_the_default_backlog() {
        const CONNECTIONS: usize = 300;
        let listener = listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut clients = Vec::new();
        for i in 0..CONNECTIONS {
            // Bounded only so that a failure ends: with a short queue the
            // 130th connect would wait for SYN retries for minutes.
            let c = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(addr))
                .await
                .unwrap_or_else(|_| panic!("connection {i} not queued"))
                .expect("connect");
            clients.push(c);
        }
        for _ in 0..CONNECTIONS {
            let (accepted, peer) = listener.accept().await.expect("accept");
            assert!(clients.iter().any(|c| c.local_addr().ok() == Some(peer)));
            drop(accepted);
        }
    }
}
