//! The encoding of every value nid persists or puts in a Raft log: a format byte, then a protobuf
//! message (prost) of a schema of our own (the domain's records and commands, the engine's Raft
//! and apply state), never a wire message of the public contract.
//!
//! Why protobuf and not bincode 2 (end of life) or serde formats: fields carry tags, so a later
//! version adds fields without rewriting stored data and an older reader skips what it does not
//! know; the encoding is deterministic for our schemas (fields in tag order, repeated fields in
//! order, maps only as B-tree maps), which the idempotency digests and the replicas' identical
//! bytes rely on; decoding is bounded and never panics on hostile bytes; and prost is already how
//! the wire contract is encoded. ARCHITECTURE.md records the measurement.
//!
//! [`FORMAT`] is 2: format 1 was bincode, written by versions before 2026-12. Such data is refused
//! with a message saying how to wipe development data; no production data predates format 2.

/// The format byte of every value this version writes.
pub const FORMAT: u8 = 2;

/// Upper bound on one decoded value, so a corrupt or hostile value cannot allocate without limit.
pub const MAX_VALUE_BYTES: usize = 64 << 20;

/// Why a stored or received value could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The value is empty.
    #[error("empty value")]
    Empty,
    /// Format 1 (bincode) data from a version before 2026-12.
    #[error(
        "value in format 1 (written by a version before 2026-12); this version reads format {FORMAT} only: \
         wipe development data (make clean-dev) and start again"
    )]
    OldFormat,
    /// A format byte this version does not know (written by a newer version).
    #[error("unknown format {0} (written by a newer version?)")]
    UnknownFormat(u8),
    /// The value is larger than [`MAX_VALUE_BYTES`].
    #[error("value of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The bytes do not decode as the expected message.
    #[error("malformed value: {0}")]
    Malformed(String),
}

/// Encodes `value` behind the format byte.
pub fn encode<T: prost::Message>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + value.encoded_len());
    out.push(FORMAT);
    // Encoding into a Vec with enough capacity cannot fail.
    let _ = value.encode(&mut out);
    out
}

/// Decodes a value written by [`encode`].
pub fn decode<T: prost::Message + Default>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&format, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    match format {
        FORMAT => {}
        1 => return Err(CodecError::OldFormat),
        other => return Err(CodecError::UnknownFormat(other)),
    }
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    T::decode(body).map_err(|e| CodecError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    struct Sample {
        #[prost(uint64, tag = "1")]
        a: u64,
        #[prost(bytes = "vec", tag = "2")]
        b: Vec<u8>,
        #[prost(btree_map = "string, string", tag = "3")]
        c: std::collections::BTreeMap<String, String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct SampleV2 {
        #[prost(uint64, tag = "1")]
        a: u64,
        #[prost(bytes = "vec", tag = "2")]
        b: Vec<u8>,
        #[prost(btree_map = "string, string", tag = "3")]
        c: std::collections::BTreeMap<String, String>,
        #[prost(string, tag = "4")]
        added: String,
    }

    #[test]
    fn round_trip_format_byte_and_refusals() {
        let v = Sample { a: 7, b: vec![1, 2, 3], c: [("k".to_owned(), "v".to_owned())].into() };
        let bytes = encode(&v);
        assert_eq!(bytes[0], FORMAT);
        assert_eq!(decode::<Sample>(&bytes).unwrap(), v);
        assert_eq!(decode::<Sample>(&[]), Err(CodecError::Empty));
        let mut old = bytes.clone();
        old[0] = 1;
        assert_eq!(decode::<Sample>(&old), Err(CodecError::OldFormat));
        assert!(CodecError::OldFormat.to_string().contains("make clean-dev"));
        old[0] = 9;
        assert_eq!(decode::<Sample>(&old), Err(CodecError::UnknownFormat(9)));
        assert!(matches!(decode::<Sample>(&[FORMAT, 0x0a, 0xff]), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn fields_evolve_both_ways_and_maps_encode_in_key_order() {
        let new = SampleV2 { a: 1, b: vec![], c: Default::default(), added: "x".into() };
        let old: Sample = decode(&encode(&new)).unwrap();
        assert_eq!(old.a, 1, "an older reader skips the field it does not know");
        let back: SampleV2 = decode(&encode(&old)).unwrap();
        assert_eq!(back.added, "", "a newer reader defaults the field an older writer lacked");
        // The same map built in two insertion orders encodes to the same bytes.
        let mut one = Sample::default();
        let mut two = Sample::default();
        for k in ["b", "a", "c"] {
            one.c.insert(k.into(), k.repeat(3));
        }
        for k in ["c", "a", "b"] {
            two.c.insert(k.into(), k.repeat(3));
        }
        assert_eq!(encode(&one), encode(&two));
    }

    #[test]
    fn a_huge_length_prefix_is_refused_without_allocating() {
        // Field 2 (bytes) with a length prefix of about 2^62.
        let mut bytes = vec![FORMAT, 0x12];
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x3f]);
        assert!(matches!(decode::<Sample>(&bytes), Err(CodecError::Malformed(_))));
    }
}
