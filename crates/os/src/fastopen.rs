//! TCP Fast Open (RFC 7413): a connection's first bytes ride in its SYN.
//!
//! A new leg's preamble is its first bytes, and the gateway can answer only
//! once the preamble is in: without Fast Open that is one and a half round
//! trips of the new path after the agent starts, with it half of one. The
//! agent needs a cookie from the gateway for its source address first: a
//! connection opened with [`crate::connect_via_with`] asks for one
//! when the kernel holds none, and the agent opens one on every path it
//! probes, so that the first leg after a failure already has it.
//!
//! Data in a SYN can arrive twice (a duplicated SYN opens a second
//! connection). A leg's preamble is safe to repeat: it names its stream's
//! generation, and the gateway refuses any generation it has already seen.

use std::io;
use std::os::fd::AsFd;

/// `net.ipv4.tcp_fastopen`'s bit for accepting data in SYNs.
const SERVER_ENABLE: u32 = 2;

/// Lets `listener` take data in the SYN of clients holding a cookie, with at
/// most `queue` such connections not yet accepted. Takes effect only where
/// the network namespace's `net.ipv4.tcp_fastopen` has its server bit (2);
/// see [`server_enabled`].
pub fn accept_fast_open(listener: &impl AsFd, queue: u32) -> io::Result<()> {
    set_tcp_int(listener, libc::TCP_FASTOPEN, queue as libc::c_int)
}

/// Whether this network namespace accepts data in SYNs (the server bit of
/// `net.ipv4.tcp_fastopen`); `None` if the setting cannot be read.
pub fn server_enabled() -> Option<bool> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fastopen").ok()?;
    let value: u32 = text.trim().parse().ok()?;
    Some(value & SERVER_ENABLE != 0)
}

// Unsafe because neither the standard library nor socket2 or nix wraps the
// listener's `TCP_FASTOPEN`: an integer option, set on a borrowed socket.
#[allow(unsafe_code)]
fn set_tcp_int(sock: &impl AsFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the value is a plain integer that lives across the call, its
    // size is passed with it, and the descriptor is borrowed for the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            std::ptr::addr_of!(value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_takes_the_option() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        accept_fast_open(&l, 64).expect("TCP_FASTOPEN on a listener");
        let e = set_tcp_int(&l, -1, 1).expect_err("no such option");
        assert_eq!(e.raw_os_error(), Some(libc::ENOPROTOOPT));
    }

    #[test]
    fn the_namespace_setting_is_read() {
        // Linux has had the setting since 3.7; its server bit varies.
        assert!(server_enabled().is_some());
    }
}
