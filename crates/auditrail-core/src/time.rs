//! RFC 3339 timestamps in UTC, as milliseconds since the Unix epoch. The core has no clock: the
//! store reads the time and passes it in.

/// Milliseconds since 1970-01-01T00:00:00Z.
pub type UnixMillis = i64;

/// Days since the epoch for a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp as i64 + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Formats as `YYYY-MM-DDTHH:MM:SS.mmmZ` (always milliseconds, always UTC), for years 0..=9999.
pub fn format_millis(ms: UnixMillis) -> String {
    Millis(ms).to_string()
}

/// Displays as [`format_millis`] formats, for writing a timestamp without allocating one.
#[derive(Debug, Clone, Copy)]
pub struct Millis(pub UnixMillis);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let days = self.0.div_euclid(86_400_000);
        let in_day = self.0.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        let (h, min, s, milli) =
            (in_day / 3_600_000, in_day / 60_000 % 60, in_day / 1000 % 60, in_day % 1000);
        write!(f, "{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
    }
}

/// The UTC day number of a timestamp (segments roll when it changes).
pub fn day_of(ms: UnixMillis) -> i64 {
    ms.div_euclid(86_400_000)
}

/// Parses an RFC 3339 date-time (`2026-11-22T10:15:00Z`, with optional fraction and a `Z` or
/// `±HH:MM` offset) to milliseconds; fractions beyond milliseconds are truncated. Years are
/// limited to 1970..=9999 because audit events do not predate the epoch.
pub fn parse_rfc3339(s: &str) -> Option<UnixMillis> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let part = b.get(r)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let (y, mo, d) = (num(0..4)? as i64, num(5..7)?, num(8..10)?);
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo)
    {
        return None;
    }
    // 60 is allowed for a leap second and folded into the next second's start.
    if h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut millis = 0u32;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + u32::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..3 {
            millis *= 10;
        }
    }
    let offset_min: i64 = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), rest @ ..] if rest.len() == 5 && rest[2] == b':' => {
            let oh = num(i + 1..i + 3)? as i64;
            let om = num(i + 4..i + 6)? as i64;
            if oh > 23 || om > 59 {
                return None;
            }
            let off = oh * 60 + om;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h as i64 * 3600 + mi as i64 * 60 + sec as i64 - offset_min * 60;
    Some(secs * 1000 + millis as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-22T10:15:00Z"), Some(1_795_342_500_000));
        assert_eq!(parse_rfc3339("2026-11-22T11:15:00.5+01:00"), Some(1_795_342_500_500));
        assert_eq!(format_millis(1_795_342_500_123), "2026-11-22T10:15:00.123Z");
        for bad in [
            "2026-02-30T00:00:00Z",
            "2026-11-22 10:15:00Z",
            "2026-11-22T25:00:00Z",
            "2026-11-22T10:15:00",
            "2026-11-22T10:15:00.Z",
            "1969-12-31T23:59:59Z",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(ms in 0i64..253_402_300_799_999) {
            prop_assert_eq!(parse_rfc3339(&format_millis(ms)), Some(ms));
        }
    }
}
