//! Who may call a replica, and how a replica dials others: the access policy the TLS listener
//! enforces before any request is parsed (`nid_support::access`), the Raft sender check, and the
//! mutual-TLS [`Dialer`].
//!
//! | service | data replica of cell C | control replica |
//! |---|---|---|
//! | `RaftTransport` | replicas of C | control replicas |
//! | `Cell.Execute`, `Cell.Echo` | routers (which name the caller in the route header) | — |
//! | `Cell.GetSigningKeys` | routers, admins | — |
//! | `Cell.GetCellStatus`, `Cell.GetKeyGenerations` | routers, admins, control replicas, replicas of C | routers, admins, control replicas |
//! | `Cell.ChangeMembership`, `Cell.TransferLeader`, `Cell.ActivateKeyGeneration` | admins | admins |
//! | `BucketAdmin` | control replicas (the rebalancer), admins | — |
//! | `Control` reads | — | routers, control replicas, admins |
//! | `Control` writes | — | admins, control replicas, and routers forwarding a valid admin credential (`authorization: Bearer`) |
//! | health, reflection | any cluster certificate | any cluster certificate |

use crate::config::Role;
use nid_engine::transport::{Connecting, Dialer};
use nid_engine::transport_service::SenderOf;
use nid_support::access::{Call, Policy, bearer};
use nid_support::secret::AdminToken;
use nid_support::tls::{Dial, Peer};
use std::sync::Arc;

/// `Control` methods that change nothing.
const CONTROL_READS: &[&str] = &[
    "GetClusterConfig",
    "GetRoutingTable",
    "WatchRoutingTable",
    "ListCells",
    "ListMigrations",
    "ListPartnersInternal",
];

/// The policy of a replica of `cell_id` in `role`; a control replica given the admin
/// credential lets routers write on behalf of the admin whose credential they forward.
pub fn policy(role: Role, cell_id: u64, admin: Option<AdminToken>) -> Policy {
    Arc::new(move |call: &Call<'_>| {
        let (service, method, peer) = (call.service, call.method, call.peer);
        let member = match (role, peer) {
            (Role::Data, Peer::Cell { cell, .. }) => *cell == cell_id,
            (Role::Control, Peer::Control { .. }) => true,
            _ => false,
        };
        let operator = matches!(peer, Peer::Admin(_) | Peer::Control { .. });
        match (role, service) {
            (_, "nid.v1.RaftTransport") => member,
            (_, "nid.v1.Cell") => {
                let router = matches!(peer, Peer::Router(_));
                let admin = matches!(peer, Peer::Admin(_));
                match method {
                    "Execute" | "Echo" => router && role == Role::Data,
                    "GetSigningKeys" => (router || admin) && role == Role::Data,
                    "GetCellStatus" | "GetKeyGenerations" => member || operator || router,
                    // ChangeMembership, TransferLeader, ActivateKeyGeneration, anything new.
                    _ => admin,
                }
            }
            (Role::Data, "nid.v1.BucketAdmin") => operator,
            (Role::Control, "nid.v1.Control") => {
                operator
                    || (matches!(peer, Peer::Router(_))
                        && (CONTROL_READS.contains(&method)
                            || admin.as_ref().zip(bearer(call.headers)).is_some_and(|(a, t)| a.matches(t))))
            }
            _ => false,
        }
    })
}

/// The node id of a member of this cell by its certificate (the Raft sender check).
pub fn sender_of(role: Role, cell_id: u64) -> SenderOf {
    Arc::new(move |extensions| match (role, nid_support::tls::peer_of(extensions)?) {
        (Role::Data, Peer::Cell { cell, node }) if cell == cell_id => Some(node),
        (Role::Control, Peer::Control { node }) => Some(node),
        _ => None,
    })
}

/// Dials replicas of role `server_name` (`cell` or `control`), over TLS when configured.
pub struct ReplicaDialer {
    /// Plaintext or TLS.
    pub dial: Dial,
    /// The role the server must hold.
    pub server_name: &'static str,
}

impl Dialer for ReplicaDialer {
    fn connect(&self, endpoint: tonic::transport::Endpoint) -> Connecting {
        let (dial, name) = (self.dial.clone(), self.server_name);
        Box::pin(async move { dial.connect(endpoint, name).await })
    }

    fn connect_lazy(&self, endpoint: tonic::transport::Endpoint) -> tonic::transport::Channel {
        self.dial.connect_lazy(endpoint, self.server_name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_internal_service_admits_only_its_callers() {
        let token = AdminToken::from_token("c0ffee");
        let (data, control) = (policy(Role::Data, 3, None), policy(Role::Control, 0, Some(token)));
        let none = http::HeaderMap::new();
        let mut forwarded = http::HeaderMap::new();
        forwarded.insert("authorization", http::HeaderValue::from_static("Bearer c0ffee"));
        let mut wrong = http::HeaderMap::new();
        wrong.insert("authorization", http::HeaderValue::from_static("Bearer c0ffef"));
        let call = |p: &Policy, service: &str, method: &str, peer: &Peer, headers: &http::HeaderMap| {
            p(&Call { service, method, peer, headers })
        };
        let data = |s: &str, m: &str, peer: &Peer| call(&data, s, m, peer, &none);
        let control_with = |s: &str, m: &str, peer: &Peer, h: &http::HeaderMap| call(&control, s, m, peer, h);
        let control = |s: &str, m: &str, peer: &Peer| call(&control, s, m, peer, &none);
        let router = Peer::Router("router".into());
        let admin = Peer::Admin("admin".into());
        let same = Peer::Cell { cell: 3, node: 2 };
        let other = Peer::Cell { cell: 4, node: 2 };
        let ctl = Peer::Control { node: 1 };
        let partner = Peer::Partner("bank".into());
        let enroller = Peer::Enroller("c1".into());
        assert!(data("nid.v1.RaftTransport", "SendMessages", &same));
        for p in [&other, &router, &admin, &ctl, &partner] {
            assert!(!data("nid.v1.RaftTransport", "SendMessages", p), "{p}");
        }
        assert!(data("nid.v1.Cell", "Execute", &router));
        for p in [&admin, &ctl, &same, &other, &partner, &enroller] {
            assert!(!data("nid.v1.Cell", "Execute", p), "only routers name callers: {p}");
        }
        for p in [&router, &admin, &ctl, &same] {
            assert!(data("nid.v1.Cell", "GetCellStatus", p), "{p}");
            assert!(data("nid.v1.Cell", "GetKeyGenerations", p), "{p}");
        }
        for method in ["ChangeMembership", "TransferLeader", "ActivateKeyGeneration"] {
            assert!(data("nid.v1.Cell", method, &admin));
            assert!(control("nid.v1.Cell", method, &admin));
            for p in [&router, &ctl, &same, &partner] {
                assert!(!data("nid.v1.Cell", method, p), "{method} {p}");
                assert!(!control("nid.v1.Cell", method, p), "{method} {p}");
            }
        }
        for p in [&other, &partner, &enroller] {
            assert!(!data("nid.v1.Cell", "GetCellStatus", p), "{p}");
        }
        assert!(data("nid.v1.BucketAdmin", "SetBucketState", &ctl));
        for p in [&router, &same, &other, &partner] {
            assert!(!data("nid.v1.BucketAdmin", "SetBucketState", p), "{p}");
        }
        assert!(!data("nid.v1.Control", "GetRoutingTable", &router), "a data replica serves no Control");
        assert!(control("nid.v1.RaftTransport", "SendMessages", &ctl));
        assert!(!control("nid.v1.RaftTransport", "SendMessages", &same));
        assert!(control("nid.v1.Control", "GetRoutingTable", &router));
        assert!(control("nid.v1.Control", "RegisterCell", &admin));
        // A router writes only with the admin credential it was given.
        assert!(!control("nid.v1.Control", "RegisterCell", &router));
        assert!(!control_with("nid.v1.Control", "PutPartner", &router, &wrong));
        assert!(control_with("nid.v1.Control", "PutPartner", &router, &forwarded));
        assert!(!control_with("nid.v1.Control", "PutPartner", &partner, &forwarded));
        for p in [&same, &partner, &enroller] {
            assert!(!control("nid.v1.Control", "GetRoutingTable", p), "{p}");
            assert!(!control("nid.v1.Control", "PutPartner", p), "{p}");
        }
        assert!(!data("nid.v1.Unknown", "X", &admin));
    }
}
