//! The worker's running token count in a stream: the SSE comment `: usage P C`, or
//! `: usage P C K` when K of the P prompt tokens were read from the prefix cache.
//!
//! Owns: how that comment is written and read, so the worker that writes it and the
//! gateway that bills by it agree. SSE clients ignore comments, so the line never reaches
//! an SDK as data. Must never: carry anything but those counts.

use crate::Usage;

const PREFIX: &str = ": usage ";

/// The event for the tokens counted so far: `: usage P C`, with ` K` when some prompt
/// tokens were cached (so a reader of two counts keeps reading uncached calls), and the
/// blank line that ends it.
pub fn usage_comment(usage: &Usage) -> String {
    match usage.cached_tokens() {
        0 => format!(
            "{PREFIX}{} {}\n\n",
            usage.prompt_tokens, usage.completion_tokens
        ),
        cached => format!(
            "{PREFIX}{} {} {cached}\n\n",
            usage.prompt_tokens, usage.completion_tokens
        ),
    }
}

/// The counts of one SSE event if it is a usage comment (with or without the newlines
/// that end it); `None` for any other event.
/// Exactly as written: two or three decimal counts after the prefix, one space between.
pub fn parse_usage_comment(event: &str) -> Option<Usage> {
    let (prompt, rest) = event
        .strip_prefix(PREFIX)?
        .trim_end_matches('\n')
        .split_once(' ')?;
    let (completion, cached) = match rest.split_once(' ') {
        Some((completion, cached)) => (completion, Some(cached)),
        None => (rest, None),
    };
    // Digits only: `u64::from_str` would also take a sign.
    let count = |t: &str| {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        t.parse::<u64>().ok()
    };
    let usage = Usage::new(count(prompt)?, count(completion)?);
    match cached {
        Some(cached) => Some(usage.with_cached(count(cached)?)),
        None => Some(usage),
    }
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
        let cached = Usage::new(12, 3).with_cached(8);
        assert_eq!(usage_comment(&cached), ": usage 12 3 8\n\n");
        assert_eq!(parse_usage_comment(": usage 12 3 8"), Some(cached));
        // Nothing cached is written as two counts.
        assert_eq!(
            usage_comment(&Usage::new(12, 3).with_cached(0)),
            ": usage 12 3\n\n"
        );
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
            ": usage 1 2 3 4",
            ": usage 1 2 ",
            ": usage 1 2 x",
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
            fn written_comments_read_back(prompt: u64, completion: u64, cached in prop::option::of(any::<u64>())) {
                let usage = match cached {
                    Some(k) if k > 0 => Usage::new(prompt, completion).with_cached(k),
                    _ => Usage::new(prompt, completion),
                };
                let written = usage_comment(&usage);
                prop_assert_eq!(parse_usage_comment(&written), Some(usage));
                prop_assert_eq!(parse_usage_comment(written.trim_end()), Some(usage));
            }

            /// Arbitrary text never panics, and whatever reads as usage starts with the
            /// prefix and carries exactly the counts it names.
            #[test]
            fn arbitrary_events_never_panic(event in any::<String>()) {
                if let Some(usage) = parse_usage_comment(&event) {
                    prop_assert_eq!(as_written(&event), Some(counts(&usage)), "{:?}", event);
                }
            }

            /// Near misses: a comment with its counts edited is read as exactly those
            /// counts or refused, never as other numbers.
            #[test]
            fn mutated_comments_are_read_exactly_or_refused(
                prompt: u64,
                completion: u64,
                cached: u64,
                at in any::<prop::sample::Index>(),
                insert in "[ 0-9a-z+\\-:\n\t\u{a0}]{0,3}",
                cut in 0usize..3,
            ) {
                let written = usage_comment(&Usage::new(prompt, completion).with_cached(cached));
                let at = at.index(written.len());
                let end = (at + cut).min(written.len());
                let event = format!("{}{}{}", &written[..at], insert, &written[end..]);
                let read = parse_usage_comment(&event).map(|u| counts(&u));
                prop_assert_eq!(read, as_written(&event), "{:?}", event);
            }
        }

        /// The counts a parsed comment states: two, or three with the cached ones.
        fn counts(u: &Usage) -> Vec<u64> {
            let mut v = vec![u.prompt_tokens, u.completion_tokens];
            v.extend(u.prompt_tokens_details.map(|d| d.cached_tokens));
            v
        }

        /// The counts of `event` if it is the prefix, then two or three runs of decimal
        /// digits one space apart, then newlines, read another way than the parser does.
        fn as_written(event: &str) -> Option<Vec<u64>> {
            let body = event.strip_prefix(PREFIX)?.trim_end_matches('\n');
            let parts: Vec<&str> = body.split(' ').collect();
            let digits = |p: &&str| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit());
            if !(2..=3).contains(&parts.len()) || !parts.iter().all(digits) {
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
