//! Buckets: the unit of ownership and movement (DESIGN.md section 3).
//!
//! The bucket count is fixed at cluster creation; every data key starts with its bucket (u16,
//! big-endian) so one bucket is one contiguous key range.

use ring::digest;

/// Number of buckets in every v1 cluster (as Redis Cluster).
pub const BUCKETS: u16 = 16384;

/// A bucket number in `0..BUCKETS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BucketId(u16);

impl BucketId {
    /// Returns the bucket if `value < BUCKETS`.
    pub fn new(value: u32) -> Option<BucketId> {
        if value < u32::from(BUCKETS) { Some(BucketId(value as u16)) } else { None }
    }

    /// The bucket number.
    pub fn get(self) -> u16 {
        self.0
    }

    /// The two-byte big-endian prefix every data key of this bucket starts with.
    pub fn key_prefix(self) -> [u8; 2] {
        self.0.to_be_bytes()
    }
}

impl std::fmt::Display for BucketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Domain tags that keep the bucket hashes of different kinds of external keys independent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyDomain {
    /// Registration ids chosen by registration clients.
    Rid,
    /// Partner ids.
    Partner,
}

impl KeyDomain {
    fn tag(self) -> &'static [u8] {
        match self {
            KeyDomain::Rid => b"nid/v1/bucket/rid\0",
            KeyDomain::Partner => b"nid/v1/bucket/partner\0",
        }
    }
}

/// Returns the bucket of an external key: the first two bytes of SHA-256(domain tag || key),
/// big-endian, modulo [`BUCKETS`]. 65536 is a multiple of 16384, so the result is uniform.
pub fn bucket_of_key(domain: KeyDomain, key: &[u8]) -> BucketId {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(domain.tag());
    context.update(key);
    let hash = context.finish();
    let bytes = hash.as_ref();
    let prefix = u16::from_be_bytes([bytes[0], bytes[1]]);
    BucketId(prefix % BUCKETS)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn bucket_new_rejects_out_of_range() {
        assert_eq!(BucketId::new(16383).map(BucketId::get), Some(16383));
        assert!(BucketId::new(16384).is_none());
        assert!(BucketId::new(u32::MAX).is_none());
    }

    #[test]
    fn key_prefix_is_big_endian() {
        assert_eq!(BucketId::new(0x1234).unwrap().key_prefix(), [0x12, 0x34]);
    }

    #[test]
    fn domains_are_independent() {
        let same = (0..1000)
            .filter(|i| {
                let key = format!("key-{i}");
                bucket_of_key(KeyDomain::Rid, key.as_bytes())
                    == bucket_of_key(KeyDomain::Partner, key.as_bytes())
            })
            .count();
        // Independent uniform buckets collide with probability 1/16384 per key.
        assert!(same <= 2, "{same} collisions across domains");
    }

    #[test]
    fn rid_bucket_is_pinned() {
        // Pins the hash so a refactor cannot silently re-route every RID in a live cluster.
        let expected = {
            let d = digest::digest(&digest::SHA256, b"nid/v1/bucket/rid\0RID-0001");
            u16::from_be_bytes([d.as_ref()[0], d.as_ref()[1]]) % BUCKETS
        };
        assert_eq!(bucket_of_key(KeyDomain::Rid, b"RID-0001").get(), expected);
    }

    /// Chi-square test of the RID bucket distribution over all 16384 buckets.
    #[test]
    fn rid_buckets_are_uniform() {
        let per_bucket = 16u64;
        let samples = u64::from(BUCKETS) * per_bucket;
        let mut counts = vec![0u64; usize::from(BUCKETS)];
        for i in 0..samples {
            let rid = format!("10001-{i:012}");
            counts[usize::from(bucket_of_key(KeyDomain::Rid, rid.as_bytes()).get())] += 1;
        }
        let chi_square = chi_square(&counts, per_bucket as f64);
        let dof = f64::from(BUCKETS) - 1.0;
        // Mean dof, standard deviation sqrt(2 dof): accept within 5 standard deviations.
        let bound = dof + 5.0 * (2.0 * dof).sqrt();
        assert!(chi_square < bound, "chi-square {chi_square:.0} over bound {bound:.0}");
        assert!(chi_square > dof - 5.0 * (2.0 * dof).sqrt(), "suspiciously even: {chi_square:.0}");
    }

    pub fn chi_square(counts: &[u64], expected: f64) -> f64 {
        counts
            .iter()
            .map(|&c| {
                let diff = c as f64 - expected;
                diff * diff / expected
            })
            .sum()
    }
}
