//! Properties of the identifier scheme.

use super::*;
use proptest::prelude::*;

/// A small deterministic generator (SplitMix64) so tests and pinned vectors are reproducible.
fn splitmix(mut state: u64) -> impl FnMut() -> Result<u64, GenerationError> {
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Ok(z ^ (z >> 31))
    }
}

fn bucket(b: u32) -> BucketId {
    BucketId::new(b).unwrap()
}

#[test]
fn generated_ids_parse_back_into_their_bucket() {
    let scheme = IdScheme::dev();
    let mut random = splitmix(7);
    for kind in [IdKind::Uin, IdKind::Vid] {
        for b in [0, 1, 777, 8191, 16383] {
            let id = scheme.generate(kind, bucket(b), &mut random).unwrap();
            let text = id.to_digits();
            assert_eq!(text.len(), kind.digits());
            let parsed = scheme.parse(&text).unwrap();
            assert_eq!(parsed, id);
            assert_eq!(parsed.bucket().get() as u32, b);
            assert_eq!(parsed.kind(), kind);
        }
    }
}

#[test]
fn pinned_vectors_do_not_change() {
    // A change to the permutation, the key derivation or the filters would re-bucket every
    // identifier of a live cluster: these vectors make such a change fail loudly.
    let scheme = IdScheme::dev();
    let uin = scheme.generate(IdKind::Uin, bucket(777), &mut splitmix(1)).unwrap();
    let vid = scheme.generate(IdKind::Vid, bucket(777), &mut splitmix(1)).unwrap();
    assert_eq!(uin.to_digits(), PINNED_UIN);
    assert_eq!(vid.to_digits(), PINNED_VID);
    assert_eq!(
        IdSchemeSeed::dev().to_hex(),
        "41683e6f3a96ff3eff7aa93e2ec9d08b80da6f1cfb3829ce4f15d091845ad723",
    );
}

const PINNED_UIN: &str = "863850780513";
const PINNED_VID: &str = "7152983641972518";

#[test]
fn every_single_substitution_and_adjacent_transposition_is_rejected() {
    let scheme = IdScheme::dev();
    let mut random = splitmix(42);
    for kind in [IdKind::Uin, IdKind::Vid] {
        for b in (0..16384).step_by(797) {
            let text = scheme.generate(kind, bucket(b), &mut random).unwrap().to_digits();
            let digits = text.as_bytes();
            for pos in 0..digits.len() {
                for replacement in b'0'..=b'9' {
                    if replacement == digits[pos] {
                        continue;
                    }
                    let mut wrong = digits.to_vec();
                    wrong[pos] = replacement;
                    let wrong = String::from_utf8(wrong).unwrap();
                    assert_eq!(scheme.parse(&wrong), Err(IdError::CheckDigit));
                }
            }
            for pos in 0..digits.len() - 1 {
                // Generated ids never repeat adjacent digits, so every swap changes the number.
                let mut wrong = digits.to_vec();
                wrong.swap(pos, pos + 1);
                let wrong = String::from_utf8(wrong).unwrap();
                assert_eq!(scheme.parse(&wrong), Err(IdError::CheckDigit));
            }
        }
    }
}

#[test]
fn malformed_input_is_rejected_with_the_reason() {
    let scheme = IdScheme::dev();
    assert_eq!(scheme.parse(""), Err(IdError::Empty));
    assert_eq!(
        scheme.parse("12345"),
        Err(IdError::WrongLength { actual: 5, expected: "12 (UIN) or 16 (VID)" })
    );
    assert_eq!(scheme.parse("2345678901a3"), Err(IdError::NotDigits { position: 10 }));
    assert!(matches!(scheme.parse_kind("2345678901234567", IdKind::Uin), Err(IdError::WrongLength { .. })));
    // Multi-byte input is measured in bytes and refused, never sliced.
    assert!(scheme.parse("２３４５６７８９０１").is_err());
}

#[test]
fn messages_never_contain_the_identifier() {
    let scheme = IdScheme::dev();
    let text = scheme.generate(IdKind::Uin, bucket(5), &mut splitmix(3)).unwrap().to_digits();
    let mut wrong = text.clone().into_bytes();
    wrong[3] = if wrong[3] == b'9' { b'8' } else { wrong[3] + 1 };
    let wrong = String::from_utf8(wrong).unwrap();
    let error = scheme.parse(&wrong).unwrap_err();
    assert!(!error.to_string().contains(&wrong));
    let id = scheme.parse(&text).unwrap();
    assert!(!format!("{id:?}").contains(&text));
}

#[test]
fn another_clusters_ids_are_mostly_refused() {
    // With another seed the check digit still passes, but the preimage lands outside the scheme or
    // the bucket differs: a UIN from cluster A does not silently route in cluster B.
    let ours = IdScheme::dev();
    let theirs = IdScheme::new(&IdSchemeSeed::from_bytes([9; 32]));
    let mut random = splitmix(11);
    let mut same_bucket = 0;
    for _ in 0..200 {
        let id = theirs.generate(IdKind::Uin, bucket(100), &mut random).unwrap();
        if let Ok(parsed) = ours.parse(&id.to_digits())
            && parsed.bucket().get() == 100
        {
            same_bucket += 1;
        }
    }
    assert!(same_bucket <= 2, "{same_bucket} of 200 foreign ids landed in the same bucket");
}

#[test]
fn seed_hex_round_trip_and_errors() {
    let seed = IdSchemeSeed::dev();
    assert_eq!(IdSchemeSeed::from_hex(&seed.to_hex()), Ok(seed.clone()));
    assert_eq!(IdSchemeSeed::from_hex("abc"), Err(SeedError));
    assert_eq!(IdSchemeSeed::from_hex(&"zz".repeat(32)), Err(SeedError));
    assert_eq!(IdSchemeSeed::from_hex(&"é".repeat(32)), Err(SeedError));
    assert!(!format!("{seed:?}").contains(&seed.to_hex()));
}

/// Chi-square over all 16384 buckets of the buckets of uniformly random valid UIN bodies.
#[test]
fn buckets_of_random_uins_are_uniform() {
    let scheme = IdScheme::dev();
    let mut random = splitmix(99);
    let per_bucket = 12u64;
    let mut counts = vec![0u64; usize::from(BUCKETS)];
    let mut drawn = 0;
    while drawn < u64::from(BUCKETS) * per_bucket {
        let body = random().unwrap() % IdKind::Uin.body_domain();
        let preimage = scheme.uin.backward(body);
        if preimage / u64::from(BUCKETS) >= IdKind::Uin.ranks_per_bucket() {
            continue;
        }
        counts[(preimage % u64::from(BUCKETS)) as usize] += 1;
        drawn += 1;
    }
    let chi_square = crate::bucket::tests::chi_square(&counts, per_bucket as f64);
    let dof = f64::from(BUCKETS) - 1.0;
    let bound = 5.0 * (2.0 * dof).sqrt();
    assert!((chi_square - dof).abs() < bound, "chi-square {chi_square:.0}, dof {dof}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn generation_in_bucket_b_lands_in_b(b in 0u32..16384, state in any::<u64>(), vid in any::<bool>()) {
        let scheme = IdScheme::dev();
        let kind = if vid { IdKind::Vid } else { IdKind::Uin };
        let id = scheme.generate(kind, bucket(b), &mut splitmix(state)).unwrap();
        let digits: Vec<u8> = id.to_digits().bytes().map(|c| c - b'0').collect();
        prop_assert_eq!(filters::first_violation(&digits), None);
        let parsed = scheme.parse(&id.to_digits()).unwrap();
        prop_assert_eq!(parsed.bucket().get() as u32, b);
    }

    #[test]
    fn permutation_round_trips_on_both_domains(x in any::<u64>()) {
        let scheme = IdScheme::dev();
        for kind in [IdKind::Uin, IdKind::Vid] {
            let x = x % kind.body_domain();
            let permutation = scheme.permutation(kind);
            prop_assert_eq!(permutation.backward(permutation.forward(x)), x);
        }
    }

    #[test]
    fn arbitrary_strings_never_panic(text in "\\PC{0,20}") {
        let _ = IdScheme::dev().parse(&text);
    }
}
