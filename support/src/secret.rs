//! Secret files and the admin credential. A secret file holds at least 32 bytes as hex; the
//! admin token is that hex text, sent as `authorization: Bearer <token>`. Only its SHA-256 is
//! kept in memory, compared in constant time.

use subtle::ConstantTimeEq as _;

/// Reads a hex secret file (at least 32 bytes).
pub fn read_secret_file(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))?;
    let bytes = hex::decode(text.trim()).map_err(|_| anyhow::anyhow!("{} is not hex", path.display()))?;
    anyhow::ensure!(bytes.len() >= 32, "{} must hold at least 32 bytes (64 hex characters)", path.display());
    Ok(bytes)
}

/// The admin credential, as a digest.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// The token of the secret file at `path`.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<AdminToken> {
        Ok(AdminToken::from_token(&hex::encode(read_secret_file(path)?)))
    }

    /// The credential whose bearer token is `token`.
    pub fn from_token(token: &str) -> AdminToken {
        let mut d = [0u8; 32];
        d.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes()).as_ref());
        AdminToken(d)
    }

    /// Whether `given` is the token.
    pub fn matches(&self, given: &str) -> bool {
        AdminToken::from_token(given).0.ct_eq(&self.0).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_token_matches() {
        let t = AdminToken::from_token("00ff");
        assert!(t.matches("00ff") && t.matches(" 00ff\n"));
        assert!(!t.matches("00fe") && !t.matches(""));
    }
}
