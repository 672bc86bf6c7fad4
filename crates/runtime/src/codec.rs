//! Compression of a stream's bytes on its legs (`compress = "zstd"`).
//!
//! Each direction of each leg is one zstd stream that starts at the leg's
//! start offset, so offsets keep counting the application's bytes and a new
//! leg resumes at any offset with a fresh compressor. Every chunk is flushed
//! as it is written: an interactive stream never waits for more input.

use std::io;

use zstd::stream::raw::{CParameter, DParameter, Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// zstd's default level: a good ratio at relay speeds.
const LEVEL: i32 = 3;

/// Window of 2^17 bytes: bounds each compressor's and decompressor's
/// memory; a peer's frame that asks for a larger window is refused.
const WINDOW_LOG: u32 = 17;

/// Largest input compressed at once, so that a leg's unwritten compressed
/// bytes (lost if the leg is replaced) stay small.
pub(crate) const MAX_INPUT: usize = 64 * 1024;

/// The compressing side of a leg direction.
pub(crate) struct Compressor {
    enc: Encoder<'static>,
    out: Vec<u8>,
    /// Bytes of `out` already written to the leg.
    written: usize,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("pending", &(self.out.len() - self.written))
            .finish()
    }
}

impl Compressor {
    pub(crate) fn new() -> io::Result<Self> {
        let mut enc = Encoder::new(LEVEL)?;
        enc.set_parameter(CParameter::WindowLog(WINDOW_LOG))?;
        Ok(Self {
            enc,
            out: Vec::with_capacity(zstd::zstd_safe::compress_bound(MAX_INPUT)),
            written: 0,
        })
    }

    /// Compressed bytes not yet written to the leg.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.out[self.written..]
    }

    /// Marks `n` pending bytes as written.
    pub(crate) fn consume(&mut self, n: usize) {
        self.written = (self.written + n).min(self.out.len());
    }

    /// Compresses all of `input` (at most [`MAX_INPUT`]) and flushes it, so
    /// that the pending bytes decode to exactly `input`. Call only when
    /// nothing is pending.
    pub(crate) fn compress(&mut self, input: &[u8]) -> io::Result<()> {
        debug_assert!(self.pending().is_empty());
        self.out.clear();
        self.written = 0;
        let mut inb = InBuffer::around(input);
        while inb.pos() < input.len() {
            self.reserve();
            // Over a Vec, the output buffer sets the Vec's length as it writes.
            let len = self.out.len();
            self.enc
                .run(&mut inb, &mut OutBuffer::around_pos(&mut self.out, len))?;
        }
        loop {
            self.reserve();
            let len = self.out.len();
            let left = self
                .enc
                .flush(&mut OutBuffer::around_pos(&mut self.out, len))?;
            if left == 0 {
                return Ok(());
            }
        }
    }

    fn reserve(&mut self) {
        if self.out.capacity() - self.out.len() < 4096 {
            self.out.reserve(16 * 1024);
        }
    }
}

/// The decompressing side of a leg direction.
pub(crate) struct Decompressor {
    dec: Decoder<'static>,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    pub(crate) fn new() -> io::Result<Self> {
        let mut dec = Decoder::new()?;
        dec.set_parameter(DParameter::WindowLogMax(WINDOW_LOG))?;
        Ok(Self { dec })
    }

    /// Decodes from `input` into `out`; returns how much input it used and
    /// how much output it made. Call again while it uses or makes anything:
    /// the decoder may hold output for which `out` had no room.
    pub(crate) fn decompress(
        &mut self,
        input: &[u8],
        out: &mut [u8],
    ) -> io::Result<(usize, usize)> {
        let mut inb = InBuffer::around(input);
        let mut outb = OutBuffer::around(out);
        // A bad frame is the peer's fault (or tampering): an error, never a panic.
        self.dec.run(&mut inb, &mut outb)?;
        Ok((inb.pos(), outb.pos()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;

    fn roundtrip(chunks: &[&[u8]]) -> (Vec<u8>, usize) {
        let mut c = Compressor::new().unwrap();
        let mut d = Decompressor::new().unwrap();
        let (mut got, mut wire) = (Vec::new(), 0);
        let mut out = vec![0u8; 256 * 1024];
        for chunk in chunks {
            c.compress(chunk).unwrap();
            let input = c.pending().to_vec();
            wire += input.len();
            c.consume(input.len());
            // Each flushed chunk decodes entirely, with no more input.
            let mut pos = 0;
            loop {
                let (used, made) = d.decompress(&input[pos..], &mut out).unwrap();
                got.extend_from_slice(&out[..made]);
                pos += used;
                if used == 0 && made == 0 {
                    break;
                }
            }
            assert_eq!(pos, input.len());
            assert_eq!(
                &got[got.len() - chunk.len()..],
                *chunk,
                "a flushed chunk must decode at once"
            );
        }
        (got, wire)
    }

    #[test]
    fn flushed_chunks_decode_exactly_and_text_shrinks() {
        let text: Vec<u8> = b"GET /index.html HTTP/1.1\r\nHost: example\r\n\r\n".repeat(1500);
        let chunks: Vec<&[u8]> = text.chunks(MAX_INPUT).collect();
        let (got, wire) = roundtrip(&chunks);
        assert_eq!(got, text);
        assert!(
            wire * 10 < text.len(),
            "{wire} bytes on the wire for {}",
            text.len()
        );
    }

    #[test]
    fn random_bytes_survive() {
        let mut x = 0x9e3779b97f4a7c15u64;
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let chunks: Vec<&[u8]> = data.chunks(MAX_INPUT).collect();
        assert_eq!(roundtrip(&chunks).0, data);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = Decompressor::new().unwrap();
        let mut out = [0u8; 1024];
        let r = d.decompress(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8], &mut out);
        assert!(r.is_err());
    }
}
