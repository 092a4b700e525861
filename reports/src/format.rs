//! Number formatting shared by tables and chart ticks, so a value reads the same everywhere.

/// Four significant digits (`0.05230`, `12.35`, `1235`), thousands grouped above 10,000;
/// non-finite values print as `n/a`.
pub(crate) fn sig4(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".to_string();
    }
    if x == 0.0 {
        return "0".to_string();
    }
    let magnitude = x.abs().log10().floor() as i32;
    if magnitude >= 4 {
        return group_i64(x.round() as i64);
    }
    let decimals = (3 - magnitude).clamp(0, 12) as usize;
    format!("{x:.decimals$}")
}

/// Four significant digits without trailing zeros (`0.5`, `12.35`, `4`), for labels in prose
/// and on charts where `4.000` would read as false precision.
pub(crate) fn short(x: f64) -> String {
    let text = sig4(x);
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// An axis tick: the shortest exact-looking form (`0.005`, `2.5`, `1,000`), `-0` as `0`.
pub(crate) fn tick(x: f64) -> String {
    if !x.is_finite() {
        return String::new();
    }
    if x.abs() >= 1000.0 {
        return group_i64(x.round() as i64);
    }
    let text = format!("{x:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" || text.is_empty() {
        "0".to_string()
    } else {
        text.to_string()
    }
}

/// A fraction as a percentage with two decimals (`99.25%`).
pub(crate) fn percent(fraction: f64) -> String {
    if fraction.is_finite() {
        format!("{:.2}%", fraction * 100.0)
    } else {
        "n/a".to_string()
    }
}

/// A fraction as a short percentage (`95%`, `99.5%`), for labels.
pub(crate) fn percent_short(fraction: f64) -> String {
    if fraction.is_finite() {
        format!("{}%", short(fraction * 100.0))
    } else {
        "n/a".to_string()
    }
}

/// An integer with thousands separators (`1,234,567`).
pub(crate) fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn group_i64(n: i64) -> String {
    if n < 0 {
        format!("-{}", group(n.unsigned_abs()))
    } else {
        group(n as u64)
    }
}

/// Bytes as decimal gigabytes (10^9 bytes), the unit the reports use throughout.
pub(crate) fn gb(bytes: f64) -> f64 {
    bytes / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_digits() {
        assert_eq!(sig4(0.0523), "0.05230");
        assert_eq!(sig4(12.3456), "12.35");
        assert_eq!(sig4(1234.6), "1235");
        assert_eq!(sig4(1_234_567.0), "1,234,567");
        assert_eq!(sig4(f64::NAN), "n/a");
        assert_eq!(sig4(0.0), "0");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(4.0), "4");
        assert_eq!(short(12.3456), "12.35");
        assert_eq!(short(12_345.0), "12,345");
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.005), "0.005");
        assert_eq!(tick(2.5), "2.5");
        assert_eq!(tick(10.0), "10");
        assert_eq!(tick(-0.0), "0");
        assert_eq!(tick(25_000.0), "25,000");
    }

    #[test]
    fn grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_000_000), "1,000,000");
        assert_eq!(percent(0.9925), "99.25%");
    }
}
