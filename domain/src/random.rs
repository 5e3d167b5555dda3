//! Randomness for the leader's choices (UIN and VID candidates, salts, nonces, seeds): the
//! operating system's CSPRNG through ring, and a ChaCha20 stream seeded from it when many draws are
//! needed at once (a system call per draw costs more than the draw is worth).

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore as _, SeedableRng as _};
use ring::rand::SecureRandom as _;

/// The system random source failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the system random source failed")]
pub struct RandomError;

/// `N` fresh bytes from the system CSPRNG.
pub fn bytes<const N: usize>() -> Result<[u8; N], RandomError> {
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut out).map_err(|_| RandomError)?;
    Ok(out)
}

/// A ChaCha20 stream seeded from the system CSPRNG.
pub struct Stream(ChaCha20Rng);

impl Stream {
    /// A fresh stream.
    pub fn new() -> Result<Stream, RandomError> {
        Ok(Stream(ChaCha20Rng::from_seed(bytes::<32>()?)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        self.0.fill_bytes(out);
    }

    /// `N` random bytes.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        self.0.fill_bytes(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_and_draws_differ() {
        let (mut a, mut b) = (Stream::new().unwrap(), Stream::new().unwrap());
        let x = a.next_u64();
        assert_ne!(x, a.next_u64());
        assert_ne!(a.array::<16>(), b.array::<16>());
        assert_ne!(bytes::<16>().unwrap(), bytes::<16>().unwrap());
    }
}
