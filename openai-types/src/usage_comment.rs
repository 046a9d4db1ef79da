//! The worker's running token count in a stream: the SSE comment `: usage P C`.
//!
//! Owns: how that comment is written and read, so the worker that writes it and the
//! gateway that bills by it agree. SSE clients ignore comments, so the line never reaches
//! an SDK as data. Must never: carry anything but the two counts.

use crate::Usage;

const PREFIX: &str = ": usage ";

/// The event for the tokens counted so far: `: usage P C` and the blank line that ends it.
pub fn usage_comment(usage: &Usage) -> String {
    format!(
        "{PREFIX}{} {}\n\n",
        usage.prompt_tokens, usage.completion_tokens
    )
}

/// The counts of one SSE event if it is a usage comment (with or without the newlines
/// that end it); `None` for any other event.
/// Exactly as written: two decimal counts after the prefix, one space between them.
pub fn parse_usage_comment(event: &str) -> Option<Usage> {
    let (prompt, completion) = event
        .strip_prefix(PREFIX)?
        .trim_end_matches('\n')
        .split_once(' ')?;
    // Digits only: `u64::from_str` would also take a sign.
    let count = |t: &str| {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse::<u64>().ok()
    };
    Some(Usage::new(count(prompt)?, count(completion)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_comment_reads_back() {
        for usage in [Usage::new(0, 0), Usage::new(12, 3), Usage::new(u64::MAX, 0)] {
            let written = usage_comment(&usage);
            assert!(written.ends_with("\n\n"), "{written:?}");
            assert_eq!(parse_usage_comment(&written), Some(usage));
            assert_eq!(parse_usage_comment(written.trim_end()), Some(usage));
        }
        assert_eq!(usage_comment(&Usage::new(12, 3)), ": usage 12 3\n\n");
    }

    #[test]
    fn other_events_are_not_usage() {
        for event in [
            ": keep-alive",
            ": usage",
            ": usage 12",
            ": usage twelve 3",
            ": usage -1 3",
            "data: [DONE]",
            "data: : usage 1 2",
            ": usage 1 2 3",
            ": usage +1 2",
            ": usage 1  2",
            ": usage 1 2\u{a0}x",
            ": usage 18446744073709551616 0",
        ] {
            assert_eq!(parse_usage_comment(event), None, "{event:?}");
        }
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(
                crate::usage_comment::tests::fuzz::cases(2048),
            ))]

            /// Every written comment reads back to its counts, with or without its newlines.
            #[test]
            fn written_comments_read_back(prompt: u64, completion: u64) {
                let usage = Usage::new(prompt, completion);
                let written = usage_comment(&usage);
                prop_assert_eq!(parse_usage_comment(&written), Some(usage));
                prop_assert_eq!(parse_usage_comment(written.trim_end()), Some(usage));
            }

            /// Arbitrary text never panics, and whatever reads as usage starts with the
            /// prefix and carries exactly the two counts it names.
            #[test]
            fn arbitrary_events_never_panic(event in any::<String>()) {
                if let Some(usage) = parse_usage_comment(&event) {
                    prop_assert_eq!(as_written(&event), Some(vec![usage.prompt_tokens, usage.completion_tokens]), "{:?}", event);
                }
            }

            /// Near misses: a comment with its counts edited is read as exactly those
            /// counts or refused, never as other numbers.
            #[test]
            fn mutated_comments_are_read_exactly_or_refused(
                prompt: u64,
                completion: u64,
                at in any::<prop::sample::Index>(),
                insert in "[ 0-9a-z+\\-:\n\t\u{a0}]{0,3}",
                cut in 0usize..3,
            ) {
                let written = usage_comment(&Usage::new(prompt, completion));
                let at = at.index(written.len());
                let end = (at + cut).min(written.len());
                let event = format!("{}{}{}", &written[..at], insert, &written[end..]);
                let read = parse_usage_comment(&event).map(|u| vec![u.prompt_tokens, u.completion_tokens]);
                prop_assert_eq!(read, as_written(&event), "{:?}", event);
            }
        }

        /// The counts of `event` if it is the prefix, decimal digits, one space, decimal
        /// digits and newlines, read another way than the parser does.
        fn as_written(event: &str) -> Option<Vec<u64>> {
            let body = event.strip_prefix(PREFIX)?.trim_end_matches('\n');
            let parts: Vec<&str> = body.split(' ').collect();
            let digits = |p: &&str| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit());
            if parts.len() != 2 || !parts.iter().all(digits) {
                return None;
            }
            parts.iter().map(|p| p.parse().ok()).collect()
        }

        /// Cases per property: `PROPTEST_CASES` when set (the long run of
        /// `scripts/fuzz.sh`), else `default`.
        pub(crate) fn cases(default: u32) -> u32 {
            std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(default)
        }
    }
}
