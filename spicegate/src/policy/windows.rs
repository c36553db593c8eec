//! The schedule syntax: days and hours as the policy writes them. When a
//! window is open is worked out in `crate::schedule`.

/// `mon` ... `sun` (also full names) to 0 ... 6.
pub fn parse_day(s: &str) -> Option<u8> {
    let s = s.trim().to_ascii_lowercase();
    let days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let full = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    days.iter()
        .position(|d| *d == s)
        .or_else(|| full.iter().position(|d| *d == s))
        .and_then(|i| u8::try_from(i).ok())
}

/// `"08:00-18:00"` to minutes after midnight. `"22:00-06:00"` runs past
/// midnight; `"00:00-24:00"` is the whole day.
pub fn parse_hours(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("write it as \"HH:MM-HH:MM\"")?;
    let minutes = |t: &str| -> Result<u16, String> {
        let (h, m) = t.trim().split_once(':').ok_or("write times as HH:MM")?;
        let h: u16 = h.parse().map_err(|_| format!("`{t}` is not HH:MM"))?;
        let m: u16 = m.parse().map_err(|_| format!("`{t}` is not HH:MM"))?;
        if m >= 60 || h > 24 || (h == 24 && m != 0) {
            return Err(format!("`{t}` is not a time of day"));
        }
        Ok(h * 60 + m)
    };
    let (start, end) = (minutes(a)?, minutes(b)?);
    if start == end {
        return Err("the window is empty (start equals end)".into());
    }
    if start == 24 * 60 {
        return Err("a window cannot start at 24:00".into());
    }
    Ok((start, end))
}
