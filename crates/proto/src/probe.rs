//! Path probes: small authenticated UDP datagrams that the client agent
//! sends to the gateway over each interface to measure round trip, loss and
//! jitter without disturbing the current path. The gateway answers each
//! valid probe with a reply of the same size (no amplification), tagged with
//! the session's leg key so that only the gateway can have sent it.
//!
//! ```text
//! magic "BTNP" | version | kind (1 probe, 2 reply) | session id (8) | seq (8) | sent µs (8) | tag (32)
//! ```

use ring::hmac;

use crate::crypto::LegKey;

/// Length of every probe and reply.
pub const PROBE_LEN: usize = 4 + 1 + 1 + 8 + 8 + 8 + 32;
const BODY: usize = PROBE_LEN - 32;
const MAGIC: &[u8; 4] = b"BTNP";

/// A probe or its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// True for the gateway's reply.
    pub reply: bool,
    /// The session the probe belongs to.
    pub session_id: u64,
    /// Sequence number, chosen by the client.
    pub seq: u64,
    /// The client's send time in microseconds on its own clock, echoed back.
    pub sent_us: u64,
}

impl Probe {
    /// The session id of a datagram that looks like a probe, to find its key.
    pub fn peek_session(bytes: &[u8]) -> Option<u64> {
        if bytes.len() != PROBE_LEN || &bytes[..4] != MAGIC || bytes[4] != 1 {
            return None;
        }
        Some(u64::from_be_bytes(bytes[6..14].try_into().ok()?))
    }

    /// Encodes and tags the datagram.
    pub fn seal(&self, key: &LegKey) -> [u8; PROBE_LEN] {
        let mut out = [0u8; PROBE_LEN];
        out[..4].copy_from_slice(MAGIC);
        out[4] = 1;
        out[5] = if self.reply { 2 } else { 1 };
        out[6..14].copy_from_slice(&self.session_id.to_be_bytes());
        out[14..22].copy_from_slice(&self.seq.to_be_bytes());
        out[22..30].copy_from_slice(&self.sent_us.to_be_bytes());
        let tag = hmac::sign(key.probe_key(), &out[..BODY]);
        out[BODY..].copy_from_slice(tag.as_ref());
        out
    }

    /// Checks and decodes a datagram; `None` for anything not a valid probe
    /// or reply under `key`.
    pub fn open(bytes: &[u8], key: &LegKey) -> Option<Self> {
        let session_id = Self::peek_session(bytes)?;
        hmac::verify(key.probe_key(), &bytes[..BODY], &bytes[BODY..]).ok()?;
        let reply = match bytes[5] {
            1 => false,
            2 => true,
            _ => return None,
        };
        Some(Self {
            reply,
            session_id,
            seq: u64::from_be_bytes(bytes[14..22].try_into().ok()?),
            sent_us: u64::from_be_bytes(bytes[22..30].try_into().ok()?),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::crypto::tests_support::keys_pair;

    #[test]
    fn probe_roundtrip_and_forgery() {
        let (a, b) = keys_pair();
        let p = Probe {
            reply: false,
            session_id: 7,
            seq: 9,
            sent_us: 123,
        };
        let bytes = p.seal(&a.leg_key());
        assert_eq!(Probe::peek_session(&bytes), Some(7));
        assert_eq!(Probe::open(&bytes, &b.leg_key()), Some(p));
        let mut bad = bytes;
        bad[20] ^= 1;
        assert_eq!(Probe::open(&bad, &b.leg_key()), None);
        assert_eq!(Probe::open(&bytes[..PROBE_LEN - 1], &b.leg_key()), None);
        let (other, _) = keys_pair();
        assert_eq!(Probe::open(&bytes, &other.leg_key()), None);
        let r = Probe { reply: true, ..p };
        assert_eq!(Probe::open(&r.seal(&b.leg_key()), &a.leg_key()), Some(r));
    }
}
