//! Reading frames from a byte stream.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::codec::Decoder;

use baton_proto::wire::{FrameHeader, WireError, FRAME_HEADER_LEN, MAX_PAYLOAD, TAG_LEN};
use baton_proto::{ControlCipher, Message};

/// A frame as received: header and payload, and the tag if it had one.
#[derive(Debug, Clone)]
pub(crate) struct RawFrame {
    /// Header and payload, exactly as received (the handshake hashes them).
    pub(crate) bytes: Vec<u8>,
    pub(crate) tag: Option<[u8; TAG_LEN]>,
}

impl RawFrame {
    pub(crate) fn ty(&self) -> u8 {
        self.bytes[0]
    }

    pub(crate) fn header(&self) -> &[u8; FRAME_HEADER_LEN] {
        self.bytes[..FRAME_HEADER_LEN]
            .try_into()
            .expect("a RawFrame always holds its header")
    }

    pub(crate) fn payload(&self) -> &[u8] {
        &self.bytes[FRAME_HEADER_LEN..]
    }

    /// Decodes an unkeyed frame.
    pub(crate) fn decode(&self) -> Result<Message, WireError> {
        Message::decode(self.ty(), self.payload())
    }

    /// Authenticates and decodes a keyed frame.
    pub(crate) fn open(&self, cipher: &mut ControlCipher) -> Result<Message, WireError> {
        let tag = self.tag.as_ref().ok_or(WireError::BadTag)?;
        cipher.open(self.header(), self.payload(), tag)
    }
}

/// First read buffer of a control connection: its frames are small (the
/// buffer grows for a large one), and a gateway holds thousands of them.
pub(crate) const CONTROL_READ_BUFFER: usize = 256;

const ACCEPTED: u8 = 0x04;

/// Splits a control connection into frames. Until the session is keyed only
/// the Accepted frame carries a tag; afterwards every frame does, so a
/// forged frame of any type fails to open.
#[derive(Debug, Default)]
pub(crate) struct FrameCodec {
    pub(crate) keyed: bool,
}

impl Decoder for FrameCodec {
    type Item = RawFrame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, FrameError> {
        if src.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let header: [u8; FRAME_HEADER_LEN] = src[..FRAME_HEADER_LEN]
            .try_into()
            .expect("length checked above");
        let hdr = FrameHeader::decode(&header)?;
        let tag_len = if self.keyed || hdr.ty == ACCEPTED {
            TAG_LEN
        } else {
            0
        };
        let total = FRAME_HEADER_LEN + hdr.len + tag_len;
        if src.len() < total {
            src.reserve(total - src.len());
            return Ok(None);
        }
        let bytes = src[..FRAME_HEADER_LEN + hdr.len].to_vec();
        src.advance(FRAME_HEADER_LEN + hdr.len);
        let tag = (tag_len > 0).then(|| {
            let mut t = [0u8; TAG_LEN];
            src.copy_to_slice(&mut t);
            t
        });
        Ok(Some(RawFrame { bytes, tag }))
    }
}

/// A frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Reads one tagged frame straight from `r`, without reading past it: used
/// on legs, where the application's bytes follow the preamble.
pub(crate) async fn read_tagged<R: AsyncRead + Unpin>(r: &mut R) -> Result<RawFrame, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    r.read_exact(&mut header).await?;
    let hdr = FrameHeader::decode(&header)?;
    debug_assert!(hdr.len <= MAX_PAYLOAD);
    let mut bytes = vec![0u8; FRAME_HEADER_LEN + hdr.len];
    bytes[..FRAME_HEADER_LEN].copy_from_slice(&header);
    r.read_exact(&mut bytes[FRAME_HEADER_LEN..]).await?;
    let mut tag = [0u8; TAG_LEN];
    r.read_exact(&mut tag).await?;
    Ok(RawFrame {
        bytes,
        tag: Some(tag),
    })
}
