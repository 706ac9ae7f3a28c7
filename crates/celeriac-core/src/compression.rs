//! Body compression as kombu does it (`kombu/compression.py`, `kombu/messaging.py`,
//! `kombu/message.py`).
//!
//! A producer asked for `compression='zlib'` compresses the *serialized* body and sets the
//! message header `compression` to the codec's content type; `content_type` and
//! `content_encoding` still describe the body once decompressed. The header travels with the
//! message on every transport: in the AMQP headers table on RabbitMQ, in the envelope's
//! `headers` on Redis (and in celeriac's SQLite broker, which stores the same envelope).
//!
//! The codecs kombu registers without optional packages, with the names its `get_decoder`
//! accepts (the content type or an alias):
//!
//! | codec | header kombu writes | aliases | bytes |
//! |---|---|---|---|
//! | zlib | `application/x-gzip` | `zlib`, `gzip` | a **zlib** stream (`zlib.compress`), despite the name |
//! | bzip2 | `application/x-bz2` | `bzip2`, `bzip` | `bz2.compress` (one or more bzip2 streams) |
//! | lzma | `application/x-lzma` | `lzma`, `xz` | `lzma.compress`: the **.xz** container (the legacy `.lzma` form is read too) |
//! | zstd | `application/zstd` | `zstd`, `zstandard` | one Zstandard frame (`compression.zstd`, standard from Python 3.14, or `backports.zstd` before) |
//!
//! Brotli is registered by kombu only when its Python package is installed; celeriac does not
//! read it, and a message using it, or any other name, is refused with "unsupported
//! compression: <name>".
//!
//! Decompression is bounded: at most [`MAX_DECOMPRESSED_BODY`] bytes come out, whatever the
//! stream claims, so a compression bomb or a corrupt stream ends in a [`CompressionError`]
//! naming the codec, never in a hang, a panic or unbounded memory. The `.xz`/`.lzma` decoders
//! also refuse a dictionary over 64 MiB (Python's largest preset uses 64 MiB) before allocating it.

use std::io::{Read, Write};

/// The most bytes a compressed body may decompress to: 64 MiB. A task body that large is far
/// beyond anything Celery users send (RabbitMQ itself refuses messages over 16 MiB by default
/// since 4.0); above it the message is refused as a likely compression bomb.
pub const MAX_DECOMPRESSED_BODY: usize = 64 * 1024 * 1024;

/// A codec kombu can write by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// zlib (`application/x-gzip`).
    Zlib,
    /// bzip2 (`application/x-bz2`).
    Bzip2,
    /// xz / lzma (`application/x-lzma`).
    Lzma,
    /// Zstandard (`application/zstd`).
    Zstd,
}

/// A body that could not be compressed or decompressed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompressionError {
    /// The `compression` header names a codec celeriac does not read.
    #[error("unsupported compression: {0} (supported: {SUPPORTED})")]
    Unsupported(String),
    /// The stream is corrupt or truncated.
    #[error("{codec} body cannot be decompressed: {reason}")]
    Corrupt {
        /// The codec's content type.
        codec: &'static str,
        /// What the decoder said.
        reason: String,
    },
    /// The stream decompresses to more than [`MAX_DECOMPRESSED_BODY`].
    #[error("{codec} body decompresses to more than {limit} bytes; refused as a compression bomb")]
    TooLarge {
        /// The codec's content type.
        codec: &'static str,
        /// The limit that was hit.
        limit: usize,
    },
    /// The compressor failed (only on I/O into memory, which does not fail in practice).
    #[error("cannot compress with {codec}: {reason}")]
    Compress {
        /// The codec's content type.
        codec: &'static str,
        /// What the encoder said.
        reason: String,
    },
}

const SUPPORTED: &str =
    "application/x-gzip (zlib, gzip), application/x-bz2 (bzip2, bzip), application/x-lzma (lzma, xz)";

/// The memory an `.xz`/`.lzma` decoder may take, in KiB: enough for a 64 MiB dictionary
/// (Python's largest preset, `9`) and the decoder's tables. A stream asking for more is refused
/// before anything is allocated.
const LZMA_MEMORY_LIMIT_KB: u32 = 72 * 1024;

const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0x00];
const GZIP_MAGIC: &[u8] = &[0x1F, 0x8B];

impl Codec {
    /// Every codec, in kombu's registration order.
    pub const ALL: [Codec; 4] = [Codec::Zlib, Codec::Bzip2, Codec::Lzma, Codec::Zstd];

    /// The codec a `compression` header or option names: a content type or one of kombu's
    /// aliases, spelled exactly as kombu spells them.
    pub fn from_name(name: &str) -> Result<Codec, CompressionError> {
        match name {
            "application/x-gzip" | "zlib" | "gzip" => Ok(Codec::Zlib),
            "application/x-bz2" | "bzip2" | "bzip" => Ok(Codec::Bzip2),
            "application/x-lzma" | "lzma" | "xz" => Ok(Codec::Lzma),
            "application/zstd" | "zstd" | "zstandard" => Ok(Codec::Zstd),
            other => Err(CompressionError::Unsupported(other.to_string())),
        }
    }

    /// The content type kombu writes in the `compression` header.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Zlib => "application/x-gzip",
            Codec::Bzip2 => "application/x-bz2",
            Codec::Lzma => "application/x-lzma",
            Codec::Zstd => "application/zstd",
        }
    }

    /// Compress `data` as kombu's encoder does (zlib level 6, bzip2 level 9, xz preset 6 with
    /// a CRC64 check: Python's defaults; zstd at ruzstd's "fastest", about level 1, where Python
    /// uses 3), so Python decompresses it with `kombu.compression`.
    pub fn compress(self, data: &[u8]) -> Result<Vec<u8>, CompressionError> {
        let codec = self.content_type();
        let fail = |e: std::io::Error| CompressionError::Compress { codec, reason: e.to_string() };
        match self {
            Codec::Zlib => {
                let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
                enc.write_all(data).map_err(fail)?;
                enc.finish().map_err(fail)
            }
            Codec::Bzip2 => {
                let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::new(9));
                enc.write_all(data).map_err(fail)?;
                enc.finish().map_err(fail)
            }
            Codec::Lzma => {
                let options = lzma_rust2::XzOptions::with_preset(6);
                let mut enc = lzma_rust2::XzWriter::new(Vec::new(), options).map_err(fail)?;
                enc.write_all(data).map_err(fail)?;
                enc.finish().map_err(fail)
            }
            Codec::Zstd => Ok(ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)),
        }
    }

    /// Decompress `data`, producing at most `limit` bytes.
    pub fn decompress_limited(self, data: &[u8], limit: usize) -> Result<Vec<u8>, CompressionError> {
        let codec = self.content_type();
        let corrupt = |e: std::io::Error| CompressionError::Corrupt { codec, reason: e.to_string() };
        let mem_limit_kb = LZMA_MEMORY_LIMIT_KB;
        if data.is_empty() {
            return Err(CompressionError::Corrupt { codec, reason: "empty body".into() });
        }
        let reader: Box<dyn Read + '_> = match self {
            // kombu writes zlib under this name; a real gzip stream (a hand-written producer
            // taking the name at its word) is read too.
            Codec::Zlib if data.starts_with(GZIP_MAGIC) => Box::new(flate2::read::MultiGzDecoder::new(data)),
            // flate2's readers end a truncated zlib stream quietly; this one checks for its end.
            Codec::Zlib => return inflate_zlib(data, limit),
            Codec::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(data)),
            Codec::Lzma if data.starts_with(XZ_MAGIC) => {
                Box::new(lzma_rust2::XzReader::new_mem_limit(data, true, mem_limit_kb))
            }
            // Python's `lzma.decompress` also reads the legacy `.lzma` ("alone") format.
            Codec::Lzma => Box::new(lzma_rust2::LzmaReader::new_mem_limit(data, mem_limit_kb, None).map_err(corrupt)?),
            // One frame, as Python's `zstd.compress` writes; its window (the decoder's memory)
            // within the same bound as the output.
            Codec::Zstd => Box::new(
                ruzstd::decoding::StreamingDecoder::new_with_max_window_size(data, MAX_DECOMPRESSED_BODY as u64)
                    .map_err(|e| CompressionError::Corrupt { codec, reason: e.to_string() })?,
            ),
        };
        let mut out = Vec::new();
        reader.take(limit as u64 + 1).read_to_end(&mut out).map_err(corrupt)?;
        if out.len() > limit {
            return Err(CompressionError::TooLarge { codec, limit });
        }
        Ok(out)
    }

    /// Decompress `data` within [`MAX_DECOMPRESSED_BODY`].
    pub fn decompress(self, data: &[u8]) -> Result<Vec<u8>, CompressionError> {
        self.decompress_limited(data, MAX_DECOMPRESSED_BODY)
    }
}

/// Inflate one zlib stream into at most `limit` bytes, failing unless the stream ends (its
/// Adler-32 checked) within `data`.
fn inflate_zlib(data: &[u8], limit: usize) -> Result<Vec<u8>, CompressionError> {
    let codec = Codec::Zlib.content_type();
    let mut inflater = flate2::Decompress::new(true);
    let mut out = Vec::with_capacity(data.len().saturating_mul(4).clamp(1024, limit + 1));
    loop {
        if out.len() == out.capacity() {
            if out.len() > limit {
                return Err(CompressionError::TooLarge { codec, limit });
            }
            out.reserve((out.len()).clamp(1024, limit + 1 - out.len()));
        }
        let (in_before, out_before) = (inflater.total_in(), out.len());
        let rest = &data[usize::try_from(in_before).unwrap_or(data.len()).min(data.len())..];
        let status = inflater
            .decompress_vec(rest, &mut out, flate2::FlushDecompress::None)
            .map_err(|e| CompressionError::Corrupt { codec, reason: e.to_string() })?;
        if out.len() > limit {
            return Err(CompressionError::TooLarge { codec, limit });
        }
        match status {
            flate2::Status::StreamEnd => return Ok(out),
            _ if inflater.total_in() == in_before && out.len() == out_before && out.len() < out.capacity() => {
                return Err(CompressionError::Corrupt { codec, reason: "truncated stream".into() });
            }
            _ => {}
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.content_type())
    }
}

impl std::str::FromStr for Codec {
    type Err = CompressionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Codec::from_name(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Vec<u8> {
        // A JSON body like the one in the issue: `echo('x' * 20000)`.
        format!("[[\"{}\"], {{}}, {{\"callbacks\": null}}]", "x".repeat(20_000)).into_bytes()
    }

    #[test]
    fn every_codec_round_trips_and_shrinks_a_repetitive_body() {
        for codec in Codec::ALL {
            let packed = codec.compress(&body()).unwrap();
            assert!(packed.len() < 1_000, "{codec}: {} bytes", packed.len());
            assert_eq!(codec.decompress(&packed).unwrap(), body(), "{codec}");
            assert_eq!(codec.decompress(&codec.compress(b"").unwrap()).unwrap(), b"", "{codec}: empty");
        }
    }

    #[test]
    fn names_are_kombus_content_types_and_aliases() {
        for (name, codec) in [
            ("application/x-gzip", Codec::Zlib),
            ("zlib", Codec::Zlib),
            ("gzip", Codec::Zlib),
            ("application/x-bz2", Codec::Bzip2),
            ("bzip2", Codec::Bzip2),
            ("bzip", Codec::Bzip2),
            ("application/x-lzma", Codec::Lzma),
            ("lzma", Codec::Lzma),
            ("xz", Codec::Lzma),
            ("application/zstd", Codec::Zstd),
            ("zstd", Codec::Zstd),
            ("zstandard", Codec::Zstd),
        ] {
            assert_eq!(Codec::from_name(name), Ok(codec), "{name}");
        }
        for name in ["application/x-snappy", "application/x-brotli", "brotli", "ZLIB", ""] {
            let err = Codec::from_name(name).unwrap_err();
            assert_eq!(err, CompressionError::Unsupported(name.into()));
            assert!(err.to_string().starts_with(&format!("unsupported compression: {name} (")), "{err}");
        }
    }

    #[test]
    fn a_real_gzip_stream_under_the_gzip_name_is_read() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&body()).unwrap();
        assert_eq!(Codec::Zlib.decompress(&enc.finish().unwrap()).unwrap(), body());
    }

    #[test]
    fn the_legacy_lzma_format_is_read() {
        let mut enc =
            lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &lzma_rust2::LzmaOptions::with_preset(6), None).unwrap();
        enc.write_all(&body()).unwrap();
        let packed = enc.finish().unwrap();
        assert!(!packed.starts_with(XZ_MAGIC));
        assert_eq!(Codec::Lzma.decompress(&packed).unwrap(), body());
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let zeros = vec![0u8; 256 * 1024];
        for codec in Codec::ALL {
            let packed = codec.compress(&zeros).unwrap();
            assert_eq!(
                codec.decompress_limited(&packed, 100_000),
                Err(CompressionError::TooLarge { codec: codec.content_type(), limit: 100_000 }),
                "{codec}"
            );
            assert_eq!(codec.decompress_limited(&packed, zeros.len()).unwrap().len(), zeros.len(), "{codec}");
        }
    }

    #[test]
    fn corrupt_and_truncated_streams_are_errors() {
        for codec in Codec::ALL {
            let packed = codec.compress(&body()).unwrap();
            for broken in
                [&packed[..packed.len() / 2], &packed[..packed.len() - 1], &b"not compressed at all"[..], &[][..]]
            {
                let r = codec.decompress(broken);
                assert!(matches!(r, Err(CompressionError::Corrupt { .. })), "{codec}: {} bytes -> {r:?}", broken.len());
            }
            // The last byte is in the checksum or footer of zlib, bzip2 and xz. (A zstd frame
            // carries no checksum unless asked, neither Python's nor ours: there corruption is
            // found only where it breaks the format, as in Python.)
            if codec != Codec::Zstd {
                let mut flipped = packed.clone();
                *flipped.last_mut().unwrap() ^= 0x55;
                assert!(codec.decompress(&flipped).is_err(), "{codec}: a flipped checksum byte");
            }
        }
    }
}
