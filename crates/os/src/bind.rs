//! Connections that leave through a chosen interface.
//!
//! On Linux the egress interface is decided by the route lookup, and a
//! source address alone does not change it (without source-based policy
//! rules the packets still follow the main table, whatever their source).
//! What pins a socket to an interface is `SO_BINDTODEVICE`: the route lookup
//! is then restricted to routes through that device. A leg therefore gets
//! the device binding, and a source address of that interface when the
//! caller wants a particular one of several.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use nix::sys::socket::setsockopt;
use nix::sys::socket::sockopt::{IpBindAddressNoPort, TcpFastOpenConnect};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Opens a TCP connection to `dest`, out of interface `device` if given,
/// from address `source` if given, failing with `TimedOut` after `timeout`.
///
/// - `device` sets `SO_BINDTODEVICE`, which needs `CAP_NET_RAW`; without it
///   the error is `PermissionDenied` and says so. An unknown device is
///   `NotFound`.
/// - `source` binds the local address with `IP_BIND_ADDRESS_NO_PORT`, so that
///   the port is chosen at connect time from the full 4-tuple: binding
///   first would reserve a port per address and exhaust the ephemeral range
///   far sooner when many legs are open. It must be of `dest`'s family
///   (`InvalidInput` otherwise) and, on its own, does not choose the egress
///   interface.
pub async fn connect_via(
    dest: SocketAddr,
    device: Option<&str>,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    connect_via_with(dest, device, source, timeout, false).await
}

/// [`connect_via`], with TCP Fast Open (`TCP_FASTOPEN_CONNECT`) if
/// `fast_open`: where the kernel holds a cookie from `dest` for this source
/// address, the connection is returned at once, and its first write leaves
/// in the SYN; a failure to reach `dest` then shows on the first read or
/// write, not here. Without a cookie this connects as usual and asks for
/// one; where the host does not let clients use Fast Open, it connects as
/// usual.
pub async fn connect_via_with(
    dest: SocketAddr,
    device: Option<&str>,
    source: Option<IpAddr>,
    timeout: Duration,
    fast_open: bool,
) -> io::Result<TcpStream> {
    let socket = prepare(dest, device, source)?;
    // Where the host turned Fast Open off for clients (`net.ipv4.tcp_fastopen`
    // without bit 1) the option is refused: connect as usual then.
    if fast_open {
        let _ = setsockopt(&socket, TcpFastOpenConnect, &true);
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(dest)).await {
        Ok(result) => {
            result.map_err(|e| context(e, format!("connect to {dest}{}", via(device, source))))
        }
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "connect to {dest}{} timed out after {timeout:?}",
                via(device, source)
            ),
        )),
    }
}

/// The socket, with every option set and bound, ready for a non-blocking
/// connect. Split out so that the options can be checked without a peer.
fn prepare(dest: SocketAddr, device: Option<&str>, source: Option<IpAddr>) -> io::Result<Socket> {
    if let Some(src) = source {
        if src.is_ipv4() != dest.is_ipv4() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("source address {src} is not of the same family as destination {dest}"),
            ));
        }
    }
    let socket = Socket::new(Domain::for_address(dest), Type::STREAM, Some(Protocol::TCP))?;
    // tokio requires a non-blocking socket; socket2 already sets close-on-exec.
    socket.set_nonblocking(true)?;
    if let Some(dev) = device {
        socket
            .bind_device(Some(dev.as_bytes()))
            .map_err(|e| bind_device_error(e, dev))?;
    }
    if let Some(src) = source {
        setsockopt(&socket, IpBindAddressNoPort, &true)
            .map_err(|e| context(io::Error::from(e), "set IP_BIND_ADDRESS_NO_PORT".into()))?;
        socket
            .bind(&SocketAddr::new(src, 0).into())
            .map_err(|e| context(e, format!("bind source address {src}")))?;
    }
    Ok(socket)
}

/// Explains the two likely failures of `SO_BINDTODEVICE`, keeping the kind
/// so that callers can still match on it.
fn bind_device_error(e: io::Error, dev: &str) -> io::Error {
    match e.raw_os_error() {
        Some(code) if code == libc::EPERM => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "binding a socket to interface {dev} (SO_BINDTODEVICE) needs CAP_NET_RAW: \
                 run as root or grant the capability (setcap cap_net_raw+ep)"
            ),
        ),
        Some(code) if code == libc::ENODEV => io::Error::new(
            io::ErrorKind::NotFound,
            format!("no network interface named {dev}"),
        ),
        _ => context(e, format!("bind to interface {dev}")),
    }
}

fn context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn via(device: Option<&str>, source: Option<IpAddr>) -> String {
    match (device, source) {
        (Some(d), Some(s)) => format!(" via {d} from {s}"),
        (Some(d), None) => format!(" via {d}"),
        (None, Some(s)) => format!(" from {s}"),
        (None, None) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::net::TcpListener;

    #[test]
    fn permission_error_names_the_capability() {
        let e = bind_device_error(io::Error::from_raw_os_error(libc::EPERM), "wlan0");
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("CAP_NET_RAW"), "{e}");
        assert!(e.to_string().contains("wlan0"), "{e}");
        let e = bind_device_error(io::Error::from_raw_os_error(libc::ENODEV), "nope0");
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn source_of_other_family_is_refused() {
        let dest: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let e = prepare(dest, None, Some("::1".parse().expect("ip"))).expect_err("mixed families");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn source_binding_defers_the_port() {
        let dest: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let s = prepare(dest, None, Some("127.0.0.3".parse().expect("ip"))).expect("prepared");
        let local = s.local_addr().expect("bound").as_socket().expect("inet");
        // IP_BIND_ADDRESS_NO_PORT: address bound, port left for connect.
        assert_eq!(local, "127.0.0.3:0".parse::<SocketAddr>().expect("addr"));
    }

    #[tokio::test]
    async fn connects_on_loopback_with_source_and_device() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("listen");
        let dest = listener.local_addr().expect("addr");
        let src: IpAddr = "127.0.0.7".parse().expect("ip");
        // Binding to "lo" needs CAP_NET_RAW; the test suite runs as root.
        let stream = connect_via(dest, Some("lo"), Some(src), Duration::from_secs(5))
            .await
            .expect("connect");
        let (_accepted, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer, stream.local_addr().expect("local"));
        assert_eq!(peer.ip(), src);
        assert_eq!(
            Socket::from(stream.into_std().expect("std"))
                .device()
                .expect("device"),
            Some(b"lo".to_vec())
        );
    }

    #[tokio::test]
    async fn unknown_device_is_not_found() {
        let dest: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let e = connect_via(dest, Some("baton-nodev"), None, Duration::from_secs(1))
            .await
            .expect_err("no such device");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }
}
