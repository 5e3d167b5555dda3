//! The one place values are encoded for disk and for the Raft log: bincode 2 behind a format byte.
//!
//! Every persisted value starts with [`FORMAT_V1`]; a reader that meets another byte refuses the
//! value instead of misreading it, so a future format can be introduced next to this one. Decoding
//! is bounded ([`MAX_VALUE_BYTES`]) because log entries arrive from peers.

use bincode::{Decode, Encode};

/// The format byte of every value this version writes.
pub const FORMAT_V1: u8 = 1;

/// Upper bound on one decoded value, so a corrupt length prefix cannot allocate without limit.
pub const MAX_VALUE_BYTES: usize = 64 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_big_endian().with_fixed_int_encoding().with_limit::<MAX_VALUE_BYTES>()
}

/// Why a stored or received value could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The value is empty.
    #[error("empty value")]
    Empty,
    /// The value carries a format byte this version does not know.
    #[error("unknown format version {0}")]
    UnknownFormat(u8),
    /// The bytes do not decode as the expected type.
    #[error("malformed value: {0}")]
    Malformed(String),
    /// Bytes remain after the value.
    #[error("{0} trailing bytes after value")]
    Trailing(usize),
}

/// Encodes `value` with the format byte in front.
pub fn encode<T: Encode>(value: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_V1];
    // Encoding into a Vec only fails when the size limit is exceeded, which our own values never
    // reach; fall back to an empty marker-only value would corrupt data, so report it loudly.
    bincode::encode_into_std_write(value, &mut out, config())
        .expect("nid values stay below the codec size limit");
    out
}

/// Decodes a value written by [`encode`].
pub fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&format, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if format != FORMAT_V1 {
        return Err(CodecError::UnknownFormat(format));
    }
    let (value, read) =
        bincode::decode_from_slice(body, config()).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if read != body.len() {
        return Err(CodecError::Trailing(body.len() - read));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Encode, Decode)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
        c: Option<String>,
    }

    #[test]
    fn round_trip_and_format_byte() {
        let v = Sample { a: 7, b: vec![1, 2, 3], c: Some("x".into()) };
        let bytes = encode(&v);
        assert_eq!(bytes[0], FORMAT_V1);
        assert_eq!(decode::<Sample>(&bytes).unwrap(), v);
    }

    #[test]
    fn rejects_unknown_format_truncation_and_trailing_bytes() {
        let mut bytes = encode(&Sample { a: 1, b: vec![], c: None });
        assert_eq!(decode::<Sample>(&[]), Err(CodecError::Empty));
        let mut other = bytes.clone();
        other[0] = 2;
        assert_eq!(decode::<Sample>(&other), Err(CodecError::UnknownFormat(2)));
        assert!(matches!(decode::<Sample>(&bytes[..bytes.len() - 1]), Err(CodecError::Malformed(_))));
        bytes.push(0);
        assert_eq!(decode::<Sample>(&bytes), Err(CodecError::Trailing(1)));
    }

    #[test]
    fn huge_length_prefix_is_refused_without_allocating() {
        // format byte, then a Vec<u8> length of 2^60 in fixed big-endian encoding.
        let mut bytes = vec![FORMAT_V1];
        bytes.extend_from_slice(&(1u64 << 60).to_be_bytes());
        assert!(matches!(decode::<Vec<u8>>(&bytes), Err(CodecError::Malformed(_))));
    }
}
