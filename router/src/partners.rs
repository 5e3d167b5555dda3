//! Partner credentials at the router: API keys `<partner-id>.<secret>` checked against the partner
//! list held by the control cell, which stores only HMAC-SHA256(partner-credential key, secret).
//! The router holds that key (never the data keys); the control cell never sees a secret.
//!
//! The list is cached and refreshed every second (and at once, rate-limited, when an unknown partner
//! shows up), so a revocation or a new rate limit takes effect on every router within about a
//! second. An authenticated partner over its rate limit is refused here (`quota.rs`).

use crate::quota::Quotas;
use crate::routing::{Authenticated, Router};
use nid_proto::error::status_with_reason;
use nid_proto::v1::{AuthType, ErrorReason, ListPartnersInternalRequest, PartnerRecord};
use ring::hmac;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

const REFRESH: Duration = Duration::from_secs(1);
const ON_DEMAND_MIN: Duration = Duration::from_millis(250);

/// The partner-credential key and the cached partner list.
pub struct Partners {
    key: hmac::Key,
    quotas: Quotas,
    cache: RwLock<(u64, HashMap<String, PartnerRecord>)>,
    last_fetch: Mutex<Option<Instant>>,
}

fn unauthenticated(message: &str) -> Status {
    status_with_reason(Code::Unauthenticated, message, ErrorReason::UnauthenticatedPartner, &[])
}

/// The `nid.v1.AuthType` of a grant name.
pub fn auth_type_of(name: &str) -> Option<AuthType> {
    match name {
        "demographic" => Some(AuthType::Demographic),
        "pin" => Some(AuthType::Pin),
        "totp" => Some(AuthType::Totp),
        _ => None,
    }
}

impl Partners {
    /// Partners checked under `key`, rate-limited by `quotas`.
    pub fn new(key: &[u8], quotas: Quotas) -> Partners {
        Partners {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            quotas,
            cache: RwLock::default(),
            last_fetch: Mutex::default(),
        }
    }

    /// The stored verifier of an API-key secret.
    pub fn digest(&self, secret: &str) -> Vec<u8> {
        hmac::sign(&self.key, secret.as_bytes()).as_ref().to_vec()
    }

    /// Fetches the partner list from the control cell.
    pub async fn refresh(&self, router: &Router) -> Result<(), Status> {
        if let Ok(mut last) = self.last_fetch.lock() {
            *last = Some(Instant::now());
        }
        let list = router
            .control_read(
                |mut c| async move { c.list_partners_internal(ListPartnersInternalRequest {}).await },
            )
            .await?;
        let map = list
            .partners
            .into_iter()
            .filter_map(|p| p.partner.as_ref().map(|x| x.partner_id.clone()).map(|id| (id, p)))
            .collect();
        if let Ok(mut cache) = self.cache.write()
            && list.partners_version >= cache.0
        {
            *cache = (list.partners_version, map);
        }
        Ok(())
    }

    /// Keeps the list fresh in the background.
    pub fn spawn_refresher(self: &Arc<Self>, router: Arc<Router>) {
        let partners = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = partners.refresh(&router).await {
                    tracing::debug!(code = ?e.code(), "partner list refresh failed");
                }
                tokio::time::sleep(REFRESH).await;
            }
        });
    }

    fn lookup(&self, id: &str) -> Option<PartnerRecord> {
        self.cache.read().ok().and_then(|c| c.1.get(id).cloned())
    }

    /// All cached partners.
    pub fn list(&self) -> Vec<PartnerRecord> {
        let mut out: Vec<_> = self.cache.read().map(|c| c.1.values().cloned().collect()).unwrap_or_default();
        out.sort_by(|a, b| {
            let id = |r: &PartnerRecord| r.partner.as_ref().map(|p| p.partner_id.clone()).unwrap_or_default();
            id(a).cmp(&id(b))
        });
        out
    }

    /// Authenticates the partner of a request from `authorization: Bearer <partner-id>.<secret>`.
    /// Errors never echo the credential.
    pub async fn authenticate(
        &self,
        router: &Router,
        metadata: &MetadataMap,
    ) -> Result<Authenticated, Status> {
        let header = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthenticated("a partner API key is required (authorization: Bearer <key>)"))?;
        let key = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthenticated("the authorization header must be Bearer"))?;
        let (id, secret) = key
            .split_once('.')
            .ok_or_else(|| unauthenticated("the API key must read <partner-id>.<secret>"))?;
        let mut record = self.lookup(id);
        if record.is_none() {
            let due =
                self.last_fetch.lock().map(|l| l.is_none_or(|t| t.elapsed() > ON_DEMAND_MIN)).unwrap_or(true);
            if due {
                let _ = self.refresh(router).await;
                record = self.lookup(id);
            }
        }
        let record = record.ok_or_else(|| unauthenticated("unknown partner or wrong API key"))?;
        let partner = record.partner.unwrap_or_default();
        let digest = self.digest(secret);
        let matches = digest.len() == record.secret_digest.len()
            && digest.iter().zip(&record.secret_digest).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if !matches {
            return Err(unauthenticated("unknown partner or wrong API key"));
        }
        if partner.revoked {
            return Err(unauthenticated("the partner is revoked"));
        }
        self.quotas.admit(&partner.partner_id, partner.rate_per_second, partner.burst)?;
        let allowed =
            partner.allowed_auth_types.iter().filter_map(|t| auth_type_of(t)).map(|t| t as i32).collect();
        Ok(Authenticated { partner_id: partner.partner_id, allowed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_keyed() {
        let quotas = || Quotas::new(1.0, &prometheus::Registry::new()).unwrap();
        let a = Partners::new(&[1; 32], quotas());
        let b = Partners::new(&[2; 32], quotas());
        assert_eq!(a.digest("s"), a.digest("s"));
        assert_ne!(a.digest("s"), b.digest("s"));
        assert_ne!(a.digest("s"), a.digest("t"));
    }

    #[test]
    fn grant_names_map_to_auth_types() {
        assert_eq!(auth_type_of("pin"), Some(AuthType::Pin));
        assert_eq!(auth_type_of("bio"), None);
    }
}
