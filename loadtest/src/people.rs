//! Synthetic people, deterministic by seed: names in several scripts, real dates, genders, phones
//! and e-mails, shaped like real enrolment packets (sizes matter for a storage benchmark).

use serde::{Deserialize, Serialize};

const GIVEN: &[&str] = &[
    "Asha",
    "Ravi",
    "Fatima",
    "Kwame",
    "Mei",
    "Olga",
    "Diego",
    "Amara",
    "Hiroshi",
    "Leila",
    "Arjun",
    "Chen",
    "आरव",
    "प्रिया",
    "محمد",
    "فاطمة",
    "Иван",
    "Анна",
    "李",
    "王芳",
    "Nkechi",
    "Tomás",
    "Søren",
    "Zoë",
];
const FAMILY: &[&str] = &[
    "Okafor",
    "Sharma",
    "Haddad",
    "Nakamura",
    "Ivanova",
    "García",
    "Mensah",
    "Kowalski",
    "Nguyen",
    "Silva",
    "शर्मा",
    "वर्मा",
    "العلي",
    "الحسن",
    "Петров",
    "Смирнова",
    "张",
    "陈",
    "Adeyemi",
    "O'Brien",
    "Müller",
];

/// One synthetic person and, once enrolled, their UIN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    /// Registration id.
    pub rid: String,
    /// Full name.
    pub name: String,
    /// Date of birth, YYYY-MM-DD.
    pub dob: String,
    /// Gender number of `nid.v1.Gender`.
    pub gender: i32,
    /// E.164 phone.
    pub phone: String,
    /// E-mail.
    pub email: String,
    /// UIN, once enrolled.
    #[serde(default)]
    pub uin: String,
}

/// SplitMix64: small, fast, deterministic.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Person number `index` of the population with `seed`.
pub fn person(seed: u64, index: u64) -> Person {
    let mut r = SplitMix(seed ^ index.wrapping_mul(0xA24B_AED4_963E_E407));
    let given = GIVEN[r.below(GIVEN.len() as u64) as usize];
    let family = FAMILY[r.below(FAMILY.len() as u64) as usize];
    let year = 1930 + r.below(90);
    let month = 1 + r.below(12);
    let days = match month {
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let day = 1 + r.below(days);
    Person {
        rid: format!("LT-{seed:x}-{index:010}"),
        name: format!("{given} {family}"),
        dob: format!("{year:04}-{month:02}-{day:02}"),
        gender: 1 + r.below(3) as i32,
        phone: format!("+91{:010}", 6_000_000_000 + r.below(3_999_999_999)),
        email: format!("person{index}.{:x}@example.org", r.below(1 << 24)),
        uin: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_by_seed_and_index() {
        assert_eq!(person(7, 42), person(7, 42));
        assert_ne!(person(7, 42), person(8, 42));
        assert_ne!(person(7, 42).rid, person(7, 43).rid);
    }

    #[test]
    fn fields_have_the_shapes_the_service_accepts() {
        for i in 0..2000 {
            let p = person(1, i);
            assert!(p.rid.len() <= 64 && p.rid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
            let (y, rest) = p.dob.split_at(4);
            assert!(y.parse::<u32>().unwrap() >= 1930 && rest.len() == 6);
            assert!(p.phone.starts_with('+') && (9..=16).contains(&p.phone.len()));
            assert!(p.email.contains('@'));
            assert!((1..=3).contains(&p.gender));
        }
    }
}
