//! Desired placement of buckets on cells (DESIGN.md §3): consistent hashing with virtual nodes and
//! weights, over a STABLE hash.
//!
//! `consistent_hash` 0.1.4 is used only through this module. Its default hasher is SipHash with
//! std's `Hash` feeding native-endian, platform-sized integers, so the ring is built with
//! [`StableHash`]: every integer is written big-endian at a fixed width into SHA-256. The same cells
//! therefore give the same placement on every machine and every Rust release, which the pinned
//! vector in the tests guards. The routing table (the actual placement) is materialized elsewhere;
//! this only says where buckets should be.

use crate::bucket::{BUCKETS, BucketId};
use consistent_hash::{Node, RingHash, StaticHashRing};
use std::hash::{Hash, Hasher};

/// Virtual nodes per unit of weight. A cell of the default weight (100) gets 3,200 points on the
/// ring, which keeps every cell within a few percent of its fair share.
pub const VNODES_PER_WEIGHT: usize = 32;
/// The weight of an ordinary cell.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest accepted weight.
pub const MAX_WEIGHT: u32 = 1000;

/// A cell taking part in placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellWeight {
    /// The cell id.
    pub cell_id: u64,
    /// Relative capacity, 1..=MAX_WEIGHT.
    pub weight: u32,
}

/// Why a placement could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No cells.
    #[error("at least one cell is required")]
    NoCells,
    /// A weight outside 1..=MAX_WEIGHT.
    #[error("cell weight must be 1..={MAX_WEIGHT}")]
    BadWeight,
    /// The same cell listed twice.
    #[error("cell {0} listed twice")]
    Duplicate(u64),
}

/// SHA-256 over fixed-width big-endian integers: independent of platform and Rust release.
#[derive(Debug, Clone, Copy, Default)]
pub struct StableHash;

/// The hasher behind [`StableHash`].
pub struct StableHasher(ring::digest::Context);

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        let digest = self.0.clone().finish();
        let mut word = [0u8; 8];
        word.copy_from_slice(&digest.as_ref()[..8]);
        u64::from_be_bytes(word)
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
    }
    fn write_u8(&mut self, i: u8) {
        self.0.update(&[i]);
    }
    fn write_u16(&mut self, i: u16) {
        self.0.update(&i.to_be_bytes());
    }
    fn write_u32(&mut self, i: u32) {
        self.0.update(&i.to_be_bytes());
    }
    fn write_u64(&mut self, i: u64) {
        self.0.update(&i.to_be_bytes());
    }
    fn write_usize(&mut self, i: usize) {
        self.0.update(&(i as u64).to_be_bytes());
    }
    fn write_i64(&mut self, i: i64) {
        self.0.update(&i.to_be_bytes());
    }
}

impl RingHash for StableHash {
    fn hash_item<T: Hash>(&self, item: &T) -> u64 {
        let mut h = StableHasher::default();
        h.write(b"nid/v1/placement/item");
        item.hash(&mut h);
        h.finish()
    }
    fn hash_vnode<K: Hash>(&self, node_key: &K, vnode_seq: usize) -> u64 {
        let mut h = StableHasher::default();
        h.write(b"nid/v1/placement/vnode");
        node_key.hash(&mut h);
        h.write_u64(vnode_seq as u64);
        h.finish()
    }
}

/// The cells of `table` that take buckets (JOINING and ACTIVE; a DRAINING cell gives its buckets
/// away) with their weights.
pub fn takers(table: &crate::v1::RoutingTable) -> Vec<CellWeight> {
    use crate::v1::CellState;
    table
        .cells
        .iter()
        .filter(|c| matches!(CellState::try_from(c.state), Ok(CellState::Joining | CellState::Active)))
        .map(|c| CellWeight { cell_id: c.cell_id, weight: c.weight })
        .collect()
}

/// Where the placement wants every bucket of `table`'s cluster, given its cells' states.
pub fn desired_for(table: &crate::v1::RoutingTable) -> Result<Vec<u64>, PlacementError> {
    desired_placement(&takers(table))
}

/// The desired owner cell of every bucket, indexed by bucket.
pub fn desired_placement(cells: &[CellWeight]) -> Result<Vec<u64>, PlacementError> {
    if cells.is_empty() {
        return Err(PlacementError::NoCells);
    }
    let mut seen = std::collections::HashSet::new();
    for c in cells {
        if !(1..=MAX_WEIGHT).contains(&c.weight) {
            return Err(PlacementError::BadWeight);
        }
        if !seen.insert(c.cell_id) {
            return Err(PlacementError::Duplicate(c.cell_id));
        }
    }
    let nodes = cells.iter().map(|c| Node::new(c.cell_id).quantity(c.weight as usize * VNODES_PER_WEIGHT));
    let ring = StaticHashRing::new(StableHash, nodes);
    Ok((0..BUCKETS)
        .map(|b| {
            let bucket = BucketId::new(u32::from(b)).map(|id| id.get()).unwrap_or(b);
            ring.calc_candidates(&bucket).next().map(|n| n.key).unwrap_or(cells[0].cell_id)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cells(ids: impl IntoIterator<Item = u64>) -> Vec<CellWeight> {
        ids.into_iter().map(|cell_id| CellWeight { cell_id, weight: DEFAULT_WEIGHT }).collect()
    }

    fn counts(placement: &[u64]) -> HashMap<u64, usize> {
        let mut m = HashMap::new();
        for &c in placement {
            *m.entry(c).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn every_cell_owns_its_share_within_ten_percent() {
        for k in 1..=16u64 {
            let placement = desired_placement(&cells(1..=k)).unwrap();
            assert_eq!(placement.len(), usize::from(BUCKETS));
            let fair = f64::from(BUCKETS) / k as f64;
            for (cell, n) in counts(&placement) {
                let ratio = n as f64 / fair;
                assert!((0.9..=1.1).contains(&ratio), "k={k}: cell {cell} owns {n} (fair {fair:.0})");
            }
        }
    }

    #[test]
    fn adding_a_cell_moves_little_and_only_to_the_new_cell() {
        for k in 1..=12u64 {
            let before = desired_placement(&cells(1..=k)).unwrap();
            let after = desired_placement(&cells(1..=k + 1)).unwrap();
            let moved: Vec<usize> = (0..before.len()).filter(|&b| before[b] != after[b]).collect();
            for &b in &moved {
                assert_eq!(after[b], k + 1, "k={k}: bucket {b} moved between old cells");
            }
            let ideal = f64::from(BUCKETS) / (k + 1) as f64;
            assert!(moved.len() as f64 <= 1.1 * ideal, "k={k}: moved {} > 1.1 x {ideal:.0}", moved.len());
        }
    }

    #[test]
    fn weights_scale_the_share() {
        let placement = desired_placement(&[
            CellWeight { cell_id: 1, weight: 100 },
            CellWeight { cell_id: 2, weight: 200 },
        ])
        .unwrap();
        let c = counts(&placement);
        let ratio = c[&2] as f64 / c[&1] as f64;
        assert!((1.8..=2.2).contains(&ratio), "{c:?}");
    }

    #[test]
    fn placement_is_independent_of_input_order_and_pinned() {
        let a = desired_placement(&cells([3, 1, 2])).unwrap();
        let b = desired_placement(&cells([1, 2, 3])).unwrap();
        assert_eq!(a, b);
        // A change of hash, vnode count or ring library would move buckets in a live cluster.
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &a.iter().flat_map(|c| c.to_be_bytes()).collect::<Vec<u8>>(),
        );
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5ddbebdcd42425a909ead964948b31aad0ec56cf6fc9165572f2febf4a683586");
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert_eq!(desired_placement(&[]), Err(PlacementError::NoCells));
        assert_eq!(
            desired_placement(&[CellWeight { cell_id: 1, weight: 0 }]),
            Err(PlacementError::BadWeight)
        );
        assert_eq!(desired_placement(&cells([1, 1])), Err(PlacementError::Duplicate(1)));
    }

    #[test]
    fn stable_hasher_is_width_and_endian_fixed() {
        let mut a = StableHasher::default();
        a.write_usize(7);
        let mut b = StableHasher::default();
        b.write_u64(7);
        assert_eq!(a.finish(), b.finish());
        assert_eq!(StableHash.hash_item(&7u16), StableHash.hash_item(&7u16));
        assert_ne!(StableHash.hash_item(&7u16), StableHash.hash_item(&8u16));
    }
}
