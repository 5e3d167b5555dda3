//! The Verhoeff check digit: catches every single-digit error and every adjacent transposition.

/// Multiplication table of the dihedral group D5.
const MULTIPLY: [[u8; 10]; 10] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
];

/// Position-dependent permutations.
const PERMUTE: [[u8; 10]; 8] = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 5, 7, 6, 2, 8, 3, 0, 9, 4],
    [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
    [8, 9, 1, 6, 0, 4, 3, 5, 2, 7],
    [9, 4, 5, 3, 1, 2, 6, 8, 7, 0],
    [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
    [2, 7, 9, 3, 8, 0, 6, 4, 1, 5],
    [7, 0, 4, 6, 9, 1, 3, 2, 5, 8],
];

/// Inverses in D5.
const INVERSE: [u8; 10] = [0, 4, 3, 2, 1, 5, 6, 7, 8, 9];

/// Returns the check digit to append to `digits` (each 0..=9, most significant first).
pub fn check_digit(digits: &[u8]) -> u8 {
    let mut c = 0u8;
    for (i, &d) in digits.iter().rev().enumerate() {
        c = MULTIPLY[usize::from(c)][usize::from(PERMUTE[(i + 1) % 8][usize::from(d)])];
    }
    INVERSE[usize::from(c)]
}

/// Returns true when `digits` (check digit last) carries a valid Verhoeff check digit.
pub fn is_valid(digits: &[u8]) -> bool {
    let mut c = 0u8;
    for (i, &d) in digits.iter().rev().enumerate() {
        c = MULTIPLY[usize::from(c)][usize::from(PERMUTE[i % 8][usize::from(d)])];
    }
    c == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits(s: &str) -> Vec<u8> {
        s.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn known_vectors() {
        assert_eq!(check_digit(&digits("236")), 3);
        assert_eq!(check_digit(&digits("12345")), 1);
        assert_eq!(check_digit(&digits("123456789012")), 0);
        assert!(is_valid(&digits("2363")));
        assert!(!is_valid(&digits("2364")));
    }

    #[test]
    fn catches_every_single_error_and_adjacent_transposition_of_short_numbers() {
        // Exhaustive over all 4-digit bodies: 10^4 * (36 substitutions + 4 transpositions).
        for n in 0..10_000u32 {
            let mut body: Vec<u8> = format!("{n:04}").bytes().map(|b| b - b'0').collect();
            body.push(check_digit(&body));
            assert!(is_valid(&body));
            for pos in 0..body.len() {
                for replacement in 0..10u8 {
                    if replacement == body[pos] {
                        continue;
                    }
                    let mut wrong = body.clone();
                    wrong[pos] = replacement;
                    assert!(!is_valid(&wrong), "substitution at {pos} of {body:?} missed");
                }
            }
            for pos in 0..body.len() - 1 {
                if body[pos] == body[pos + 1] {
                    continue;
                }
                let mut wrong = body.clone();
                wrong.swap(pos, pos + 1);
                assert!(!is_valid(&wrong), "transposition at {pos} of {body:?} missed");
            }
        }
    }
}
