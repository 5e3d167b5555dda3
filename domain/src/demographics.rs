//! Demographic matching without the demographics: at enrolment and update the leader stores keyed
//! digests of each field, exact and normalized ([`digests`]); an authentication's demographic
//! factor becomes digests of the given fields in the requested mode ([`claim`]), and the decision
//! compares digests in constant time ([`matches`]). Replicas never open the cold record to decide.
//!
//! NORMALIZED is Unicode NFKC, full case folding, NFKC again, whitespace collapsed.

use crate::commands::DemographicClaim;
use crate::keyring::{Keyring, ct_eq};
use crate::records::{DemographicDigests, StoredDemographics};
use nid_proto::v1::{DemographicFactor, MatchMode};
use unicode_normalization::UnicodeNormalization as _;

const FULL_NAME: &[u8] = b"full_name";
const DATE_OF_BIRTH: &[u8] = b"date_of_birth";
const PHONE: &[u8] = b"phone";
const EMAIL: &[u8] = b"email";

/// Unicode NFKC, full case fold, whitespace collapsed: the NORMALIZED match mode.
pub fn normalize(s: &str) -> String {
    let nfkc: String = s.nfkc().collect();
    let folded = caseless::default_case_fold_str(&nfkc);
    let renormalized: String = folded.nfkc().collect();
    renormalized.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn both(keyring: &Keyring, field: &[u8], value: &str) -> (Vec<u8>, Vec<u8>) {
    (
        keyring.demographic_digest(field, value).to_vec(),
        keyring.demographic_digest(field, &normalize(value)).to_vec(),
    )
}

/// The digests of stored demographics.
pub fn digests(keyring: &Keyring, d: &StoredDemographics) -> DemographicDigests {
    let (full_name, full_name_normalized) = both(keyring, FULL_NAME, &d.full_name);
    let (date_of_birth, date_of_birth_normalized) = both(keyring, DATE_OF_BIRTH, &d.date_of_birth);
    let (phone, phone_normalized) = both(keyring, PHONE, &d.phone);
    let (email, email_normalized) = both(keyring, EMAIL, &d.email);
    DemographicDigests {
        full_name,
        full_name_normalized,
        date_of_birth,
        date_of_birth_normalized,
        phone,
        phone_normalized,
        email,
        email_normalized,
        gender: d.gender,
    }
}

/// The claim of a demographic factor: digests of the fields given, in its match mode.
pub fn claim(keyring: &Keyring, f: &DemographicFactor) -> DemographicClaim {
    let normalized = f.match_mode == MatchMode::Normalized as i32;
    let digest = |field: &[u8], value: &str| {
        if value.is_empty() {
            Vec::new()
        } else if normalized {
            keyring.demographic_digest(field, &normalize(value)).to_vec()
        } else {
            keyring.demographic_digest(field, value).to_vec()
        }
    };
    DemographicClaim {
        normalized,
        full_name: digest(FULL_NAME, &f.full_name),
        date_of_birth: digest(DATE_OF_BIRTH, &f.date_of_birth),
        phone: digest(PHONE, &f.phone),
        email: digest(EMAIL, &f.email),
        gender: f.gender,
    }
}

/// Whether every field the claim gives matches the stored digests (and it gives at least one).
pub fn matches(claim: &DemographicClaim, stored: &DemographicDigests) -> bool {
    let pick =
        |exact: &[u8], normalized: &[u8]| if claim.normalized { normalized.to_vec() } else { exact.to_vec() };
    let mut compared = 0;
    let mut all = true;
    for (given, have) in [
        (&claim.full_name, pick(&stored.full_name, &stored.full_name_normalized)),
        (&claim.date_of_birth, pick(&stored.date_of_birth, &stored.date_of_birth_normalized)),
        (&claim.phone, pick(&stored.phone, &stored.phone_normalized)),
        (&claim.email, pick(&stored.email, &stored.email_normalized)),
    ] {
        if !given.is_empty() {
            compared += 1;
            // No early exit: every given field is compared.
            all &= ct_eq(given, &have);
        }
    }
    if claim.gender != 0 {
        compared += 1;
        all &= claim.gender == stored.gender;
    }
    compared > 0 && all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> StoredDemographics {
        StoredDemographics {
            full_name: "Ana  María Núñez".into(),
            date_of_birth: "1990-01-31".into(),
            gender: 1,
            phone: "+15550001111".into(),
            ..Default::default()
        }
    }

    fn factor(name: &str, mode: MatchMode) -> DemographicFactor {
        DemographicFactor { full_name: name.into(), match_mode: mode as i32, ..Default::default() }
    }

    #[test]
    fn exact_and_normalized_matching_through_digests() {
        let k = Keyring::dev();
        let d = digests(&k, &stored());
        assert!(matches(&claim(&k, &factor("Ana  María Núñez", MatchMode::Exact)), &d));
        assert!(!matches(&claim(&k, &factor("ana maría núñez", MatchMode::Exact)), &d));
        assert!(matches(&claim(&k, &factor("  ANA MARÍA   NÚÑEZ ", MatchMode::Normalized)), &d));
        assert!(!matches(&claim(&k, &factor("Ana Maria Nunez", MatchMode::Normalized)), &d), "accents count");
        let mut f = factor("Ana  María Núñez", MatchMode::Exact);
        f.date_of_birth = "1990-01-30".into();
        assert!(!matches(&claim(&k, &f), &d), "every given field must match");
        f.date_of_birth = "1990-01-31".into();
        f.gender = 2;
        assert!(!matches(&claim(&k, &f), &d));
        assert!(!matches(&claim(&k, &DemographicFactor::default()), &d), "nothing given, nothing matched");
        let mut phone = DemographicFactor { phone: "+15550001111".into(), ..Default::default() };
        assert!(matches(&claim(&k, &phone), &d));
        phone.email = "a@b.c".into();
        assert!(!matches(&claim(&k, &phone), &d), "an e-mail that was never enrolled does not match");
        assert_eq!(normalize("Straße"), normalize("STRASSE"), "full case folding");
    }
}
