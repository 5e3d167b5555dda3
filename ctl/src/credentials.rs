//! Credentials nidctl presents: the admin token (normalized hex, from a flag, the environment or a
//! file) and the bearer header that carries it or a partner's API key.

use std::path::Path;

/// Reads the admin token from the flag/env or a file, normalized to lower-case hex.
pub fn admin_token(token: Option<&str>, file: Option<&Path>) -> anyhow::Result<String> {
    let text = match (token, file) {
        (Some(t), _) => t.to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("read the admin token {}: {e}", path.display()))?,
        (None, None) => anyhow::bail!("no admin token: pass --admin-token-file or set NID_ADMIN_TOKEN"),
    };
    let bytes = hex::decode(text.trim()).map_err(|_| anyhow::anyhow!("the admin token is not hex"))?;
    Ok(hex::encode(bytes))
}

/// Wraps `message` in a request carrying `authorization: Bearer <token>`.
pub fn with_bearer<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let value =
        format!("Bearer {token}").parse().map_err(|_| anyhow::anyhow!("the credential is not ASCII"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}
