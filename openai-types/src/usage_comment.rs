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
pub fn parse_usage_comment(event: &str) -> Option<Usage> {
    let mut counts = event
        .strip_prefix(PREFIX)?
        .split_whitespace()
        .map(str::parse::<u64>);
    match (counts.next(), counts.next()) {
        (Some(Ok(prompt)), Some(Ok(completion))) => Some(Usage::new(prompt, completion)),
        _ => None,
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
        ] {
            assert_eq!(parse_usage_comment(event), None, "{event:?}");
        }
    }
}
