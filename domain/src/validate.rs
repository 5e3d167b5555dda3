//! Validation of every public request, shared by the router (so a malformed request never costs a
//! hop) and the cell (which never trusts the router). Every problem names its field and none
//! quotes the value (values are personal data). Identifiers are parsed with the cluster's scheme,
//! so a mistyped UIN fails here with reason INVALID_IDENTIFIER.

use crate::time::{Date, millis};
use nid_proto::error::FieldViolations;
use nid_proto::ids::{IdKind, IdScheme, Identifier};
use nid_proto::v1::{
    AuthType, AuthenticateRequest, BiometricModality, BiometricReference, CreateVidRequest, Demographics,
    EnrollRequest, Gender, GetAuthHistoryRequest, GetHistoryRequest, GetIdentityRequest, IdentityStatus,
    LockAuthTypesRequest, MatchMode, RevokeVidRequest, SetStatusRequest, UpdateIdentityRequest,
    VerifyAuditChainRequest, VidKind,
};
use prost::Message as _;

/// Most biometric references per identity.
pub const MAX_BIOMETRICS: usize = 10;
/// Most extension attributes per identity.
pub const MAX_EXTENSIONS: usize = 32;
/// Upper bound on the encoded identity data (demographics, biometrics).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// Longest temporary VID lifetime.
pub const MAX_TEMPORARY_VID_MS: u64 = 30 * 24 * 3600 * 1000;
/// Most versions or audit records in one page.
pub const MAX_PAGE: u32 = 500;
/// The page size when none is asked for.
pub const DEFAULT_PAGE: u32 = 50;
/// The earliest birth year accepted.
pub const EARLIEST_BIRTH_YEAR: u32 = 1850;

/// Why a request is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// An identifier field does not parse (reason INVALID_IDENTIFIER).
    Identifier {
        /// The field.
        field: String,
        /// What is wrong (never the value).
        message: String,
    },
    /// Other fields (BadRequest field violations).
    Fields(FieldViolations),
}

impl From<FieldViolations> for Invalid {
    fn from(v: FieldViolations) -> Invalid {
        Invalid::Fields(v)
    }
}

fn done(v: FieldViolations) -> Result<(), Invalid> {
    if v.is_empty() { Ok(()) } else { Err(Invalid::Fields(v)) }
}

/// Parses an identifier field of the given kinds.
pub fn identifier(
    scheme: &IdScheme,
    field: &str,
    text: &str,
    kinds: &[IdKind],
) -> Result<Identifier, Invalid> {
    let bad = |message: String| Invalid::Identifier { field: field.to_owned(), message };
    let id = scheme.parse(text).map_err(|e| bad(format!("{field}: {e}")))?;
    if !kinds.contains(&id.kind()) {
        let want = if kinds == [IdKind::Vid] { "a VID (16 digits)" } else { "a UIN (12 digits)" };
        return Err(bad(format!("{field}: must be {want}")));
    }
    Ok(id)
}

/// Checks a RID: 1..=64 characters of [A-Za-z0-9_-].
pub fn rid(rid: &str, v: &mut FieldViolations) {
    if rid.is_empty() || rid.len() > 64 {
        v.add("rid", "must be 1..=64 characters");
    } else if !rid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        v.add("rid", "may contain only A-Z, a-z, 0-9, '_' and '-'");
    }
}

/// Checks a client-chosen request id (empty is allowed: the router assigns one).
pub fn request_id(id: &str, v: &mut FieldViolations) {
    if id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
        v.add("request_id", "must be at most 64 characters of A-Z, a-z, 0-9, '-', '_', '.', ':'");
    }
}

/// Checks an enrolment. `now_ms` is the validating process's clock (a birth date may not lie in the
/// future beyond a day of time-zone tolerance).
pub fn enroll(req: &EnrollRequest, now_ms: u64) -> Result<(), Invalid> {
    let mut v = FieldViolations::new();
    rid(&req.rid, &mut v);
    match &req.demographics {
        None => v.add("demographics", "is required"),
        Some(d) => demographics(d, "demographics", now_ms, &mut v),
    }
    biometrics(&req.biometrics, "biometrics", &mut v);
    if !req.pin.is_empty() && !pin_ok(&req.pin) {
        v.add("pin", "must be 4..=8 digits");
    }
    if v.is_empty() && req.encoded_len() > MAX_RECORD_BYTES {
        v.add("demographics", format!("the record may take at most {MAX_RECORD_BYTES} bytes"));
    }
    done(v)
}

fn pin_ok(pin: &str) -> bool {
    (4..=8).contains(&pin.len()) && pin.bytes().all(|b| b.is_ascii_digit())
}

/// Checks demographics; field paths start with `prefix` (e.g. "demographics").
pub fn demographics(d: &Demographics, prefix: &str, now_ms: u64, v: &mut FieldViolations) {
    let f = |name: &str| format!("{prefix}.{name}");
    let name_len = d.full_name.chars().count();
    if name_len == 0 || name_len > 256 {
        v.add(f("full_name"), "must be 1..=256 characters");
    }
    match Date::parse(&d.date_of_birth) {
        None => v.add(f("date_of_birth"), "must be a calendar date YYYY-MM-DD"),
        Some(date) if date.year < EARLIEST_BIRTH_YEAR => {
            v.add(f("date_of_birth"), format!("must not be before {EARLIEST_BIRTH_YEAR}"))
        }
        // A day of tolerance: the enrolment centre's date may be ahead of UTC.
        Some(date) if date > Date::from_unix_ms(now_ms.saturating_add(86_400_000)) => {
            v.add(f("date_of_birth"), "must not be in the future")
        }
        Some(_) => {}
    }
    if Gender::try_from(d.gender).is_err() {
        v.add(f("gender"), "must be one of the Gender values");
    }
    if !d.phone.is_empty() && !phone_ok(&d.phone) {
        v.add(f("phone"), "must be E.164: '+' then 8..=15 digits");
    }
    if !d.email.is_empty() && !email_ok(&d.email) {
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
        if !(a.country.is_empty()
            || (a.country.len() == 2 && a.country.bytes().all(|b| b.is_ascii_uppercase())))
        {
            v.add(f("address.country"), "must be an ISO 3166-1 alpha-2 code");
        }
    }
    if d.extensions.len() > MAX_EXTENSIONS {
        v.add(f("extensions"), format!("at most {MAX_EXTENSIONS} entries"));
    }
    let keys_ok = d.extensions.keys().all(|k| {
        !k.is_empty()
            && k.len() <= 64
            && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    });
    if !keys_ok {
        v.add(f("extensions"), "keys must match [a-z0-9_]{1,64}");
    }
    if d.extensions.values().any(|val| val.len() > 1024) {
        v.add(f("extensions"), "values must be at most 1024 bytes");
    }
}

/// Checks biometric references; field paths start with `prefix`.
pub fn biometrics(biometrics: &[BiometricReference], prefix: &str, v: &mut FieldViolations) {
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
pub fn phone_ok(phone: &str) -> bool {
    let digits = phone.strip_prefix('+').unwrap_or("");
    (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A plausible e-mail address: one '@' with a non-empty local part and a dotted domain, no spaces.
pub fn email_ok(email: &str) -> bool {
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

/// GetIdentity: a UIN or a VID.
pub fn get_identity(scheme: &IdScheme, req: &GetIdentityRequest) -> Result<Identifier, Invalid> {
    identifier(scheme, "id", &req.id, &[IdKind::Uin, IdKind::Vid])
}

/// UpdateIdentity.
pub fn update(scheme: &IdScheme, req: &UpdateIdentityRequest, now_ms: u64) -> Result<Identifier, Invalid> {
    let id = identifier(scheme, "uin", &req.uin, &[IdKind::Uin]);
    let mut v = FieldViolations::new();
    if req.expected_version == 0 {
        v.add("expected_version", "must be the version read (>= 1)");
    }
    match &req.demographics {
        None => v.add("demographics", "is required (it replaces the stored demographics whole)"),
        Some(d) => demographics(d, "demographics", now_ms, &mut v),
    }
    biometrics(&req.biometrics, "biometrics", &mut v);
    request_id(&req.request_id, &mut v);
    if v.is_empty() && req.encoded_len() > MAX_RECORD_BYTES {
        v.add("demographics", format!("the record may take at most {MAX_RECORD_BYTES} bytes"));
    }
    let id = id?;
    done(v)?;
    Ok(id)
}

/// SetStatus.
pub fn set_status(scheme: &IdScheme, req: &SetStatusRequest) -> Result<Identifier, Invalid> {
    let id = identifier(scheme, "uin", &req.uin, &[IdKind::Uin])?;
    let mut v = FieldViolations::new();
    if !matches!(
        IdentityStatus::try_from(req.status),
        Ok(IdentityStatus::Activated | IdentityStatus::Blocked | IdentityStatus::Deactivated)
    ) {
        v.add("status", "must be ACTIVATED, BLOCKED or DEACTIVATED");
    }
    let n = req.reason.chars().count();
    if n == 0 || n > 256 {
        v.add("reason", "must be 1..=256 characters");
    }
    request_id(&req.request_id, &mut v);
    done(v)?;
    Ok(id)
}

/// A page size: 0 means the default; more than [`MAX_PAGE`] is refused.
fn page(limit: u32, v: &mut FieldViolations) -> u32 {
    if limit > MAX_PAGE {
        v.add("limit", format!("at most {MAX_PAGE}"));
    }
    if limit == 0 { DEFAULT_PAGE } else { limit.min(MAX_PAGE) }
}

/// GetHistory; returns the identifier and the page size.
pub fn get_history(scheme: &IdScheme, req: &GetHistoryRequest) -> Result<(Identifier, u32), Invalid> {
    let id = identifier(scheme, "uin", &req.uin, &[IdKind::Uin])?;
    let mut v = FieldViolations::new();
    let limit = page(req.limit, &mut v);
    done(v)?;
    Ok((id, limit))
}

/// A checked CreateVid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VidRequest {
    /// The UIN.
    pub uin: Identifier,
    /// Expiry of a temporary VID (0: none).
    pub expires_ms: u64,
    /// Use limit (0: unlimited).
    pub max_uses: u32,
}

/// CreateVid.
pub fn create_vid(scheme: &IdScheme, req: &CreateVidRequest, now_ms: u64) -> Result<VidRequest, Invalid> {
    let uin = identifier(scheme, "uin", &req.uin, &[IdKind::Uin])?;
    let mut v = FieldViolations::new();
    let mut expires_ms = 0;
    let mut max_uses = 0;
    match VidKind::try_from(req.kind) {
        Ok(VidKind::Perpetual) => {
            if req.expires_at.is_some() {
                v.add("expires_at", "must be absent for a perpetual VID");
            }
            if req.max_uses != 0 {
                v.add("max_uses", "must be 0 for a perpetual VID");
            }
        }
        Ok(VidKind::Temporary) => {
            match req.expires_at.as_ref().and_then(millis) {
                Some(e) if e > now_ms && e - now_ms <= MAX_TEMPORARY_VID_MS => expires_ms = e,
                _ => v.add("expires_at", "must be in the future and at most 30 days away"),
            }
            if req.max_uses > 100 {
                v.add("max_uses", "must be 0 (unlimited until expiry) or 1..=100");
            }
            max_uses = req.max_uses;
        }
        _ => v.add("kind", "must be PERPETUAL or TEMPORARY"),
    }
    request_id(&req.request_id, &mut v);
    done(v)?;
    Ok(VidRequest { uin, expires_ms, max_uses })
}

/// RevokeVid.
pub fn revoke_vid(scheme: &IdScheme, req: &RevokeVidRequest) -> Result<Identifier, Invalid> {
    let id = identifier(scheme, "vid", &req.vid, &[IdKind::Vid])?;
    let mut v = FieldViolations::new();
    request_id(&req.request_id, &mut v);
    done(v)?;
    Ok(id)
}

fn auth_type_ok(t: i32) -> bool {
    AuthType::try_from(t).is_ok_and(|t| t != AuthType::Unspecified)
}

/// A checked LockAuthTypes: (auth type, until Unix ms or 0) to lock, and types to unlock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest {
    /// The identity (UIN or VID).
    pub id: Identifier,
    /// Locks to set.
    pub lock: Vec<(i32, u64)>,
    /// Types to unlock.
    pub unlock: Vec<i32>,
}

/// LockAuthTypes.
pub fn lock_auth_types(
    scheme: &IdScheme,
    req: &LockAuthTypesRequest,
    now_ms: u64,
) -> Result<LockRequest, Invalid> {
    let id = identifier(scheme, "id", &req.id, &[IdKind::Uin, IdKind::Vid])?;
    let mut v = FieldViolations::new();
    if req.lock.is_empty() && req.unlock.is_empty() {
        v.add("lock", "lock or unlock at least one auth type");
    }
    let mut lock = Vec::new();
    for (i, l) in req.lock.iter().enumerate() {
        if !auth_type_ok(l.auth_type) {
            v.add(format!("lock[{i}].auth_type"), "must be DEMOGRAPHIC, PIN or TOTP");
        }
        let until_ms = match &l.until {
            None => 0,
            Some(t) => match millis(t) {
                Some(ms) if ms > now_ms => ms,
                _ => {
                    v.add(format!("lock[{i}].until"), "must be in the future");
                    0
                }
            },
        };
        lock.push((l.auth_type, until_ms));
    }
    for (i, t) in req.unlock.iter().enumerate() {
        if !auth_type_ok(*t) {
            v.add(format!("unlock[{i}]"), "must be DEMOGRAPHIC, PIN or TOTP");
        } else if req.lock.iter().any(|l| l.auth_type == *t) {
            v.add(format!("unlock[{i}]"), "cannot lock and unlock the same auth type");
        }
    }
    request_id(&req.request_id, &mut v);
    done(v)?;
    Ok(LockRequest { id, lock, unlock: req.unlock.clone() })
}

/// A checked Authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthRequest {
    /// The identity (UIN or VID).
    pub id: Identifier,
    /// The partner's request time, Unix ms.
    pub request_time_ms: u64,
}

/// Checks a transaction id: 1..=64 characters of [A-Za-z0-9-_.:].
pub fn transaction_id(id: &str, v: &mut FieldViolations) {
    let ok =
        (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !ok {
        v.add("transaction_id", "must be 1..=64 characters of A-Z, a-z, 0-9, '-', '_', '.', ':'");
    }
}

/// Authenticate.
pub fn authenticate(scheme: &IdScheme, req: &AuthenticateRequest) -> Result<AuthRequest, Invalid> {
    let id = identifier(scheme, "id", &req.id, &[IdKind::Uin, IdKind::Vid]);
    let mut v = FieldViolations::new();
    transaction_id(&req.transaction_id, &mut v);
    let request_time_ms = req.request_time.as_ref().and_then(millis);
    if request_time_ms.is_none() {
        v.add("request_time", "is required (a time after 1970)");
    }
    let factors = req.factors.clone().unwrap_or_default();
    if factors.demographic.is_none() && factors.pin.is_empty() && factors.totp.is_empty() {
        v.add("factors", "present at least one factor");
    }
    if let Some(d) = &factors.demographic {
        let any = !d.full_name.is_empty()
            || !d.date_of_birth.is_empty()
            || d.gender != 0
            || !d.phone.is_empty()
            || !d.email.is_empty();
        if !any {
            v.add("factors.demographic", "set at least one field to compare");
        }
        if d.full_name.chars().count() > 256 {
            v.add("factors.demographic.full_name", "at most 256 characters");
        }
        if !d.date_of_birth.is_empty() && Date::parse(&d.date_of_birth).is_none() {
            v.add("factors.demographic.date_of_birth", "must be a calendar date YYYY-MM-DD");
        }
        if Gender::try_from(d.gender).is_err() {
            v.add("factors.demographic.gender", "must be one of the Gender values");
        }
        if !d.phone.is_empty() && !phone_ok(&d.phone) {
            v.add("factors.demographic.phone", "must be E.164: '+' then 8..=15 digits");
        }
        if d.email.len() > 254 {
            v.add("factors.demographic.email", "at most 254 characters");
        }
        if MatchMode::try_from(d.match_mode).is_err() {
            v.add("factors.demographic.match_mode", "must be EXACT or NORMALIZED");
        }
    }
    if !factors.pin.is_empty() && !pin_ok(&factors.pin) {
        v.add("factors.pin", "must be 4..=8 digits");
    }
    if !factors.totp.is_empty()
        && (factors.totp.len() != 6 || !factors.totp.bytes().all(|b| b.is_ascii_digit()))
    {
        v.add("factors.totp", "must be 6 digits");
    }
    let id = id?;
    done(v)?;
    Ok(AuthRequest { id, request_time_ms: request_time_ms.unwrap_or(0) })
}

/// GetAuthHistory; returns the identifier, the sequence to continue below (None: newest) and the
/// page size.
pub fn get_auth_history(
    scheme: &IdScheme,
    req: &GetAuthHistoryRequest,
) -> Result<(Identifier, Option<u64>, u32), Invalid> {
    let id = identifier(scheme, "id", &req.id, &[IdKind::Uin, IdKind::Vid])?;
    let mut v = FieldViolations::new();
    let before = if req.page_token.is_empty() {
        None
    } else {
        let parsed = u64::from_str_radix(&req.page_token, 16).ok().filter(|&s| s > 0);
        if parsed.is_none() {
            v.add("page_token", "is not a token this service issued");
        }
        parsed
    };
    let limit = page(req.limit, &mut v);
    done(v)?;
    Ok((id, before, limit))
}

/// VerifyAuditChain.
pub fn verify_audit_chain(scheme: &IdScheme, req: &VerifyAuditChainRequest) -> Result<Identifier, Invalid> {
    identifier(scheme, "uin", &req.uin, &[IdKind::Uin])
}

/// A partner id: 1..=64 characters of [a-z0-9-].
pub fn partner_id_ok(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_796_000_000_000; // 2026-11-30T00:53Z

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
        match enroll(req, NOW) {
            Ok(()) => vec![],
            Err(Invalid::Fields(v)) => v.violations().iter().map(|(f, _)| f.clone()).collect(),
            Err(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        assert!(fields(&request("RID-001_a")).is_empty());
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
    fn a_birth_date_in_the_future_or_before_1850_is_refused() {
        for (dob, ok) in [
            ("2999-01-01", false),
            ("9999-12-31", false),
            ("2026-12-02", false), // two days after NOW
            ("2026-12-01", true),  // a day ahead: time-zone tolerance
            ("2026-11-30", true),
            ("1850-01-01", true),
            ("1849-12-31", false),
            ("0001-01-01", false),
        ] {
            let mut r = request("R1");
            r.demographics.as_mut().unwrap().date_of_birth = dob.into();
            assert_eq!(fields(&r).is_empty(), ok, "{dob}");
            if !ok {
                assert_eq!(fields(&r), vec!["demographics.date_of_birth"], "{dob}");
            }
        }
    }

    #[test]
    fn violations_never_quote_the_value() {
        let mut r = request("R1");
        r.demographics.as_mut().unwrap().full_name = "x".repeat(300);
        r.pin = "99999999999".into();
        let Err(Invalid::Fields(v)) = enroll(&r, NOW) else { panic!() };
        for (_, description) in v.violations() {
            assert!(!description.contains("xxx") && !description.contains("9999"), "{description}");
        }
    }

    #[test]
    fn identifiers_of_the_wrong_kind_or_digit_are_named() {
        let scheme = IdScheme::dev();
        let req = GetIdentityRequest { id: "12345".into() };
        assert!(
            matches!(get_identity(&scheme, &req), Err(Invalid::Identifier { field, .. }) if field == "id")
        );
        let uin = scheme
            .generate(
                IdKind::Uin,
                nid_proto::bucket::BucketId::new(3).unwrap(),
                &mut nid_proto::ids::system_random_u64,
            )
            .unwrap()
            .to_digits();
        let revoke = RevokeVidRequest { vid: uin.clone(), request_id: String::new() };
        assert!(matches!(revoke_vid(&scheme, &revoke), Err(Invalid::Identifier { .. })));
        let status = SetStatusRequest { uin, status: 1, reason: "ok".into(), request_id: "bad id!".into() };
        let Err(Invalid::Fields(v)) = set_status(&scheme, &status) else { panic!() };
        assert_eq!(v.violations()[0].0, "request_id");
    }
}
