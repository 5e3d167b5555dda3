//! TOTP (RFC 6238: HMAC-SHA1, 30-second steps, 6 digits, one step of drift either way), with the
//! rule that a step once accepted is never accepted again.

use crate::keyring::ct_eq;

/// TOTP time step, seconds.
pub const STEP_SECS: u64 = 30;

/// The 6-digit code for time step `step`.
pub fn code(secret: &[u8], step: u64) -> u32 {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = ring::hmac::sign(&key, &step.to_be_bytes());
    let mac = mac.as_ref();
    let offset = usize::from(mac[mac.len() - 1] & 0x0f);
    let bin = (u32::from(mac[offset]) & 0x7f) << 24
        | u32::from(mac[offset + 1]) << 16
        | u32::from(mac[offset + 2]) << 8
        | u32::from(mac[offset + 3]);
    bin % 1_000_000
}

/// The step a code matches (the current one, one before or one after), if any, and only if that
/// step is later than the last step accepted.
pub fn check(secret: &[u8], given: &str, now_ms: u64, last_step: u64) -> Option<u64> {
    if given.len() != 6 || !given.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let current = now_ms / 1000 / STEP_SECS;
    let mut found = None;
    // Every window step is computed (no early exit) so timing does not tell which step matched.
    for step in [current.saturating_sub(1), current, current + 1] {
        let expected = format!("{:06}", code(secret, step));
        if ct_eq(expected.as_bytes(), given.as_bytes()) && step > last_step && found.is_none() {
            found = Some(step);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_vector_and_the_window() {
        // RFC 6238 appendix B, SHA-1, T = 59 s: 94287082 (8 digits) -> 287082.
        assert_eq!(code(b"12345678901234567890", 59 / 30), 287_082);
        let secret = b"12345678901234567890";
        let now = 1_000_000_000_000u64;
        let step = now / 1000 / STEP_SECS;
        let c = format!("{:06}", code(secret, step));
        assert_eq!(check(secret, &c, now, 0), Some(step));
        assert_eq!(check(secret, &c, now, step), None, "never twice");
        let previous = format!("{:06}", code(secret, step - 1));
        assert_eq!(check(secret, &previous, now, 0), Some(step - 1));
        let old = format!("{:06}", code(secret, step - 2));
        assert_eq!(check(secret, &old, now, 0), None);
        assert_eq!(check(secret, "12345", now, 0), None);
    }
}
