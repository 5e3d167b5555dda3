//! MOSIP-style filters that generated identifiers pass, so ids are hard to mistype or guess-complete.

/// A filter an identifier fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterViolation {
    /// Starts with 0 or 1.
    LeadingZeroOrOne,
    /// Contains an ascending or descending run of 3 or more digits (e.g. 345, 987).
    SequentialRun,
    /// The same digit appears twice in a row or one digit apart (e.g. 44, 4x4).
    RepeatedDigit,
    /// The first half equals the second half or its reverse.
    MirroredHalves,
}

impl std::fmt::Display for FilterViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FilterViolation::LeadingZeroOrOne => "starts with 0 or 1",
            FilterViolation::SequentialRun => "contains an ascending or descending run of 3 digits",
            FilterViolation::RepeatedDigit => "repeats a digit adjacent or one apart",
            FilterViolation::MirroredHalves => "first half equals the second half or its reverse",
        })
    }
}

/// Returns the first filter `digits` (0..=9 each, most significant first) fails, if any.
pub fn first_violation(digits: &[u8]) -> Option<FilterViolation> {
    if matches!(digits.first(), Some(0 | 1)) {
        return Some(FilterViolation::LeadingZeroOrOne);
    }
    for w in digits.windows(3) {
        let ascending = w[1] == w[0] + 1 && w[2] == w[1] + 1;
        let descending = w[1] + 1 == w[0] && w[2] + 1 == w[1];
        if ascending || descending {
            return Some(FilterViolation::SequentialRun);
        }
    }
    let adjacent = digits.windows(2).any(|w| w[0] == w[1]);
    let one_apart = digits.windows(3).any(|w| w[0] == w[2]);
    if adjacent || one_apart {
        return Some(FilterViolation::RepeatedDigit);
    }
    let half = digits.len() / 2;
    let (first, second) = (&digits[..half], &digits[digits.len() - half..]);
    if first == second || first.iter().eq(second.iter().rev()) {
        return Some(FilterViolation::MirroredHalves);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str) -> Option<FilterViolation> {
        let digits: Vec<u8> = s.bytes().map(|b| b - b'0').collect();
        first_violation(&digits)
    }

    #[test]
    fn each_filter_fires() {
        assert_eq!(check("093857293847"), Some(FilterViolation::LeadingZeroOrOne));
        assert_eq!(check("193857293847"), Some(FilterViolation::LeadingZeroOrOne));
        assert_eq!(check("293457293847"), Some(FilterViolation::SequentialRun));
        assert_eq!(check("298757293847"), Some(FilterViolation::SequentialRun));
        assert_eq!(check("293357293847"), Some(FilterViolation::RepeatedDigit));
        assert_eq!(check("293757293847"), Some(FilterViolation::RepeatedDigit));
        assert_eq!(check("294736294736"), Some(FilterViolation::MirroredHalves));
        // A reversed second half always repeats the middle digit, so an earlier filter catches it.
        assert_eq!(check("294736637492"), Some(FilterViolation::RepeatedDigit));
        assert_eq!(check("294729384750"), None);
    }
}
