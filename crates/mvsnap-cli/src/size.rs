//! Sizes on the command line, parsed by the `parse-size` crate with binary units throughout:
//! K, KB and KiB all mean 1024 (as `lvcreate -L 10G` and `zfs create -V 10G` mean GiB), the
//! same units the tables print (`2.0 MiB`).

/// Parse `4096`, `4KB`, `64KiB`, `1.5M`, `10GiB`, `2t` (binary units: 1K = 1KB = 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    use parse_size::{Config, Error};
    let t = text.trim();
    // parse-size reads `-1` as 1 when the minus sign is taken for a separator in some versions;
    // an explicit sign is never a size.
    if t.starts_with(['-', '+']) {
        return Err(not_a_size(text));
    }
    match Config::new().with_binary().parse_size(t) {
        Ok(n) => Ok(n),
        Err(Error::PosOverflow) => Err(format!("'{text}' is too large (more than 2^64-1 bytes)")),
        Err(_) => Err(not_a_size(text)),
    }
}

fn not_a_size(text: &str) -> String {
    format!(
        "'{text}' is not a size: expected bytes with an optional unit (e.g. 4096, 4KB, 64KiB, \
         1.5M, 10GiB; binary: 1K = 1024)"
    )
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn plain_and_suffixed() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("4KB"), Ok(4 << 10));
        assert_eq!(parse_size("10KB"), Ok(10 << 10));
        assert_eq!(parse_size("10GB"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("3M"), Ok(3 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size(" 1M "), Ok(1 << 20));
        assert_eq!(parse_size("10 G"), Ok(10 << 30));
    }

    #[test]
    fn garbage_is_rejected() {
        for bad in [
            "", "K", "abc", "10X", "12Q", "-1", "+1", "-1K", "0x10", "G10", "1MM", "1.2.3K",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains("is not a size"), "{bad}: {err}");
        }
    }

    #[test]
    fn overflow_is_rejected() {
        assert!(parse_size("99999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("16777216T").unwrap_err().contains("too large"));
        assert_eq!(parse_size("16777215T"), Ok(16777215u64 << 40));
    }
}
