//! Credentials, the session handshake and keyed frames.
//!
//! A client agent holds an Ed25519 key pair (`baton keygen`); the gateway is
//! configured with its public key only, so a leaked gateway configuration
//! does not let anyone impersonate a client. The handshake is
//!
//! ```text
//! C → G  preface, Hello { client_id, client ephemeral X25519 }
//! G → C  Challenge { session_id, gateway ephemeral X25519 }   (or Refused)
//! C → G  Auth { Ed25519 signature over the transcript hash }
//! G → C  Accepted { .. } keyed                                  (or Refused)
//! ```
//!
//! Session keys come from HKDF-SHA256 over the X25519 shared secret, salted
//! with the transcript hash, so each session (and each control connection)
//! has fresh keys and a captured handshake cannot be replayed into a session.
//! Control frames carry an HMAC-SHA256 tag (32 bytes) over a
//! per-direction sequence number and the frame; leg preambles are tagged with
//! a separate leg key. Only standard primitives from `ring` are used.

use std::fmt;

use base64::Engine as _;
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::digest::{self, SHA256};
use ring::hkdf;
use ring::hmac;
use ring::rand::SecureRandom;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};

use crate::wire::{ConnKind, FrameHeader, Message, Preface, WireError, FRAME_HEADER_LEN, TAG_LEN};

const AUTH_LABEL: &[u8] = b"baton/1 client auth";
const KEY_TEXT_PREFIX: &str = "baton-secret-key:";

/// Errors from credentials and the handshake.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A key file or key string could not be read as a baton key.
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    /// The system random number generator failed; nothing safe can be done.
    #[error("system random number generator failed")]
    Random,
    /// The peer's handshake message was not the one expected at this step.
    #[error("unexpected handshake message (type {0:#04x})")]
    Unexpected(u8),
    /// The client's signature did not verify against its configured key.
    #[error("bad proof of key")]
    BadProof,
    /// The peer's ephemeral key was unusable.
    #[error("bad ephemeral key")]
    BadEphemeral,
    /// A frame failed to decode or authenticate.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// A client agent's secret key. `Debug` never prints it.
pub struct ClientKey {
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("public", &self.public())
            .field("seed", &"MASKED")
            .finish()
    }
}

impl Clone for ClientKey {
    fn clone(&self) -> Self {
        Self::from_seed(self.seed)
    }
}

impl ClientKey {
    /// A new random key.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, CryptoError> {
        let mut seed = [0u8; 32];
        rng.fill(&mut seed).map_err(|_| CryptoError::Random)?;
        Ok(Self::from_seed(seed))
    }

    fn from_seed(seed: [u8; 32]) -> Self {
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .expect("any 32-byte seed is a valid Ed25519 private key");
        Self { seed, pair }
    }

    /// Parses the text written by [`ClientKey::to_text`] (surrounding
    /// whitespace allowed, as in a key file).
    pub fn from_text(text: &str) -> Result<Self, CryptoError> {
        let body = text
            .trim()
            .strip_prefix(KEY_TEXT_PREFIX)
            .ok_or(CryptoError::MalformedKey(
                "expected a key starting with `baton-secret-key:`",
            ))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|_| CryptoError::MalformedKey("not base64"))?;
        let seed: [u8; 32] = bytes
            .try_into()
            .map_err(|_| CryptoError::MalformedKey("wrong length (want 32 bytes)"))?;
        Ok(Self::from_seed(seed))
    }

    /// The key as text for a key file.
    pub fn to_text(&self) -> String {
        format!(
            "{KEY_TEXT_PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(self.seed)
        )
    }

    /// The public key, for the gateway's configuration.
    pub fn public(&self) -> PublicKey {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(pk)
    }

    fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

/// A client agent's public key, as configured on the gateway.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = CryptoError;
    fn from_str(s: &str) -> Result<Self, CryptoError> {
        if s.trim().starts_with(KEY_TEXT_PREFIX) {
            return Err(CryptoError::MalformedKey(
                "this is a secret key; the gateway needs the public key printed by `baton keygen`",
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| CryptoError::MalformedKey("not base64"))?;
        let pk: [u8; 32] = bytes
            .try_into()
            .map_err(|_| CryptoError::MalformedKey("wrong length (want 32 bytes)"))?;
        Ok(Self(pk))
    }
}

impl PublicKey {
    fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, self.0)
            .verify(msg, sig)
            .is_ok()
    }
}

/// The keys of one control connection and of the session's legs.
#[derive(Clone)]
pub struct SessionKeys {
    c2g: hmac::Key,
    g2c: hmac::Key,
    leg: LegKey,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKeys(MASKED)")
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl SessionKeys {
    fn derive(shared: &[u8], transcript: &[u8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, transcript).extract(shared);
        let expand = |label: &[u8]| {
            let mut out = [0u8; 32];
            prk.expand(&[label], Len(32))
                .and_then(|okm| okm.fill(&mut out))
                .expect("32 bytes is within HKDF-SHA256's output limit");
            out
        };
        Self {
            c2g: hmac::Key::new(hmac::HMAC_SHA256, &expand(b"baton/1 control c2g")),
            g2c: hmac::Key::new(hmac::HMAC_SHA256, &expand(b"baton/1 control g2c")),
            leg: LegKey(
                hmac::Key::new(hmac::HMAC_SHA256, &expand(b"baton/1 leg")),
                hmac::Key::new(hmac::HMAC_SHA256, &expand(b"baton/1 probe")),
                hmac::Key::new(hmac::HMAC_SHA256, &expand(b"baton/1 datagram")),
            ),
        }
    }

    /// The key that authenticates this session's leg preambles.
    pub fn leg_key(&self) -> LegKey {
        self.leg.clone()
    }
}

/// Which end of a session this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The client agent.
    Client,
    /// The gateway.
    Gateway,
}

/// Seals and opens the keyed frames of one control connection. Each
/// direction counts its frames; the count is part of the tag, so a frame
/// that is dropped, replayed or reordered fails to open.
pub struct ControlCipher {
    send: hmac::Key,
    recv: hmac::Key,
    send_seq: u64,
    recv_seq: u64,
}

impl fmt::Debug for ControlCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlCipher")
            .field("send_seq", &self.send_seq)
            .field("recv_seq", &self.recv_seq)
            .finish()
    }
}

fn tag(key: &hmac::Key, seq: u64, frame: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&seq.to_be_bytes());
    ctx.update(frame);
    ctx.sign()
}

fn verify_tag(key: &hmac::Key, seq: u64, frame: &[u8], got: &[u8]) -> bool {
    // `hmac::verify` compares in constant time; it wants one input slice.
    let mut data = Vec::with_capacity(8 + frame.len());
    data.extend_from_slice(&seq.to_be_bytes());
    data.extend_from_slice(frame);
    hmac::verify(key, &data, got).is_ok()
}

impl ControlCipher {
    /// The cipher for `role`'s end of a session.
    pub fn new(keys: &SessionKeys, role: Role) -> Self {
        let (send, recv) = match role {
            Role::Client => (keys.c2g.clone(), keys.g2c.clone()),
            Role::Gateway => (keys.g2c.clone(), keys.c2g.clone()),
        };
        Self {
            send,
            recv,
            send_seq: 0,
            recv_seq: 0,
        }
    }

    /// Appends `msg` as a keyed frame (header, payload, tag) to `out`.
    pub fn seal(&mut self, msg: &Message, out: &mut Vec<u8>) {
        let start = out.len();
        msg.encode(out);
        let t = tag(&self.send, self.send_seq, &out[start..]);
        out.extend_from_slice(t.as_ref());
        self.send_seq += 1;
    }

    /// Authenticates and decodes a keyed frame read from the network.
    pub fn open(
        &mut self,
        header: &[u8; FRAME_HEADER_LEN],
        payload: &[u8],
        got_tag: &[u8],
    ) -> Result<Message, WireError> {
        let hdr = FrameHeader::decode(header)?;
        if payload.len() != hdr.len || got_tag.len() != TAG_LEN {
            return Err(WireError::Truncated);
        }
        let mut data = Vec::with_capacity(8 + FRAME_HEADER_LEN + payload.len());
        data.extend_from_slice(&self.recv_seq.to_be_bytes());
        data.extend_from_slice(header);
        data.extend_from_slice(payload);
        if hmac::verify(&self.recv, &data, got_tag).is_err() {
            return Err(WireError::BadTag);
        }
        self.recv_seq += 1;
        Message::decode(hdr.ty, payload)
    }
}

/// Authenticates leg preambles, path probes and relayed datagrams of one
/// session, each with a key of its own.
#[derive(Clone)]
pub struct LegKey(hmac::Key, hmac::Key, hmac::Key);

impl fmt::Debug for LegKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LegKey(MASKED)")
    }
}

// Direction labels so that a client's LegOpen can never verify as a gateway
// LegReply or the other way round.
const LEG_OPEN_SEQ: u64 = 0x4c45_474f_5045_4e00; // "LEGOPEN\0"
const LEG_REPLY_SEQ: u64 = 0x4c45_4752_4550_4c59; // "LEGREPLY"

impl LegKey {
    /// The key that tags path probes, separate so a probe can never pass
    /// for a preamble.
    pub(crate) fn probe_key(&self) -> &hmac::Key {
        &self.1
    }

    /// The key that tags relayed datagrams of UDP services, separate so
    /// that no datagram can pass for a probe or a preamble.
    pub(crate) fn datagram_key(&self) -> &hmac::Key {
        &self.2
    }

    /// Appends a tagged LegOpen frame; returns its tag, which the reply must echo.
    pub fn seal_open(&self, msg: &Message, out: &mut Vec<u8>) -> [u8; TAG_LEN] {
        let start = out.len();
        msg.encode(out);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag(&self.0, LEG_OPEN_SEQ, &out[start..]).as_ref());
        out.extend_from_slice(&t);
        t
    }

    /// Verifies a LegOpen frame (header + payload) against its tag.
    pub fn verify_open(&self, frame: &[u8], got: &[u8]) -> bool {
        verify_tag(&self.0, LEG_OPEN_SEQ, frame, got)
    }

    /// Appends a tagged LegReply frame bound to the open it answers.
    pub fn seal_reply(&self, msg: &Message, open_tag: &[u8; TAG_LEN], out: &mut Vec<u8>) {
        let start = out.len();
        msg.encode(out);
        let mut buf = Vec::with_capacity(out.len() - start + TAG_LEN);
        buf.extend_from_slice(open_tag);
        buf.extend_from_slice(&out[start..]);
        let t = tag(&self.0, LEG_REPLY_SEQ, &buf);
        out.extend_from_slice(t.as_ref());
    }

    /// Verifies a LegReply frame (header + payload) answering the open with `open_tag`.
    pub fn verify_reply(&self, open_tag: &[u8; TAG_LEN], frame: &[u8], got: &[u8]) -> bool {
        let mut buf = Vec::with_capacity(frame.len() + TAG_LEN);
        buf.extend_from_slice(open_tag);
        buf.extend_from_slice(frame);
        verify_tag(&self.0, LEG_REPLY_SEQ, &buf, got)
    }
}

fn ephemeral(rng: &dyn SecureRandom) -> Result<(EphemeralPrivateKey, [u8; 32]), CryptoError> {
    let private = EphemeralPrivateKey::generate(&X25519, rng).map_err(|_| CryptoError::Random)?;
    let public = private
        .compute_public_key()
        .map_err(|_| CryptoError::Random)?;
    let mut pk = [0u8; 32];
    pk.copy_from_slice(public.as_ref());
    Ok((private, pk))
}

fn agree(
    private: EphemeralPrivateKey,
    peer: &[u8; 32],
    transcript: &[u8],
) -> Result<SessionKeys, CryptoError> {
    agreement::agree_ephemeral(private, &UnparsedPublicKey::new(&X25519, peer), |shared| {
        SessionKeys::derive(shared, transcript)
    })
    .map_err(|_| CryptoError::BadEphemeral)
}

/// The client's side of the handshake.
pub struct ClientHandshake {
    key: ClientKey,
    private: EphemeralPrivateKey,
    transcript: digest::Context,
}

impl fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientHandshake")
    }
}

impl ClientHandshake {
    /// Starts a handshake; returns the bytes to send first (preface and Hello).
    /// `resume` names the session to resume, 0 for a new one.
    pub fn start(
        client_id: &str,
        key: &ClientKey,
        resume: u64,
        rng: &dyn SecureRandom,
    ) -> Result<(Self, Vec<u8>), CryptoError> {
        let (private, ephemeral) = ephemeral(rng)?;
        let mut out = Preface::new(ConnKind::Control).encode().to_vec();
        Message::Hello {
            client_id: client_id.to_owned(),
            ephemeral,
            resume,
        }
        .encode(&mut out);
        let mut transcript = digest::Context::new(&SHA256);
        transcript.update(&out);
        Ok((
            Self {
                key: key.clone(),
                private,
                transcript,
            },
            out,
        ))
    }

    /// Takes the gateway's Challenge frame (header and payload as received);
    /// returns the session id, the keys, and the Auth frame to send.
    pub fn on_challenge(
        mut self,
        frame: &[u8],
    ) -> Result<(u64, SessionKeys, Vec<u8>), CryptoError> {
        let (ty, payload) = split_frame(frame)?;
        let (session_id, peer) = match Message::decode(ty, payload)? {
            Message::Challenge {
                session_id,
                ephemeral,
            } => (session_id, ephemeral),
            other => return Err(CryptoError::Unexpected(other.ty())),
        };
        self.transcript.update(frame);
        let th = self.transcript.finish();
        let mut signed = AUTH_LABEL.to_vec();
        signed.extend_from_slice(th.as_ref());
        let signature = self.key.sign(&signed);
        let keys = agree(self.private, &peer, th.as_ref())?;
        let mut out = Vec::new();
        Message::Auth { signature }.encode(&mut out);
        Ok((session_id, keys, out))
    }
}

/// The gateway's side of the handshake, after it has accepted a Hello.
pub struct GatewayHandshake {
    private: EphemeralPrivateKey,
    client_ephemeral: [u8; 32],
    transcript: digest::Digest,
}

impl fmt::Debug for GatewayHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GatewayHandshake")
    }
}

impl GatewayHandshake {
    /// Answers a Hello. `preface` and `hello_frame` are the bytes as
    /// received; the caller has already decoded the Hello to look the client
    /// up. Returns the Challenge frame to send.
    pub fn on_hello(
        preface: &[u8],
        hello_frame: &[u8],
        client_ephemeral: [u8; 32],
        session_id: u64,
        rng: &dyn SecureRandom,
    ) -> Result<(Self, Vec<u8>), CryptoError> {
        let (private, ephemeral) = ephemeral(rng)?;
        let mut out = Vec::new();
        Message::Challenge {
            session_id,
            ephemeral,
        }
        .encode(&mut out);
        let mut ctx = digest::Context::new(&SHA256);
        ctx.update(preface);
        ctx.update(hello_frame);
        ctx.update(&out);
        Ok((
            Self {
                private,
                client_ephemeral,
                transcript: ctx.finish(),
            },
            out,
        ))
    }

    /// Checks the client's Auth frame against the public key configured for
    /// the client; on success returns the session keys.
    pub fn on_auth(self, frame: &[u8], client: &PublicKey) -> Result<SessionKeys, CryptoError> {
        let (ty, payload) = split_frame(frame)?;
        let signature = match Message::decode(ty, payload)? {
            Message::Auth { signature } => signature,
            other => return Err(CryptoError::Unexpected(other.ty())),
        };
        let mut signed = AUTH_LABEL.to_vec();
        signed.extend_from_slice(self.transcript.as_ref());
        if !client.verify(&signed, &signature) {
            return Err(CryptoError::BadProof);
        }
        agree(
            self.private,
            &self.client_ephemeral,
            self.transcript.as_ref(),
        )
    }
}

fn split_frame(frame: &[u8]) -> Result<(u8, &[u8]), WireError> {
    let header: &[u8; FRAME_HEADER_LEN] = frame
        .get(..FRAME_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(WireError::Truncated)?;
    let hdr = FrameHeader::decode(header)?;
    let payload = &frame[FRAME_HEADER_LEN..];
    if payload.len() != hdr.len {
        return Err(WireError::Truncated);
    }
    Ok((hdr.ty, payload))
}

/// Keys for tests of other modules.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests_support {
    use super::*;
    use ring::rand::SystemRandom;

    /// Client and gateway keys of one fresh session.
    pub(crate) fn keys_pair() -> (SessionKeys, SessionKeys) {
        let rng = SystemRandom::new();
        let k = ClientKey::generate(&rng).unwrap();
        let (ch, first) = ClientHandshake::start("t", &k, 0, &rng).unwrap();
        let (preface, hello) = first.split_at(8);
        let eph = match Message::decode(hello[0], &hello[3..]).unwrap() {
            Message::Hello { ephemeral, .. } => ephemeral,
            m => panic!("{m:?}"),
        };
        let (gh, challenge) = GatewayHandshake::on_hello(preface, hello, eph, 1, &rng).unwrap();
        let (_, ck, auth) = ch.on_challenge(&challenge).unwrap();
        let gk = gh.on_auth(&auth, &k.public()).unwrap();
        (ck, gk)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stream::{Offset, StreamId};
    use ring::rand::SystemRandom;

    fn handshake(
        client_key: &ClientKey,
        configured: &PublicKey,
    ) -> Result<(SessionKeys, SessionKeys), CryptoError> {
        let rng = SystemRandom::new();
        let (ch, first) = ClientHandshake::start("laptop-7", client_key, 0, &rng)?;
        let (preface, hello) = first.split_at(8);
        let client_eph = match Message::decode(hello[0], &hello[3..])? {
            Message::Hello { ephemeral, .. } => ephemeral,
            m => panic!("{m:?}"),
        };
        let (gh, challenge) = GatewayHandshake::on_hello(preface, hello, client_eph, 42, &rng)?;
        let (sid, ck, auth) = ch.on_challenge(&challenge)?;
        assert_eq!(sid, 42);
        let gk = gh.on_auth(&auth, configured)?;
        Ok((ck, gk))
    }

    #[test]
    fn key_text_roundtrips_and_debug_masks() {
        let k = ClientKey::generate(&SystemRandom::new()).unwrap();
        let k2 = ClientKey::from_text(&format!("  {}\n", k.to_text())).unwrap();
        assert_eq!(k.public(), k2.public());
        assert!(format!("{k:?}").contains("MASKED"));
        assert!(!format!("{k:?}").contains(&k.to_text()[17..]));
        let pk: PublicKey = k.public().to_string().parse().unwrap();
        assert_eq!(pk, k.public());
        assert!(k.to_text().parse::<PublicKey>().is_err());
        assert!(ClientKey::from_text("baton-secret-key:AAAA").is_err());
    }

    #[test]
    fn handshake_agrees_on_keys_and_frames_flow() {
        let k = ClientKey::generate(&SystemRandom::new()).unwrap();
        let (ck, gk) = handshake(&k, &k.public()).unwrap();
        let mut c = ControlCipher::new(&ck, Role::Client);
        let mut g = ControlCipher::new(&gk, Role::Gateway);
        for seq in 0..3 {
            let mut buf = Vec::new();
            c.seal(&Message::Ping { seq }, &mut buf);
            let n = buf.len();
            let m = g
                .open(
                    buf[..3].try_into().unwrap(),
                    &buf[3..n - TAG_LEN],
                    &buf[n - TAG_LEN..],
                )
                .unwrap();
            assert_eq!(m, Message::Ping { seq });
        }
    }

    #[test]
    fn wrong_key_is_bad_proof() {
        let rng = SystemRandom::new();
        let k = ClientKey::generate(&rng).unwrap();
        let other = ClientKey::generate(&rng).unwrap();
        assert!(matches!(
            handshake(&k, &other.public()),
            Err(CryptoError::BadProof)
        ));
    }

    #[test]
    fn forged_replayed_or_reflected_frames_fail() {
        let k = ClientKey::generate(&SystemRandom::new()).unwrap();
        let (ck, gk) = handshake(&k, &k.public()).unwrap();
        let mut c = ControlCipher::new(&ck, Role::Client);
        let mut g = ControlCipher::new(&gk, Role::Gateway);
        let mut buf = Vec::new();
        c.seal(&Message::Disconnect, &mut buf);
        let n = buf.len();
        let (h, p, t) = (&buf[..3], &buf[3..n - TAG_LEN], &buf[n - TAG_LEN..]);
        // Flipped tag bit.
        let mut bad = t.to_vec();
        bad[0] ^= 1;
        assert_eq!(
            g.open(h.try_into().unwrap(), p, &bad),
            Err(WireError::BadTag)
        );
        assert!(g.open(h.try_into().unwrap(), p, t).is_ok());
        // Replay of the same frame: the sequence number moved on.
        assert_eq!(g.open(h.try_into().unwrap(), p, t), Err(WireError::BadTag));
        // Reflection: the client's own frame sent back to it.
        assert_eq!(c.open(h.try_into().unwrap(), p, t), Err(WireError::BadTag));
        // Keys from another session do not open it.
        let (ck2, _) = handshake(&k, &k.public()).unwrap();
        let mut g2 = ControlCipher::new(&ck2, Role::Gateway);
        assert_eq!(g2.open(h.try_into().unwrap(), p, t), Err(WireError::BadTag));
    }

    #[test]
    fn leg_preamble_tags_bind_direction_and_open() {
        let k = ClientKey::generate(&SystemRandom::new()).unwrap();
        let (ck, gk) = handshake(&k, &k.public()).unwrap();
        let open = Message::LegOpen {
            session_id: 42,
            stream: StreamId(0),
            generation: 0,
            received: Offset(0),
            service: "echo".into(),
            handover: false,
            compression: crate::wire::Compression::None,
        };
        let mut buf = Vec::new();
        let t = ck.leg_key().seal_open(&open, &mut buf);
        let n = buf.len();
        assert!(gk
            .leg_key()
            .verify_open(&buf[..n - TAG_LEN], &buf[n - TAG_LEN..]));
        let mut tampered = buf.clone();
        tampered[5] ^= 1;
        assert!(!gk
            .leg_key()
            .verify_open(&tampered[..n - TAG_LEN], &tampered[n - TAG_LEN..]));
        let reply = Message::LegReply {
            result: Ok(Offset(0)),
            detail: String::new(),
        };
        let mut rb = Vec::new();
        gk.leg_key().seal_reply(&reply, &t, &mut rb);
        let m = rb.len();
        assert!(ck
            .leg_key()
            .verify_reply(&t, &rb[..m - TAG_LEN], &rb[m - TAG_LEN..]));
        assert!(!ck
            .leg_key()
            .verify_reply(&[0; TAG_LEN], &rb[..m - TAG_LEN], &rb[m - TAG_LEN..]));
        // An open tag never verifies as a reply.
        assert!(!ck
            .leg_key()
            .verify_open(&rb[..m - TAG_LEN], &rb[m - TAG_LEN..]));
    }
}
