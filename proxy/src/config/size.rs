//! Human byte sizes in config files and flags: `512MiB`, `1Gi`, `256M`, `1048576`.

/// Parses `<integer><unit>`: binary units (`KiB`/`Ki`, `MiB`/`Mi`, `GiB`/`Gi`), decimal ones
/// (`KB`/`K`, `MB`/`M`, `GB`/`G`, as Kubernetes writes them), `B` or none for bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits == 0 {
        return Err(format!(
            "invalid size {text:?} (expected e.g. 512MiB, 1GiB, 256M)"
        ));
    }
    let value: u64 = text[..digits]
        .parse()
        .map_err(|_| format!("size {text:?} is too large"))?;
    let unit: u64 = match text[digits..].trim_start() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "KB" | "K" | "k" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        unit => {
            return Err(format!(
                "unknown unit {unit:?} in size {text:?} (use B, KiB, MiB, GiB, KB, MB or GB)"
            ));
        }
    };
    value
        .checked_mul(unit)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// A `memory_limit` (file) or `--memory-limit` (flag): a size of at least 1 MiB, since
/// anything smaller is a forgotten unit.
pub fn parse_memory_limit(text: &str) -> Result<u64, String> {
    let bytes = parse_size(text)?;
    if bytes < super::MIN_MEMORY_LIMIT {
        return Err(format!(
            "{text:?} is below the minimum of 1MiB (did you mean {}MiB?)",
            text.trim()
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_decimal_and_bare_sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1Gi"), Ok(1 << 30));
        assert_eq!(parse_size("256M"), Ok(256_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size(" 2 GiB "), Ok(2 << 30));
    }

    #[test]
    fn rejects_missing_numbers_unknown_units_and_overflow() {
        assert!(parse_size("MiB").unwrap_err().contains("invalid size"));
        assert!(parse_size("5TB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("").is_err());
        assert!(
            parse_size("99999999999999GiB")
                .unwrap_err()
                .contains("too large")
        );
    }
}
