//! Time windows: which schedule entries hold at a given instant, in the
//! policy's time zone, and when that next changes. Pure: the instant and the
//! zone are arguments, so tests (and `why`) use any clock they like.
//!
//! The daemon evaluates the windows from the wall clock several times a
//! second, so a daylight-saving change or a clock jump takes effect at once:
//! nothing is scheduled ahead of time that a jump could skip.

use std::collections::BTreeSet;

use jiff::{Timestamp, tz::TimeZone};

#[cfg(test)]
use crate::policy::windows::{parse_day, parse_hours};
use crate::policy::{Policy, Principal, Schedule};

/// Local weekday (0 = Monday) and minute of the day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub weekday: u8,
    pub minute: u16,
}

pub fn local_time(unix: i64, tz: &TimeZone) -> LocalTime {
    let z = Timestamp::from_second(unix)
        .unwrap_or(Timestamp::UNIX_EPOCH)
        .to_zoned(tz.clone());
    let weekday = u8::try_from(z.weekday().to_monday_zero_offset()).unwrap_or(0);
    let minute = u16::try_from(i32::from(z.hour()) * 60 + i32::from(z.minute())).unwrap_or(0);
    LocalTime { weekday, minute }
}

/// Whether a schedule entry holds at a local time.
pub fn holds(s: &Schedule, t: LocalTime) -> bool {
    let on = |day: u8| s.days & (1 << day) != 0;
    match s.hours {
        None => on(t.weekday),
        Some((start, end)) if start < end => on(t.weekday) && t.minute >= start && t.minute < end,
        // Past midnight: the evening belongs to the listed day, the early
        // hours to the day after it.
        Some((start, end)) => {
            let yesterday = (t.weekday + 6) % 7;
            (on(t.weekday) && t.minute >= start) || (on(yesterday) && t.minute < end)
        }
    }
}

/// The zone schedules are evaluated in.
pub fn zone(policy: &Policy) -> TimeZone {
    policy
        .settings
        .timezone
        .as_deref()
        .and_then(|n| TimeZone::get(n).ok())
        .unwrap_or_else(TimeZone::system)
}

/// (vm, uid) pairs granted by schedules at `unix`; `@console` entries grant
/// the console user, if any.
pub fn scheduled(
    policy: &Policy,
    unix: i64,
    tz: &TimeZone,
    console: Option<u32>,
) -> BTreeSet<(String, u32)> {
    let t = local_time(unix, tz);
    let mut out = BTreeSet::new();
    for vm in policy.vms.values() {
        for s in vm.schedules.iter().filter(|s| holds(s, t)) {
            for g in &s.allow {
                if g.principal == Principal::Console {
                    out.extend(console.map(|u| (vm.name.clone(), u)));
                } else {
                    out.extend(g.uids.iter().map(|u| (vm.name.clone(), *u)));
                }
            }
        }
    }
    out
}

/// Whether `uid` is named by some schedule of `vm` (`@console` counts for
/// the console user).
pub fn named_in_schedule(policy: &Policy, vm: &str, uid: u32, console: Option<u32>) -> bool {
    policy.vms.get(vm).is_some_and(|v| {
        v.schedules.iter().any(|s| {
            s.allow.iter().any(|g| {
                g.uids.contains(&uid) || (g.principal == Principal::Console && console == Some(uid))
            })
        })
    })
}

/// The next instant after `unix` at which the schedule grant of `uid` on
/// `vm` begins or ends, searched minute by minute over eight days.
pub fn next_change(
    policy: &Policy,
    vm: &str,
    uid: u32,
    unix: i64,
    tz: &TimeZone,
    console: Option<u32>,
) -> Option<i64> {
    let now = scheduled(policy, unix, tz, console).contains(&(vm.to_owned(), uid));
    let mut t = unix - unix.rem_euclid(60) + 60;
    for _ in 0..(8 * 24 * 60) {
        if scheduled(policy, t, tz, console).contains(&(vm.to_owned(), uid)) != now {
            return Some(t);
        }
        t += 60;
    }
    None
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{directory::FakeDirectory, policy::parse};

    fn policy(text: &str) -> Policy {
        let dir = FakeDirectory::default()
            .user("maggie", 1)
            .user("anne", 2)
            .user("boss", 3)
            .group("interns", &[4, 5]);
        parse(text, Path::new("p.toml"), &dir).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Unix seconds of a civil time in a zone.
    fn at(civil: &str, tz: &TimeZone) -> i64 {
        let dt: jiff::civil::DateTime = civil.parse().expect("civil time");
        dt.to_zoned(tz.clone())
            .expect("exists")
            .timestamp()
            .as_second()
    }

    const LEAPTEST: &str = r#"
[vms.leaptest]
server = "localhost"
ports = [20004]
[[vms.leaptest.schedule]]
allow = ["maggie"]
days = ["mon", "tue"]
[[vms.leaptest.schedule]]
allow = ["anne", "@interns"]
days = ["wed", "thu"]
hours = "08:00-18:00"
[[vms.leaptest.schedule]]
allow = ["boss"]
hours = "22:00-06:00"
days = ["fri"]
"#;

    #[test]
    fn windows() {
        let p = policy(LEAPTEST);
        let tz = TimeZone::get("Europe/Berlin").expect("tzdata");
        let who = |civil: &str| -> Vec<u32> {
            scheduled(&p, at(civil, &tz), &tz, None)
                .into_iter()
                .map(|(_, u)| u)
                .collect()
        };
        // 2026-11-23 is a Monday.
        assert_eq!(who("2026-11-23T00:00"), vec![1]);
        assert_eq!(who("2026-11-24T23:59"), vec![1]);
        assert_eq!(who("2026-11-25T07:59"), Vec::<u32>::new());
        assert_eq!(who("2026-11-25T08:00"), vec![2, 4, 5]);
        assert_eq!(who("2026-11-26T17:59"), vec![2, 4, 5]);
        assert_eq!(who("2026-11-26T18:00"), Vec::<u32>::new());
        // Friday 22:00 to Saturday 06:00.
        assert_eq!(who("2026-11-27T21:59"), Vec::<u32>::new());
        assert_eq!(who("2026-11-27T22:00"), vec![3]);
        assert_eq!(who("2026-11-28T05:59"), vec![3]);
        assert_eq!(who("2026-11-28T06:00"), Vec::<u32>::new());
        assert_eq!(
            who("2026-11-22T03:00"),
            Vec::<u32>::new(),
            "Sunday early is not Friday night"
        );
    }

    #[test]
    fn next_change_and_daylight_saving() {
        let p = policy(LEAPTEST);
        let tz = TimeZone::get("Europe/Berlin").expect("tzdata");
        let t = at("2026-11-25T07:30", &tz);
        assert_eq!(
            next_change(&p, "leaptest", 2, t, &tz, None),
            Some(at("2026-11-25T08:00", &tz))
        );
        assert_eq!(
            next_change(&p, "leaptest", 2, at("2026-11-25T09:00", &tz), &tz, None),
            Some(at("2026-11-25T18:00", &tz))
        );
        // DST ends on Sunday 2026-10-25 in Berlin (03:00 -> 02:00); the
        // windows follow local time, so Monday 00:00 local is 23:00 UTC.
        let monday = at("2026-10-26T00:00", &tz);
        assert_eq!(monday, at("2026-10-25T23:00", &TimeZone::UTC));
        assert!(scheduled(&p, monday, &tz, None).contains(&("leaptest".into(), 1)));
        assert!(!scheduled(&p, monday - 60, &tz, None).contains(&("leaptest".into(), 1)));
        // DST starts 2026-03-29 (02:00 -> 03:00): a Wednesday window still
        // opens at 08:00 local, which is 06:00 UTC in summer.
        let wed = at("2026-04-01T08:00", &tz);
        assert_eq!(wed, at("2026-04-01T06:00", &TimeZone::UTC));
        assert!(scheduled(&p, wed, &tz, None).contains(&("leaptest".into(), 2)));
    }

    #[test]
    fn console_in_schedule() {
        let p = policy(
            "[vms.v]\nserver=\"localhost\"\nports=[1]\n[[vms.v.schedule]]\nallow=[\"@console\"]\n",
        );
        let tz = TimeZone::UTC;
        assert!(scheduled(&p, 0, &tz, None).is_empty());
        assert_eq!(
            scheduled(&p, 0, &tz, Some(1000)),
            [("v".to_owned(), 1000)].into()
        );
    }

    #[test]
    fn parsing() {
        assert_eq!(parse_hours("08:00-18:00"), Ok((480, 1080)));
        assert_eq!(parse_hours("22:00-06:00"), Ok((1320, 360)));
        assert_eq!(parse_hours("00:00-24:00"), Ok((0, 1440)));
        assert!(parse_hours("8-18").is_err());
        assert!(parse_hours("08:00-08:00").is_err());
        assert!(parse_hours("25:00-26:00").is_err());
        assert_eq!(parse_day("Wed"), Some(2));
        assert_eq!(parse_day("sunday"), Some(6));
        assert_eq!(parse_day("x"), None);
    }
}
