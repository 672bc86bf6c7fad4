//! A minimal NFQUEUE client over a raw netfilter netlink socket.
//!
//! Only what the delayer needs: bind one queue in metadata-only copy mode with GSO packets
//! passed whole, receive packet ids, and give batch verdicts ("every packet up to id N").
//! Messages are built and parsed here with plain byte slices, so there is no `unsafe` and no C
//! library; the kernel ABI is in `include/uapi/linux/netfilter/nfnetlink_queue.h`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{ppoll, PollFd, PollFlags};
use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeSpec;

const NLMSG_HDRLEN: usize = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_CONFIG: u16 = 2;
const NFQNL_MSG_VERDICT_BATCH: u16 = 3;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;

const NFQNL_CFG_CMD_BIND: u8 = 1;
const NFQNL_COPY_META: u8 = 1;
/// Drop packets when the queue is full instead of letting them pass undelayed.
const NFQA_CFG_F_FAIL_OPEN: u32 = 0x1;
/// Queue GSO packets whole: one message per 64 KiB super-packet instead of one per segment.
const NFQA_CFG_F_GSO: u32 = 0x4;

const NF_ACCEPT: u32 = 1;
/// Attribute type bits that are flags, not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// What one netlink message from the queue socket said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A packet waits for its verdict.
    Packet { id: u32 },
    /// The kernel acknowledged a request (`errno` 0) or refused it (`errno` > 0).
    Ack { seq: u32, errno: i32 },
    /// Kernel dropped messages because the socket buffer was full.
    Overrun,
}

/// One bound NFQUEUE queue.
pub(crate) struct NfQueue {
    fd: OwnedFd,
    queue: u16,
    seq: u32,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl NfQueue {
    /// Opens a netfilter socket in the calling thread's network namespace and binds `queue`.
    ///
    /// `max_len` is the kernel's queue length (packets held at once); `rcvbuf` the socket
    /// receive buffer, forced past `rmem_max` (needs CAP_NET_ADMIN).
    pub(crate) fn bind(queue: u16, max_len: u32, rcvbuf: usize) -> io::Result<NfQueue> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        setsockopt(&fd, sockopt::RcvBufForce, &rcvbuf)?;
        let mut q = NfQueue {
            fd,
            queue,
            seq: 0,
            buf: vec![0; 64 * 1024],
            out: Vec::with_capacity(256),
        };
        let mut cmd = [0u8; 4];
        cmd[0] = NFQNL_CFG_CMD_BIND;
        q.request(&[(NFQA_CFG_CMD, &cmd)])?;
        let mut params = [0u8; 5];
        // copy_range 0 with COPY_META: the delayer needs the packet id only.
        params[4] = NFQNL_COPY_META;
        let flags = NFQA_CFG_F_GSO;
        let mask = NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN;
        q.request(&[
            (NFQA_CFG_PARAMS, &params),
            (NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes()),
            (NFQA_CFG_FLAGS, &flags.to_be_bytes()),
            (NFQA_CFG_MASK, &mask.to_be_bytes()),
        ])?;
        Ok(q)
    }

    /// Sends a config request and waits (at most 2 s) for the kernel's acknowledgement.
    fn request(&mut self, attrs: &[(u16, &[u8])]) -> io::Result<()> {
        self.seq += 1;
        let seq = self.seq;
        encode(
            &mut self.out,
            NFQNL_MSG_CONFIG,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            self.queue,
            attrs,
        );
        send(self.fd.as_raw_fd(), &self.out, MsgFlags::empty())?;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no answer from nfnetlink_queue",
                ));
            }
            if !self.wait(left)? {
                continue;
            }
            let mut result = None;
            self.recv_events(|ev| {
                if let Event::Ack { seq: s, errno } = ev {
                    if s == seq {
                        result = Some(errno);
                    }
                }
            })?;
            match result {
                Some(0) => return Ok(()),
                Some(errno) => return Err(io::Error::from_raw_os_error(errno)),
                None => {}
            }
        }
    }

    /// Waits until the socket is readable or `timeout` passed; true when readable.
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match ppoll(&mut fds, Some(TimeSpec::from_duration(timeout)), None) {
            Ok(n) => Ok(n > 0),
            Err(Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads one datagram without blocking and reports its messages to `f`.
    ///
    /// Returns false when nothing was waiting. A socket overrun (`ENOBUFS`) is reported as
    /// [`Event::Overrun`]: the kernel dropped the packets it could not deliver.
    pub(crate) fn recv_events(&mut self, mut f: impl FnMut(Event)) -> io::Result<bool> {
        match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => {
                parse(&self.buf[..n], &mut f).map_err(|e| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("nfqueue message: {e}"))
                })?;
                Ok(true)
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => Ok(false),
            Err(Errno::ENOBUFS) => {
                f(Event::Overrun);
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Accepts every queued packet whose id is at most `id` (the kernel's batch verdict).
    pub(crate) fn accept_through(&mut self, id: u32) -> io::Result<()> {
        let mut hdr = [0u8; 8];
        hdr[..4].copy_from_slice(&NF_ACCEPT.to_be_bytes());
        hdr[4..].copy_from_slice(&id.to_be_bytes());
        self.seq += 1;
        encode(
            &mut self.out,
            NFQNL_MSG_VERDICT_BATCH,
            NLM_F_REQUEST,
            self.seq,
            self.queue,
            &[(NFQA_VERDICT_HDR, &hdr)],
        );
        send(self.fd.as_raw_fd(), &self.out, MsgFlags::empty())?;
        Ok(())
    }
}

/// Builds one nfnetlink queue message (netlink header, nfgenmsg, attributes) into `out`.
fn encode(out: &mut Vec<u8>, msg: u16, flags: u16, seq: u32, queue: u16, attrs: &[(u16, &[u8])]) {
    out.clear();
    out.extend_from_slice(&[0; NLMSG_HDRLEN]);
    // nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, resource id = queue (big endian).
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&queue.to_be_bytes());
    for (ty, payload) in attrs {
        let len = 4 + payload.len();
        out.extend_from_slice(&(len as u16).to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(align4(out.len()), 0);
    }
    let total = out.len() as u32;
    out[0..4].copy_from_slice(&total.to_ne_bytes());
    out[4..6].copy_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | msg).to_ne_bytes());
    out[6..8].copy_from_slice(&flags.to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses a datagram of netlink messages; never panics on bad input.
pub(crate) fn parse(mut buf: &[u8], f: &mut impl FnMut(Event)) -> Result<(), &'static str> {
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32_at(buf, 0).ok_or("short header")? as usize;
        let ty = u16_at(buf, 4).ok_or("short header")?;
        let seq = u32_at(buf, 8).ok_or("short header")?;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err("bad message length");
        }
        let body = &buf[NLMSG_HDRLEN..len];
        match ty {
            NLMSG_NOOP | NLMSG_DONE => {}
            NLMSG_OVERRUN => f(Event::Overrun),
            NLMSG_ERROR => {
                let err = u32_at(body, 0).ok_or("short error message")? as i32;
                f(Event::Ack {
                    seq,
                    errno: err.saturating_abs(),
                })
            }
            t if t == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET => {
                f(Event::Packet {
                    id: packet_id(body).ok_or("packet without header")?,
                });
            }
            _ => {}
        }
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(())
}

/// Finds `NFQA_PACKET_HDR` after the 4-byte nfgenmsg and returns its (big-endian) packet id.
fn packet_id(body: &[u8]) -> Option<u32> {
    let mut attrs = body.get(4..)?;
    while attrs.len() >= 4 {
        let len = u16_at(attrs, 0)? as usize;
        let ty = u16_at(attrs, 2)? & NLA_TYPE_MASK;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == NFQA_PACKET_HDR {
            return Some(u32::from_be_bytes(attrs.get(4..8)?.try_into().ok()?));
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet_msg(id: u32) -> Vec<u8> {
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[0x08, 0x00, 1]); // hw_protocol, hook
        let mut out = Vec::new();
        encode(
            &mut out,
            NFQNL_MSG_PACKET,
            0,
            0,
            1,
            &[(NFQA_CFG_MASK, &[1, 2, 3, 4]), (NFQA_PACKET_HDR, &hdr)],
        );
        out
    }

    #[test]
    fn encode_aligns_attributes_and_sets_length() {
        let mut out = Vec::new();
        encode(
            &mut out,
            NFQNL_MSG_CONFIG,
            NLM_F_REQUEST,
            7,
            3,
            &[(NFQA_CFG_PARAMS, &[0; 5])],
        );
        assert_eq!(out.len(), 16 + 4 + 12);
        assert_eq!(u32_at(&out, 0), Some(32));
        assert_eq!(u16_at(&out, 4), Some(0x302));
        assert_eq!(&out[18..20], &[0, 3]);
        assert_eq!(u16_at(&out, 20), Some(9));
    }

    #[test]
    fn parses_packets_in_one_datagram() {
        let mut buf = packet_msg(41);
        buf.extend(packet_msg(42));
        let mut got = Vec::new();
        parse(&buf, &mut |e| got.push(e)).unwrap();
        assert_eq!(
            got,
            vec![Event::Packet { id: 41 }, Event::Packet { id: 42 }]
        );
    }

    #[test]
    fn parses_errors_as_acks() {
        let mut buf = vec![0u8; 36];
        buf[0..4].copy_from_slice(&36u32.to_ne_bytes());
        buf[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        buf[8..12].copy_from_slice(&5u32.to_ne_bytes());
        buf[16..20].copy_from_slice(&(-16i32).to_ne_bytes());
        let mut got = Vec::new();
        parse(&buf, &mut |e| got.push(e)).unwrap();
        assert_eq!(got, vec![Event::Ack { seq: 5, errno: 16 }]);
    }

    #[test]
    fn rejects_truncated_input_without_panicking() {
        let buf = packet_msg(9);
        for cut in 0..buf.len() {
            let _ = parse(&buf[..cut], &mut |_| {});
        }
        let mut bad = buf.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse(&bad, &mut |_| {}).is_err());
    }
}
