//! How times read for people, the same in the CLI's tables and in NBD export descriptions.

use std::time::{Duration, UNIX_EPOCH};

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn utc_time(secs: u64) -> String {
    // RFC 3339 is `YYYY-MM-DDTHH:MM:SSZ`; a space reads better in a table.
    let t = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    t.trim_end_matches('Z').replacen('T', " ", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13:20");
    }
}
