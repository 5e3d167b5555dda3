//! Enrolment on the leader side: validate the request, then choose everything random or time-based
//! (UIN candidates inside the RID's bucket, nonces, TOTP secret, timestamp) before proposing.
//!
//! Validation names the field and never quotes the value (values are personal data).

use crate::codec;
use crate::command::{EnrollCommand, EnrollSecret};
use crate::crypto::{self, Keyring};
use crate::fsm::RID_DOMAIN;
use nid_proto::bucket::{BucketId, KeyDomain, bucket_of_key};
use nid_proto::error::FieldViolations;
use nid_proto::ids::{GenerationError, IdKind, IdScheme, system_random_u64};
use nid_proto::v1::{BiometricModality, BiometricReference, Demographics, EnrollRequest, Gender};
use prost::Message as _;

/// UIN candidates proposed per enrolment; apply takes the first free one, and when all are taken
/// the leader prepares fresh ones and proposes again. Each costs about a dozen keyed permutations
/// (~100 us here, the largest CPU cost of an enrolment), so one is proposed: a collision needs a
/// second Raft round, and its chance is the bucket's fill, about 1.4% per enrolment at 1.4 billion
/// people (85k of the 6.1 million UINs of a bucket), against 2 candidates' 0.02% for ~25% more
/// leader CPU per enrolment (measured with `make bench`, see BENCHMARKS.md).
pub const CANDIDATES: usize = 1;
const MAX_BIOMETRICS: usize = 10;
const MAX_EXTENSIONS: usize = 32;
/// Upper bound on the encoded identity data (demographics, biometrics); the field limits above
/// allow more in total than one record should hold.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

/// Why an enrolment could not be prepared.
#[derive(Debug)]
pub enum PrepareError {
    /// The request is invalid.
    Invalid(FieldViolations),
    /// The system random source failed.
    Random,
}

/// Checks an enrolment request; every problem is reported with its field path.
pub fn validate(req: &EnrollRequest) -> FieldViolations {
    let mut v = FieldViolations::new();
    if req.rid.is_empty() || req.rid.len() > 64 {
        v.add("rid", "must be 1..=64 characters");
    } else if !req.rid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        v.add("rid", "may contain only A-Z, a-z, 0-9, '_' and '-'");
    }
    match &req.demographics {
        None => v.add("demographics", "is required"),
        Some(d) => validate_demographics(d, "demographics", &mut v),
    }
    validate_biometrics(&req.biometrics, "biometrics", &mut v);
    if !req.pin.is_empty()
        && (!(4..=8).contains(&req.pin.len()) || !req.pin.bytes().all(|b| b.is_ascii_digit()))
    {
        v.add("pin", "must be 4..=8 digits");
    }
    if v.is_empty() && req.encoded_len() > MAX_RECORD_BYTES {
        v.add("demographics", format!("the record may take at most {MAX_RECORD_BYTES} bytes"));
    }
    v
}

/// Checks demographics; field paths start with `prefix` (e.g. "demographics").
pub fn validate_demographics(d: &Demographics, prefix: &str, v: &mut FieldViolations) {
    let f = |name: &str| format!("{prefix}.{name}");
    let name_len = d.full_name.chars().count();
    if name_len == 0 || name_len > 256 {
        v.add(f("full_name"), "must be 1..=256 characters");
    }
    if !valid_date(&d.date_of_birth) {
        v.add(f("date_of_birth"), "must be a calendar date YYYY-MM-DD");
    }
    if Gender::try_from(d.gender).is_err() {
        v.add(f("gender"), "must be one of the Gender values");
    }
    if !d.phone.is_empty() && !valid_phone(&d.phone) {
        v.add(f("phone"), "must be E.164: '+' then 8..=15 digits");
    }
    if !d.email.is_empty() && !valid_email(&d.email) {
        v.add(f("email"), "must be an e-mail address (local@domain) of at most 254 characters");
    }
    if let Some(a) = &d.address {
        if a.lines.len() > 4 || a.lines.iter().any(|l| l.len() > 256) {
            v.add(f("address.lines"), "at most 4 lines of at most 256 bytes");
        }
        if a.locality.len() > 128 {
            v.add(f("address.locality"), "at most 128 bytes");
        }
        if a.region.len() > 128 {
            v.add(f("address.region"), "at most 128 bytes");
        }
        if a.postal_code.len() > 32 {
            v.add(f("address.postal_code"), "at most 32 bytes");
        }
        let country_ok = a.country.is_empty()
            || (a.country.len() == 2 && a.country.bytes().all(|b| b.is_ascii_uppercase()));
        if !country_ok {
            v.add(f("address.country"), "must be an ISO 3166-1 alpha-2 code");
        }
    }
    if d.extensions.len() > MAX_EXTENSIONS {
        v.add(f("extensions"), format!("at most {MAX_EXTENSIONS} entries"));
    }
    for (k, val) in &d.extensions {
        let key_ok = !k.is_empty()
            && k.len() <= 64
            && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !key_ok {
            v.add(f("extensions"), "keys must match [a-z0-9_]{1,64}");
            break;
        }
        if val.len() > 1024 {
            v.add(f("extensions"), "values must be at most 1024 bytes");
            break;
        }
    }
}

/// Checks biometric references; field paths start with `prefix`.
pub fn validate_biometrics(biometrics: &[BiometricReference], prefix: &str, v: &mut FieldViolations) {
    if biometrics.len() > MAX_BIOMETRICS {
        v.add(prefix, format!("at most {MAX_BIOMETRICS} references"));
    }
    for (i, b) in biometrics.iter().enumerate() {
        if BiometricModality::try_from(b.modality).is_err() || b.modality == 0 {
            v.add(format!("{prefix}[{i}].modality"), "must be FINGER, IRIS or FACE");
        }
        if b.template_digest.len() != 32 {
            v.add(format!("{prefix}[{i}].template_digest"), "must be 32 bytes (SHA-256)");
        }
        if b.position.len() > 64 || b.abis_reference.len() > 256 {
            v.add(format!("{prefix}[{i}]"), "position at most 64 and abis_reference at most 256 bytes");
        }
    }
}

/// E.164: '+' then 8..=15 digits.
pub fn valid_phone(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or("");
    (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A plausible e-mail address: one '@' with a non-empty local part and a dotted domain, no spaces.
pub fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else { return false };
    email.len() <= 254
        && !local.is_empty()
        && local.len() <= 64
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && !email.chars().any(char::is_whitespace)
}

/// A real calendar date YYYY-MM-DD (years 1800..=9999).
pub fn valid_date(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |r: std::ops::Range<usize>| s.get(r).and_then(|x| x.parse::<u32>().ok());
    let (Some(y), Some(m), Some(d)) = (num(0..4), num(5..7), num(8..10)) else { return false };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1800..=9999).contains(&y) && (1..=days).contains(&d)
}

/// The bucket an enrolment lives in: that of its RID.
pub fn bucket_of_rid(rid: &str) -> BucketId {
    bucket_of_key(KeyDomain::Rid, rid.as_bytes())
}

/// Builds the command for a valid request.
pub fn prepare(
    req: &EnrollRequest,
    keyring: &Keyring,
    scheme: &IdScheme,
    now_ms: u64,
) -> Result<EnrollCommand, PrepareError> {
    let violations = validate(req);
    if !violations.is_empty() {
        return Err(PrepareError::Invalid(violations));
    }
    let bucket = bucket_of_rid(&req.rid);
    let rid_hash = keyring.index_hash(RID_DOMAIN, req.rid.as_bytes());
    // Idempotency digest over the whole request (PIN and TOTP flag included), keyed so it cannot be
    // used to confirm a guess of someone's data.
    let payload_mac = keyring.index_hash(b"enroll-payload", &req.encode_to_vec());
    let mut stored = req.clone();
    stored.pin.clear();
    let pin_verifier = if req.pin.is_empty() {
        None
    } else {
        let salt = crypto::random_bytes::<16>().map_err(|_| PrepareError::Random)?;
        Some(crate::identity::pin_verifier(keyring, salt, &req.pin))
    };
    let totp_secret = if req.provision_totp {
        let mut secret = vec![0u8; 20];
        use ring::rand::SecureRandom as _;
        ring::rand::SystemRandom::new().fill(&mut secret).map_err(|_| PrepareError::Random)?;
        Some(secret)
    } else {
        None
    };
    let mut candidates = Vec::with_capacity(CANDIDATES);
    let mut random = seeded_random().map_err(|_| PrepareError::Random)?;
    for _ in 0..CANDIDATES {
        let id = scheme.generate(IdKind::Uin, bucket, &mut random).map_err(|_| PrepareError::Random)?;
        candidates.push(id.to_digits());
    }
    let secret = EnrollSecret { request: stored.encode_to_vec(), pin_verifier, totp_secret, candidates };
    let seal_nonce = crypto::random_nonce().map_err(|_| PrepareError::Random)?;
    Ok(EnrollCommand {
        bucket: bucket.get(),
        rid_hash,
        sealed: keyring.seal(&rid_hash, seal_nonce, &codec::encode(&secret)),
        payload_mac,
        now_ms,
        seed: crypto::random_bytes::<16>().map_err(|_| PrepareError::Random)?,
    })
}

/// A random stream for one enrolment: one 32-byte seed from the system CSPRNG, expanded with
/// SHA-256 in counter mode (a getrandom call per draw costs more than the draw is worth here).
pub(crate) fn seeded_random() -> Result<impl FnMut() -> Result<u64, GenerationError>, GenerationError> {
    let seed = [system_random_u64()?, system_random_u64()?, system_random_u64()?, system_random_u64()?];
    let mut counter = 0u64;
    let mut pool: Vec<u64> = Vec::new();
    Ok(move || {
        if pool.is_empty() {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            for word in seed {
                ctx.update(&word.to_be_bytes());
            }
            ctx.update(&counter.to_be_bytes());
            counter += 1;
            let digest = ctx.finish();
            pool = digest
                .as_ref()
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                .collect();
        }
        Ok(pool.pop().unwrap_or(0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nid_proto::v1::Demographics;

    fn request(rid: &str) -> EnrollRequest {
        EnrollRequest {
            rid: rid.into(),
            demographics: Some(Demographics {
                full_name: "Test Person".into(),
                date_of_birth: "1990-02-28".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn fields(req: &EnrollRequest) -> Vec<String> {
        validate(req).violations().iter().map(|(f, _)| f.clone()).collect()
    }

    #[test]
    fn valid_request_has_no_violations() {
        assert!(fields(&request("RID-001_a")).is_empty());
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(fields(&request("")), vec!["rid"]);
        assert_eq!(fields(&request("a b")), vec!["rid"]);
        let mut r = request("R1");
        r.demographics = None;
        assert_eq!(fields(&r), vec!["demographics"]);
        let mut r = request("R1");
        r.demographics.as_mut().unwrap().date_of_birth = "1990-02-30".into();
        assert_eq!(fields(&r), vec!["demographics.date_of_birth"]);
        let mut r = request("R1");
        r.demographics.as_mut().unwrap().full_name.clear();
        r.pin = "12a4".into();
        assert_eq!(fields(&r), vec!["demographics.full_name", "pin"]);
        let mut r = request("R1");
        r.demographics.as_mut().unwrap().phone = "12345678".into();
        assert_eq!(fields(&r), vec!["demographics.phone"]);
        let mut r = request("R1");
        r.demographics.as_mut().unwrap().address = Some(nid_proto::v1::Address {
            lines: vec!["x".repeat(300)],
            country: "india".into(),
            ..Default::default()
        });
        assert_eq!(fields(&r), vec!["demographics.address.lines", "demographics.address.country"]);
    }

    #[test]
    fn violations_never_quote_the_value() {
        let mut r = request("R1");
        r.demographics.as_mut().unwrap().full_name = "x".repeat(300);
        r.pin = "99999999999".into();
        for (_, description) in validate(&r).violations() {
            assert!(!description.contains("xxx") && !description.contains("9999"), "{description}");
        }
    }

    #[test]
    fn prepared_command_carries_no_plaintext() {
        let keyring = Keyring::dev();
        let scheme = IdScheme::dev();
        let mut r = request("RID-SECRET-42");
        r.pin = "4321".into();
        let cmd = prepare(&r, &keyring, &scheme, 1_700_000_000_000).unwrap();
        let bytes = codec::encode(&crate::command::Command::Enroll(cmd.clone()));
        for needle in [&b"RID-SECRET-42"[..], b"Test Person", b"4321", b"1990-02-28"] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "plaintext in the log entry");
        }
        assert_eq!(cmd.bucket, bucket_of_rid("RID-SECRET-42").get());
        let secret: EnrollSecret = codec::decode(&keyring.open(&cmd.rid_hash, &cmd.sealed).unwrap()).unwrap();
        assert_eq!(secret.candidates.len(), CANDIDATES);
        for c in &secret.candidates {
            assert_eq!(
                scheme.parse(c).unwrap().bucket().get(),
                cmd.bucket,
                "candidates live in the RID's bucket"
            );
        }
    }
}
