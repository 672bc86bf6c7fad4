//! Passing connections and datagrams between the processes of one gateway.
//!
//! A process can hold no more descriptors than its `RLIMIT_NOFILE`, and only
//! `CAP_SYS_RESOURCE` raises the hard limit. A gateway that must hold more
//! connections than that runs as several worker processes sharing its
//! ports. The kernel spreads new connections and datagrams over them by
//! address, not by session; the worker that receives one its session does
//! not live in passes it on here: a TCP connection as its descriptor
//! (`SCM_RIGHTS`), untouched, so the owner reads it from its first byte; a
//! datagram as its bytes with the addresses it came from and to.
//!
//! Each worker binds a Unix datagram socket with an abstract name made of the
//! group's name and its index (no file to clean up, gone with the process)
//! and sends to the others over sockets connected to theirs: a connected
//! datagram socket is writable only while the receiver's queue has room, so
//! a busy worker slows the others' hand-offs instead of losing them.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram as StdUnixDatagram};
use std::sync::{Arc, Mutex};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Largest hand-off message: a datagram up to 64 KiB and two addresses.
pub const MAX_HANDOFF: usize = 65_536 + 64;

const CONN: u8 = b'C';
const DATAGRAM: u8 = b'D';

/// What another worker passed on.
#[derive(Debug)]
pub enum Handed {
    /// A TCP connection, nothing read from it yet.
    Conn(std::net::TcpStream),
    /// A datagram that came to `local` (the address the receiving socket is
    /// bound to) from `peer`.
    Datagram {
        /// The receiving socket's bound address.
        local: SocketAddr,
        /// Where the datagram came from.
        peer: SocketAddr,
        /// Its bytes.
        data: Vec<u8>,
    },
}

/// One worker's end of its group's hand-off sockets.
#[derive(Debug)]
pub struct Handoff {
    group: String,
    index: usize,
    count: usize,
    inbox: UnixDatagram,
    /// Sockets connected to the other workers' inboxes, made on first use
    /// (a worker may start after the one that first needs it).
    peers: Mutex<Vec<Option<Arc<UnixDatagram>>>>,
}

fn name(group: &str, index: usize) -> io::Result<UnixAddr> {
    UnixAddr::from_abstract_name(format!("baton-gateway-{group}-{index}"))
}

impl Handoff {
    /// Binds worker `index`'s inbox in group `group` of `count` workers.
    pub fn bind(group: &str, index: usize, count: usize) -> io::Result<Self> {
        if index >= count {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("worker {index} of {count}"),
            ));
        }
        let inbox = StdUnixDatagram::bind_addr(&name(group, index)?).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot bind the hand-off socket of worker {index} in group {group}: {e}"),
            )
        })?;
        inbox.set_nonblocking(true)?;
        Ok(Self {
            group: group.to_owned(),
            index,
            count,
            inbox: UnixDatagram::from_std(inbox)?,
            peers: Mutex::new(vec![None; count]),
        })
    }

    /// This worker's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Workers in the group.
    pub fn count(&self) -> usize {
        self.count
    }

    fn peer(&self, to: usize) -> io::Result<Arc<UnixDatagram>> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let slot = peers.get_mut(to).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("no worker {to}"))
        })?;
        if let Some(s) = slot {
            return Ok(s.clone());
        }
        let s = StdUnixDatagram::unbound()?;
        s.connect_addr(&name(&self.group, to)?)?;
        s.set_nonblocking(true)?;
        let s = Arc::new(UnixDatagram::from_std(s)?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Forgets the socket to `to` after a failed send, so that the next one
    /// connects again (the worker may have been restarted).
    fn forget(&self, to: usize) {
        if let Some(slot) = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(to)
        {
            *slot = None;
        }
    }

    /// Passes a TCP connection to worker `to`, waiting while its inbox is
    /// full. The caller closes its own descriptor afterwards.
    pub async fn send_conn(&self, to: usize, conn: &impl AsFd) -> io::Result<()> {
        // A socket connected to worker `to` before it was restarted is
        // refused once its old inbox is gone; one connected now reaches the
        // new inbox. So a refused send is tried once more, afresh.
        let mut fresh = false;
        loop {
            let sock = self.peer(to)?;
            let r = sock
                .async_io(Interest::WRITABLE, || {
                    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                    let mut control = SendAncillaryBuffer::new(&mut space);
                    let fds = [conn.as_fd()];
                    control.push(SendAncillaryMessage::ScmRights(&fds));
                    rustix::net::sendmsg(
                        &*sock,
                        &[IoSlice::new(&[CONN])],
                        &mut control,
                        SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
                    )
                    .map_err(io::Error::from)
                })
                .await;
            match r {
                Ok(_) => return Ok(()),
                Err(e) => {
                    self.forget(to);
                    let stale = matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::NotConnected
                            | io::ErrorKind::ConnectionReset
                    );
                    if fresh || !stale {
                        return Err(e);
                    }
                    fresh = true;
                }
            }
        }
    }

    /// Passes a datagram to worker `to` if its inbox has room now; a
    /// datagram that cannot go at once is dropped (`WouldBlock`), as a full
    /// socket buffer would drop it.
    pub fn try_send_datagram(
        &self,
        to: usize,
        local: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
    ) -> io::Result<()> {
        let sock = self.peer(to)?;
        let mut head = Vec::with_capacity(40);
        head.push(DATAGRAM);
        put_addr(&mut head, local);
        put_addr(&mut head, peer);
        // Straight to the socket, not through tokio's readiness: the socket
        // is non-blocking, and a datagram that would wait is dropped anyway.
        let r = rustix::net::sendmsg(
            &*sock,
            &[IoSlice::new(&head), IoSlice::new(data)],
            &mut SendAncillaryBuffer::default(),
            SendFlags::DONTWAIT | SendFlags::NOSIGNAL,
        )
        .map_err(io::Error::from);
        if matches!(&r, Err(e) if e.kind() != io::ErrorKind::WouldBlock) {
            self.forget(to);
        }
        r.map(drop)
    }

    /// The next connection or datagram passed to this worker. `buf` must be
    /// at least [`MAX_HANDOFF`] bytes. Malformed messages are skipped.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Handed> {
        loop {
            let (n, fd) = self
                .inbox
                .async_io(Interest::READABLE, || {
                    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
                    let mut control = RecvAncillaryBuffer::new(&mut space);
                    let msg = rustix::net::recvmsg(
                        &self.inbox,
                        &mut [IoSliceMut::new(buf)],
                        &mut control,
                        RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    // Every descriptor received is owned here: extra ones
                    // close when dropped.
                    let mut first: Option<OwnedFd> = None;
                    for m in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(fds) = m {
                            for fd in fds {
                                if first.is_none() {
                                    first = Some(fd);
                                }
                            }
                        }
                    }
                    Ok((msg.bytes, first))
                })
                .await?;
            let msg = &buf[..n.min(buf.len())];
            match (msg.first(), fd) {
                (Some(&CONN), Some(fd)) if n == 1 => {
                    return Ok(Handed::Conn(std::net::TcpStream::from(fd)))
                }
                (Some(&DATAGRAM), None) => {
                    let mut rest = &msg[1..];
                    let (Some(local), Some(peer)) = (get_addr(&mut rest), get_addr(&mut rest))
                    else {
                        continue;
                    };
                    return Ok(Handed::Datagram {
                        local,
                        peer,
                        data: rest.to_vec(),
                    });
                }
                _ => continue,
            }
        }
    }
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &mut &[u8]) -> Option<SocketAddr> {
    let (&family, rest) = b.split_first()?;
    let (ip, rest) = match family {
        4 => {
            let (ip, rest) = rest.split_first_chunk::<4>()?;
            (IpAddr::V4(Ipv4Addr::from(*ip)), rest)
        }
        6 => {
            let (ip, rest) = rest.split_first_chunk::<16>()?;
            (IpAddr::V6(Ipv6Addr::from(*ip)), rest)
        }
        _ => return None,
    };
    let (port, rest) = rest.split_first_chunk::<2>()?;
    *b = rest;
    Some(SocketAddr::new(ip, u16::from_be_bytes(*port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn group() -> String {
        format!(
            "test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )
    }

    /// The next thing `h` receives, which must be a connection.
    async fn received_conn(h: &Handoff) -> tokio::net::TcpStream {
        let mut buf = vec![0u8; MAX_HANDOFF];
        let Handed::Conn(conn) = h.recv(&mut buf).await.expect("recv") else {
            panic!("expected a connection");
        };
        conn.set_nonblocking(true).expect("nonblocking");
        tokio::net::TcpStream::from_std(conn).expect("tokio")
    }

    #[tokio::test]
    async fn a_connection_passed_on_is_read_from_its_first_byte() {
        let g = group();
        let a = Handoff::bind(&g, 0, 2).expect("bind 0");
        let b = Handoff::bind(&g, 1, 2).expect("bind 1");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let mut client = tokio::net::TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (accepted, _) = l.accept().await.expect("accept");
        client.write_all(b"hello").await.expect("write");
        a.send_conn(1, &accepted).await.expect("send");
        drop(accepted);
        let mut conn = received_conn(&b).await;
        let mut got = [0u8; 5];
        conn.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"hello");
        conn.write_all(b"back").await.expect("write back");
        let mut got = [0u8; 4];
        client.read_exact(&mut got).await.expect("read back");
        assert_eq!(&got, b"back");
    }

    #[tokio::test]
    async fn a_datagram_keeps_its_addresses_and_bytes() {
        let g = group();
        let a = Handoff::bind(&g, 0, 2).expect("bind 0");
        let b = Handoff::bind(&g, 1, 2).expect("bind 1");
        let local: SocketAddr = "[::1]:7700".parse().expect("addr");
        let peer: SocketAddr = "127.0.0.9:40000".parse().expect("addr");
        a.try_send_datagram(1, local, peer, b"payload")
            .expect("send");
        let mut buf = vec![0u8; MAX_HANDOFF];
        match b.recv(&mut buf).await.expect("recv") {
            Handed::Datagram {
                local: l,
                peer: p,
                data,
            } => {
                assert_eq!((l, p), (local, peer));
                assert_eq!(data, b"payload");
            }
            Handed::Conn(_) => panic!("expected a datagram"),
        }
    }

    #[tokio::test]
    async fn a_worker_outside_the_group_or_bound_twice_is_an_error() {
        let g = group();
        assert!(Handoff::bind(&g, 2, 2).is_err());
        let _a = Handoff::bind(&g, 0, 2).expect("bind");
        let e = Handoff::bind(&g, 0, 2).expect_err("second bind");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }

    /// A worker restarted after this one last passed it a connection gets
    /// the next one: the socket to its old inbox is replaced, not reused.
    #[tokio::test]
    async fn a_connection_reaches_a_worker_started_again() {
        let g = group();
        let a = Handoff::bind(&g, 0, 2).expect("bind 0");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = l.local_addr().expect("addr");
        for round in 0..3u8 {
            // Bound anew each round, as a restarted worker binds its inbox.
            let b = Handoff::bind(&g, 1, 2).expect("bind 1");
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (accepted, _) = l.accept().await.expect("accept");
            client.write_all(&[round]).await.expect("write");
            a.send_conn(1, &accepted)
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            drop(accepted);
            let mut conn = received_conn(&b).await;
            let mut got = [0u8; 1];
            conn.read_exact(&mut got).await.expect("read");
            assert_eq!(got, [round]);
            drop(b);
        }
    }

    #[tokio::test]
    async fn sending_to_a_worker_not_started_fails() {
        let g = group();
        let a = Handoff::bind(&g, 0, 3).expect("bind");
        assert!(a
            .try_send_datagram(
                2,
                "127.0.0.1:1".parse().expect("a"),
                "127.0.0.1:2".parse().expect("a"),
                b"x"
            )
            .is_err());
    }
}
