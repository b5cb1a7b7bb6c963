//! Schedules: validation with the original's error strings (spec §3.18.1) and the next-run
//! computation (spec §3.18.2) in the job's IANA time zone, through jiff and its bundled tz
//! database (a machine without `/usr/share/zoneinfo` works).
//!
//! # DST behaviour
//!
//! A slot is a local wall time `HH:mm` on a local date. Converting it to an instant uses jiff's
//! `compatible` disambiguation (RFC 5545), which is what the original's fixed-point iteration
//! converged to in the common cases, but now explicit and exact:
//! - **gap** (the wall time does not exist, clocks jump forward): the slot fires at the wall time
//!   shifted forward by the gap's length, i.e. the instant interpreted with the offset before
//!   the gap (`02:30` on the spring-forward night in New York fires at `03:30` EDT; a 30-minute
//!   Lord Howe gap shifts it by 30 minutes). The slot is not skipped.
//! - **overlap** (the wall time happens twice, clocks fall back): the slot fires once, at the
//!   first occurrence (the earlier instant, with the offset before the transition).

use common::OpError;
use common::api::push::{DayOfMonth, Periodicity, Schedule};
use common::clock::Millis;
use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};

/// A validated recurring slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub kind: SlotKind,
    pub hour: i8,
    pub minute: i8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    Daily,
    /// 1 = Monday … 7 = Sunday.
    Weekly(i8),
    /// `None` = the last day of the month.
    Monthly(Option<i8>),
}

/// `HH:mm` after trimming (spec §3.18.1).
pub fn parse_time(time: &str) -> Result<(i8, i8), OpError> {
    let t = time.trim();
    let bad = || OpError::invalid(format!("Invalid time '{time}', expected HH:mm"));
    let b = t.as_bytes();
    if b.len() != 5 || b[2] != b':' || !b.iter().enumerate().all(|(i, c)| i == 2 || c.is_ascii_digit()) {
        return Err(bad());
    }
    let hour = ((b[0] - b'0') * 10 + (b[1] - b'0')) as i8;
    let minute = ((b[3] - b'0') * 10 + (b[4] - b'0')) as i8;
    if hour > 23 || minute > 59 {
        return Err(bad());
    }
    Ok((hour, minute))
}

fn integer_in(n: &serde_json::Number, range: std::ops::RangeInclusive<i64>) -> Option<i8> {
    let value = n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e6).map(|f| f as i64))?;
    range.contains(&value).then_some(value as i8)
}

/// Validates one schedule; `None` for a manual one. The stored form has its time trimmed
/// ([`normalise`]).
pub fn validate(schedule: &Schedule) -> Result<Option<Slot>, OpError> {
    let (kind, time) = match schedule {
        Schedule::Manual => return Ok(None),
        Schedule::Daily { time } => (SlotKind::Daily, time),
        Schedule::Weekly { weekday, time } => {
            let day = integer_in(weekday, 1..=7)
                .ok_or_else(|| OpError::invalid("Weekly schedule weekday must be in range 1..7"))?;
            (SlotKind::Weekly(day), time)
        }
        Schedule::Monthly { day_of_month, time } => {
            let bad = || OpError::invalid("Monthly schedule dayOfMonth must be 1..31 or 'last'");
            let day = match day_of_month {
                DayOfMonth::Day(n) => Some(integer_in(n, 1..=31).ok_or_else(bad)?),
                DayOfMonth::Named(s) if s == "last" => None,
                DayOfMonth::Named(_) => return Err(bad()),
            };
            (SlotKind::Monthly(day), time)
        }
    };
    let (hour, minute) = parse_time(time)?;
    Ok(Some(Slot { kind, hour, minute }))
}

/// The schedule as stored: times trimmed.
pub fn normalise(schedule: &Schedule) -> Schedule {
    match schedule.clone() {
        Schedule::Manual => Schedule::Manual,
        Schedule::Daily { time } => Schedule::Daily { time: time.trim().to_string() },
        Schedule::Weekly { weekday, time } => Schedule::Weekly { weekday, time: time.trim().to_string() },
        Schedule::Monthly { day_of_month, time } => Schedule::Monthly { day_of_month, time: time.trim().to_string() },
    }
}

/// A job's schedule against its periodicity (spec §3.18.1).
pub fn validate_for(periodicity: Periodicity, schedule: &Schedule) -> Result<Option<Slot>, OpError> {
    if schedule.kind() != periodicity {
        return Err(OpError::invalid("Schedule kind must match periodicity"));
    }
    validate(schedule)
}

/// A push template's suggested times (spec §3.18.1).
pub fn validate_suggested(periodicity: Periodicity, times: &[Schedule]) -> Result<(), OpError> {
    if periodicity == Periodicity::Manual && !times.is_empty() {
        return Err(OpError::invalid("Manual template does not accept suggested times"));
    }
    for time in times {
        if time.kind() != periodicity {
            return Err(OpError::invalid("All suggested times must match template periodicity"));
        }
        validate(time)?;
    }
    Ok(())
}

/// The IANA zone, from the bundled database (spec §3.18.1 strings).
pub fn time_zone(name: &str) -> Result<TimeZone, OpError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(OpError::invalid("Timezone is required"));
    }
    TimeZone::get(trimmed).map_err(|_| OpError::invalid(format!("Invalid timezone '{name}'")))
}

fn instant(date: Date, slot: &Slot, tz: &TimeZone) -> Option<Millis> {
    let civil = date.at(slot.hour, slot.minute, 0, 0);
    // `to_zoned` disambiguates with `compatible`: see the module doc.
    civil.to_zoned(tz.clone()).ok().map(|z| z.timestamp().as_millisecond())
}

/// The first slot strictly after `from_ms + 1000` (spec §3.18.2), in `tz`.
pub fn next_run_at(slot: &Slot, tz: &TimeZone, from_ms: Millis) -> Result<Millis, OpError> {
    let from = from_ms.saturating_add(1000);
    let exhausted = |what: &str| OpError::invalid(format!("Unable to compute next {what} run"));
    let Ok(from_ts) = Timestamp::from_millisecond(from) else {
        return Err(OpError::invalid("time out of range"));
    };
    // One day back: a slot of the previous local date can land after `from` when a gap
    // pushes it past midnight.
    let start = from_ts.to_zoned(tz.clone()).date().checked_sub(1.day()).map_err(OpError::internal)?;
    match slot.kind {
        SlotKind::Daily | SlotKind::Weekly(_) => {
            let (days, what) = if slot.kind == SlotKind::Daily { (371, "daily") } else { (381, "weekly") };
            let mut date = start;
            for _ in 0..days {
                let wanted = match slot.kind {
                    SlotKind::Weekly(w) => date.weekday().to_monday_one_offset() == w,
                    _ => true,
                };
                if wanted && let Some(t) = instant(date, slot, tz).filter(|t| *t > from) {
                    return Ok(t);
                }
                date = date.checked_add(1.day()).map_err(|_| exhausted(what))?;
            }
            Err(exhausted(what))
        }
        SlotKind::Monthly(day) => {
            let mut first = start.first_of_month();
            for _ in 0..37 {
                let last = first.days_in_month();
                let d = day.map_or(last, |d| d.min(last));
                let date = first.with().day(d).build().map_err(OpError::internal)?;
                if let Some(t) = instant(date, slot, tz).filter(|t| *t > from) {
                    return Ok(t);
                }
                first = first.checked_add(1.month()).map_err(|_| exhausted("monthly"))?;
            }
            Err(exhausted("monthly"))
        }
    }
}

/// The local wall time of an instant in `tz` (for logs and tests).
pub fn local(tz: &TimeZone, ms: Millis) -> Option<DateTime> {
    Timestamp::from_millisecond(ms).ok().map(|t| t.to_zoned(tz.clone()).datetime())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slot(kind: SlotKind, hour: i8, minute: i8) -> Slot {
        Slot { kind, hour, minute }
    }

    fn ms(s: &str) -> Millis {
        s.parse::<Timestamp>().expect("timestamp").as_millisecond()
    }

    #[test]
    fn validation_uses_the_original_strings() {
        assert_eq!(parse_time(" 08:05 ").expect("ok"), (8, 5));
        for bad in ["8:05", "24:00", "12:60", "ab:cd", "", "12:5"] {
            assert_eq!(parse_time(bad).expect_err(bad).message, format!("Invalid time '{bad}', expected HH:mm"));
        }
        let weekly =
            |w: &str| serde_json::from_str::<Schedule>(&format!(r#"{{"kind":"weekly","weekday":{w},"time":"08:00"}}"#));
        assert_eq!(
            validate(&weekly("8").expect("json")).expect_err("8").message,
            "Weekly schedule weekday must be in range 1..7"
        );
        assert_eq!(
            validate(&weekly("1.5").expect("json")).expect_err("1.5").message,
            "Weekly schedule weekday must be in range 1..7"
        );
        assert!(validate(&weekly("7").expect("json")).is_ok());
        let monthly = |d: &str| {
            serde_json::from_str::<Schedule>(&format!(r#"{{"kind":"monthly","dayOfMonth":{d},"time":"08:00"}}"#))
        };
        for bad in ["0", "32", "\"first\""] {
            assert_eq!(
                validate(&monthly(bad).expect("json")).expect_err(bad).message,
                "Monthly schedule dayOfMonth must be 1..31 or 'last'"
            );
        }
        assert!(validate(&monthly("\"last\"").expect("json")).is_ok());
        let daily = Schedule::Daily { time: "08:00".into() };
        assert_eq!(
            validate_for(Periodicity::Weekly, &daily).expect_err("kind").message,
            "Schedule kind must match periodicity"
        );
        assert_eq!(
            validate_for(Periodicity::Manual, &daily).expect_err("manual").message,
            "Schedule kind must match periodicity"
        );
        assert_eq!(
            validate_suggested(Periodicity::Manual, std::slice::from_ref(&daily)).expect_err("manual").message,
            "Manual template does not accept suggested times"
        );
        assert_eq!(
            validate_suggested(Periodicity::Weekly, &[daily]).expect_err("kind").message,
            "All suggested times must match template periodicity"
        );
        assert_eq!(time_zone("  ").expect_err("blank").message, "Timezone is required");
        assert_eq!(time_zone("Mars/Olympus").expect_err("bad").message, "Invalid timezone 'Mars/Olympus'");
        assert!(time_zone("Australia/Lord_Howe").is_ok());
    }

    #[test]
    fn known_vectors() {
        let utc = time_zone("UTC").expect("utc");
        // Spec §3.18.5: daily 08:00 UTC created at 07:59.
        let t = next_run_at(&slot(SlotKind::Daily, 8, 0), &utc, ms("2026-01-01T07:59:00Z")).expect("next");
        assert_eq!(t, ms("2026-01-01T08:00:00Z"));
        // Exactly at the slot (and within the first second): the next day.
        assert_eq!(
            next_run_at(&slot(SlotKind::Daily, 8, 0), &utc, ms("2026-01-01T07:59:59.500Z")).expect("next"),
            ms("2026-01-02T08:00:00Z")
        );
        let rome = time_zone("Europe/Rome").expect("rome");
        // Weekly Monday 09:30 Rome from Wednesday 2026-01-07.
        assert_eq!(
            next_run_at(&slot(SlotKind::Weekly(1), 9, 30), &rome, ms("2026-01-07T12:00:00Z")).expect("next"),
            ms("2026-01-12T08:30:00Z")
        );
        // Monthly 31 in a 30-day month → the 30th; `last` in February 2028 (leap) → the 29th.
        assert_eq!(
            next_run_at(&slot(SlotKind::Monthly(Some(31)), 10, 0), &utc, ms("2026-04-01T00:00:00Z")).expect("next"),
            ms("2026-04-30T10:00:00Z")
        );
        assert_eq!(
            next_run_at(&slot(SlotKind::Monthly(None), 10, 0), &utc, ms("2028-02-01T00:00:00Z")).expect("next"),
            ms("2028-02-29T10:00:00Z")
        );
        // New York spring forward (2026-03-08, 02:00 → 03:00): 02:30 fires at 03:30 EDT.
        let ny = time_zone("America/New_York").expect("ny");
        assert_eq!(
            next_run_at(&slot(SlotKind::Daily, 2, 30), &ny, ms("2026-03-08T05:00:00Z")).expect("next"),
            ms("2026-03-08T07:30:00Z")
        );
        // Fall back (2026-11-01, 02:00 → 01:00): 01:30 fires once, at the first (EDT) 01:30.
        assert_eq!(
            next_run_at(&slot(SlotKind::Daily, 1, 30), &ny, ms("2026-11-01T04:00:00Z")).expect("next"),
            ms("2026-11-01T05:30:00Z")
        );
        assert_eq!(
            next_run_at(&slot(SlotKind::Daily, 1, 30), &ny, ms("2026-11-01T05:30:00Z")).expect("next"),
            ms("2026-11-02T06:30:00Z"),
            "the second 01:30 of the night does not fire again"
        );
    }

    // -----------------------------------------------------------------------------------------
    // An independent reference: for each candidate local date, search the UTC instants around
    // it in 15-minute steps (every offset of the zones below is a multiple of 15 minutes) for
    // those whose local wall time is the slot's; take the first; when none exists (a gap), use
    // the offset observed just before the local time passed the slot. It uses only the
    // unambiguous UTC → local direction of the tz database.

    const ZONES: &[&str] = &[
        "UTC",
        "Europe/Rome",
        "America/New_York",
        "Australia/Lord_Howe",
        "Asia/Kathmandu",
        "Pacific/Chatham",
        "America/Santiago",
        "Asia/Tehran",
        "Pacific/Apia",
        "Africa/Casablanca",
        "Europe/London",
        "America/Sao_Paulo",
    ];

    fn wall(tz: &TimeZone, t: i64) -> DateTime {
        local(tz, t).expect("in range")
    }

    fn reference_instant(tz: &TimeZone, date: Date, hour: i8, minute: i8) -> i64 {
        let target = date.at(hour, minute, 0, 0);
        let naive = target.to_zoned(TimeZone::UTC).expect("utc").timestamp().as_millisecond();
        let step = 15 * 60_000;
        let window = 27 * 3_600_000;
        let mut t = naive - window;
        let mut before: Option<i64> = None;
        let mut first_match = None;
        while t <= naive + window {
            let w = wall(tz, t);
            if w == target {
                first_match = Some(t);
                break;
            }
            if w < target {
                before = Some(t);
            }
            t += step;
        }
        if let Some(t) = first_match {
            return t;
        }
        let b = before.expect("the scan starts before the slot");
        let offset_before = wall(tz, b).to_zoned(TimeZone::UTC).expect("utc").timestamp().as_millisecond() - b;
        naive - offset_before
    }

    fn reference_next(slot: &Slot, tz: &TimeZone, from_ms: i64) -> i64 {
        let from = from_ms + 1000;
        let start = wall(tz, from).date().checked_sub(1.day()).expect("date");
        let mut dates = Vec::new();
        match slot.kind {
            SlotKind::Daily => dates.extend((0..5).map(|i| start.checked_add(i.days()).expect("date"))),
            SlotKind::Weekly(w) => dates.extend(
                (0..16)
                    .map(|i| start.checked_add(i.days()).expect("date"))
                    .filter(|d| d.weekday().to_monday_one_offset() == w),
            ),
            SlotKind::Monthly(day) => {
                for i in 0..4 {
                    let first = start.first_of_month().checked_add(i.months()).expect("month");
                    let last = first.days_in_month();
                    dates.push(first.with().day(day.map_or(last, |d| d.min(last))).build().expect("day"));
                }
            }
        }
        dates
            .into_iter()
            .map(|d| reference_instant(tz, d, slot.hour, slot.minute))
            .find(|t| *t > from)
            .expect("a slot within the window")
    }

    fn any_slot() -> impl Strategy<Value = Slot> {
        let kind = prop_oneof![
            Just(SlotKind::Daily),
            (1i8..=7).prop_map(SlotKind::Weekly),
            prop_oneof![Just(None), (1i8..=31).prop_map(Some)].prop_map(SlotKind::Monthly),
        ];
        // Hours around midnight and the usual DST switch hours are drawn more often.
        let hour = prop_oneof![0i8..24, prop::sample::select(vec![0i8, 1, 2, 3, 23])];
        let minute = prop_oneof![0i8..60, prop::sample::select(vec![0i8, 15, 30, 45])];
        (kind, hour, minute).prop_map(|(kind, hour, minute)| Slot { kind, hour, minute })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn next_run_matches_the_reference(
            zone in prop::sample::select(ZONES),
            slot in any_slot(),
            // 1990 .. 2037, to the millisecond.
            from in 631_152_000_000i64..2_114_380_800_000,
        ) {
            let tz = time_zone(zone).expect("zone");
            let got = next_run_at(&slot, &tz, from).expect("next run");
            prop_assert!(got > from + 1000, "strictly after from");
            let expected = reference_next(&slot, &tz, from);
            prop_assert_eq!(got, expected, "{} {:?} from {}", zone, slot, from);
            // On the requested wall time, unless the slot fell into a gap (then later).
            let w = wall(&tz, got);
            if w.hour() != slot.hour || w.minute() != slot.minute {
                let shifted = w.time() > jiff::civil::time(slot.hour, slot.minute, 0, 0) || w.date() > wall(&tz, got - 86_400_000).date();
                prop_assert!(shifted, "only a gap moves a slot, and only later");
            }
        }
    }
}
