//! Who may call the router's public services over mutual TLS (checked before any request byte is
//! parsed, `nid_support::access`). The certificate gives the role; the services' own checks
//! (a partner's API key, the admin token) still apply on top.
//!
//! | service | roles |
//! |---|---|
//! | `Enrollment` (enrol, read, update, status, VIDs, locks, history) | enroller, admin |
//! | `Authentication.Authenticate` | partner |
//! | `Authentication.GetAuthHistory` | enroller, admin |
//! | `Authentication.GetSigningKeys` | any cluster certificate (public keys) |
//! | `Admin` | admin |
//! | `Diagnostics`, health, reflection | any cluster certificate |

use nid_support::access::{Call, Policy};
use nid_support::tls::Peer;
use std::sync::Arc;

/// The router's policy.
pub fn policy() -> Policy {
    Arc::new(|call: &Call<'_>| {
        let enroller = matches!(call.peer, Peer::Enroller(_) | Peer::Admin(_));
        match (call.service, call.method) {
            ("nid.v1.Enrollment", _) => enroller,
            ("nid.v1.Authentication", "Authenticate") => matches!(call.peer, Peer::Partner(_)),
            ("nid.v1.Authentication", "GetSigningKeys") => true,
            ("nid.v1.Authentication", _) => enroller,
            ("nid.v1.Admin", _) => matches!(call.peer, Peer::Admin(_)),
            ("nid.v1.Diagnostics", _) => true,
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_public_service_admits_its_roles() {
        let p = policy();
        let headers = http::HeaderMap::new();
        let allowed =
            |service: &str, method: &str, peer: &Peer| p(&Call { service, method, peer, headers: &headers });
        let enroller = Peer::Enroller("c1".into());
        let partner = Peer::Partner("bank".into());
        let admin = Peer::Admin("admin".into());
        let router = Peer::Router("router".into());
        let cell = Peer::Cell { cell: 1, node: 1 };
        assert!(allowed("nid.v1.Enrollment", "Enroll", &enroller));
        assert!(allowed("nid.v1.Enrollment", "Enroll", &admin));
        for p in [&partner, &router, &cell] {
            assert!(!allowed("nid.v1.Enrollment", "Enroll", p), "{p}");
            assert!(!allowed("nid.v1.Admin", "AddCell", p), "{p}");
        }
        assert!(allowed("nid.v1.Authentication", "Authenticate", &partner));
        assert!(!allowed("nid.v1.Authentication", "Authenticate", &enroller));
        assert!(!allowed("nid.v1.Authentication", "GetAuthHistory", &partner));
        assert!(allowed("nid.v1.Authentication", "GetSigningKeys", &partner));
        assert!(allowed("nid.v1.Admin", "AddCell", &admin));
        assert!(!allowed("nid.v1.Admin", "AddCell", &enroller));
        assert!(!allowed("nid.v1.Cell", "Execute", &admin));
    }
}
