//! Membership changes as the admin API asks for them: validated field by field, checked against
//! the zone rule (DESIGN.md §8: every voter of a cell in its own zone, unless the cell is a dev
//! cluster), and turned into one ConfChangeV2 (several steps go through joint consensus) whose
//! context carries the added members' addresses and zones.

use crate::peer::change_context;
use crate::state::Member;
use nid_proto::error::FieldViolations;
use nid_proto::v1::ChangeMembershipRequest;
use nid_proto::v1::membership_change::Kind;
use raft::prelude::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use std::collections::{BTreeMap, BTreeSet};

/// Validates a membership request against the current members and voters, and builds the change.
/// With `allow_same_zone` false, a change that leaves two voters in one zone is refused.
pub fn change(
    req: &ChangeMembershipRequest,
    members: &[Member],
    voters: &[u64],
    allow_same_zone: bool,
) -> Result<(ConfChangeV2, Vec<Member>), FieldViolations> {
    let mut v = FieldViolations::new();
    if req.changes.is_empty() {
        v.add("changes", "at least one change is required");
    }
    let mut steps = Vec::new();
    let mut added = Vec::new();
    let mut final_voters: BTreeSet<u64> = voters.iter().copied().collect();
    for (i, c) in req.changes.iter().enumerate() {
        let field = |f: &str| format!("changes[{i}].{f}");
        if c.node_id == 0 {
            v.add(field("node_id"), "must be > 0");
        }
        let change_type = match Kind::try_from(c.kind).unwrap_or(Kind::Unspecified) {
            Kind::AddVoter => ConfChangeType::AddNode,
            Kind::AddLearner => ConfChangeType::AddLearnerNode,
            Kind::Remove => ConfChangeType::RemoveNode,
            Kind::Unspecified => {
                v.add(field("kind"), "must be ADD_VOTER, ADD_LEARNER or REMOVE");
                continue;
            }
        };
        match change_type {
            ConfChangeType::AddNode => {
                final_voters.insert(c.node_id);
            }
            _ => {
                final_voters.remove(&c.node_id);
            }
        }
        if change_type != ConfChangeType::RemoveNode {
            let known = members.iter().find(|m| m.id == c.node_id);
            let address = if c.address.is_empty() {
                known.map(|m| m.address.clone()).unwrap_or_default()
            } else {
                c.address.clone()
            };
            let zone = if c.zone.is_empty() {
                known.map(|m| m.zone.clone()).unwrap_or_default()
            } else {
                c.zone.clone()
            };
            if address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
                v.add(field("address"), "host:port is required when adding a replica");
            }
            if zone.is_empty() {
                v.add(field("zone"), "is required when adding a replica");
            }
            added.push(Member { id: c.node_id, address, zone });
        }
        let mut step = ConfChangeSingle::default();
        step.set_change_type(change_type);
        step.node_id = c.node_id;
        steps.push(step);
    }
    if v.is_empty() && !allow_same_zone {
        let zone_of = |id: u64| {
            added
                .iter()
                .find(|m| m.id == id)
                .or_else(|| members.iter().find(|m| m.id == id))
                .map(|m| m.zone.clone())
        };
        let mut by_zone: BTreeMap<String, u64> = BTreeMap::new();
        for id in &final_voters {
            let Some(zone) = zone_of(*id).filter(|z| !z.is_empty()) else { continue };
            if let Some(other) = by_zone.insert(zone, *id) {
                v.add(
                    "changes",
                    format!("voters {other} and {id} would share a zone; replicas of a cell must sit in distinct zones"),
                );
                break;
            }
        }
    }
    if !v.is_empty() {
        return Err(v);
    }
    let mut cc = ConfChangeV2::default();
    cc.set_changes(steps.into());
    if req.changes.len() > 1 {
        cc.set_transition(ConfChangeTransition::Auto);
    }
    cc.context = change_context(&added).into();
    Ok((cc, added))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nid_proto::v1::MembershipChange;

    fn step(kind: Kind, node_id: u64, address: &str, zone: &str) -> MembershipChange {
        MembershipChange { kind: kind as i32, node_id, address: address.into(), zone: zone.into() }
    }

    fn member(id: u64, zone: &str) -> Member {
        Member { id, address: format!("h:{id}"), zone: zone.into() }
    }

    fn fields(v: FieldViolations) -> Vec<String> {
        v.violations().iter().map(|(f, _)| f.clone()).collect()
    }

    #[test]
    fn requests_are_validated_field_by_field() {
        let current = vec![member(1, "a")];
        let empty = change(&ChangeMembershipRequest { changes: vec![] }, &current, &[1], false).unwrap_err();
        assert_eq!(fields(empty), vec!["changes"]);
        let bad = ChangeMembershipRequest {
            changes: vec![step(Kind::AddVoter, 0, "nope", ""), step(Kind::Unspecified, 2, "", "")],
        };
        assert_eq!(
            fields(change(&bad, &current, &[1], false).unwrap_err()),
            vec!["changes[0].node_id", "changes[0].address", "changes[0].zone", "changes[1].kind"]
        );
    }

    #[test]
    fn a_replacement_is_one_joint_change_carrying_the_new_address() {
        let current = vec![member(1, "a"), member(2, "b"), member(3, "c")];
        let req = ChangeMembershipRequest {
            changes: vec![step(Kind::AddVoter, 4, "h:4", "c"), step(Kind::Remove, 3, "", "")],
        };
        let (cc, added) = change(&req, &current, &[1, 2, 3], false).unwrap();
        assert_eq!(cc.changes.len(), 2);
        assert_eq!(cc.get_transition(), ConfChangeTransition::Auto);
        assert_eq!(added, vec![Member { id: 4, address: "h:4".into(), zone: "c".into() }]);
        let carried: crate::state::Members = nid_proto::codec::decode(&cc.context).unwrap();
        assert_eq!(carried.members, added);
    }

    #[test]
    fn two_voters_in_one_zone_are_refused_unless_the_cell_is_a_dev_cell() {
        let current = vec![member(1, "a"), member(2, "b"), member(3, "c")];
        let req = ChangeMembershipRequest { changes: vec![step(Kind::AddVoter, 4, "h:4", "a")] };
        let err = change(&req, &current, &[1, 2, 3], false).unwrap_err();
        assert_eq!(fields(err), vec!["changes"]);
        assert!(change(&req, &current, &[1, 2, 3], true).is_ok(), "dev cells may share zones");
        let learner = ChangeMembershipRequest { changes: vec![step(Kind::AddLearner, 4, "h:4", "a")] };
        assert!(change(&learner, &current, &[1, 2, 3], false).is_ok(), "a learner does not vote");
        let promote = ChangeMembershipRequest { changes: vec![step(Kind::AddVoter, 4, "", "")] };
        let with_learner = vec![member(1, "a"), member(2, "b"), member(3, "c"), member(4, "a")];
        assert!(
            change(&promote, &with_learner, &[1, 2, 3], false).is_err(),
            "promoting it is a second voter in a"
        );
    }
}
