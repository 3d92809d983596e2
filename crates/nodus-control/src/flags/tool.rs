//! The behaviour of the `flags` tool (`nodus flags list|up|down|count|raised`), after the
//! reference's `raise-flag`: which arguments each command takes, what it prints and its exit
//! code. The CLI parses arguments with clap, builds requests here, sends them and prints what
//! these functions render.
//!
//! | command | arguments | prints | exit |
//! |---|---|---|---|
//! | `up` | `<unit> <section> <flag> <message>`, `--priority 0..100`, `--manual` or `--automatic` (default), `--tags a,b` (comma or space, repeatable), `--source-file`, `--function`, `--line >= 1` | nothing | 0 |
//! | `down` | `<unit> <section> <flag> [<message>]` (the message is ignored), `--manual` to lower a manual-down flag | nothing | 0 |
//! | `list` | `--format text|json` (text: a table and "Found N raised flags") | the flags | 0 |
//! | `count` | none | the number of raised flags | 1 when any is raised, else 0 |
//! | `raised` | none, or `<unit> <section> <flag>` | nothing | 1 when that flag (or any) is raised, else 0 |
//!
//! Any error (bad arguments, the node unreachable or refusing) exits with [`EXIT_ERROR`], the
//! nodus CLI's code for failures: the reference uses 1 there too, which a monitoring script
//! cannot tell from "raised".

use super::wire::split_tags;
use super::{Flag, FlagError, FlagKey, FlagReply, FlagRequest, Raise, MAX_PRIORITY};
use std::fmt::Write as _;

/// Exit code: done, and for `count`/`raised`: no flag raised.
pub const EXIT_OK: u8 = 0;
/// Exit code of `count`/`raised` when a flag is raised.
pub const EXIT_RAISED: u8 = 1;
/// Exit code of any failure.
pub const EXIT_ERROR: u8 = 2;

/// Output of `list`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListFormat {
    /// An aligned table (default).
    #[default]
    Text,
    /// JSON: `{"count": N, "flags": [...]}`.
    Json,
}

impl std::str::FromStr for ListFormat {
    type Err = String;

    /// Parses `text` or `json`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(ListFormat::Text),
            "json" => Ok(ListFormat::Json),
            _ => Err(format!("unknown output list mode {s:?}: use text or json")),
        }
    }
}

/// The arguments of `up`, as given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpArgs {
    /// `<unit> <section> <flag> <message>`.
    pub names: Vec<String>,
    /// `--priority`.
    pub priority: Option<i64>,
    /// `--manual`.
    pub manual: bool,
    /// `--automatic`.
    pub automatic: bool,
    /// `--tags` (each may hold several, split on commas and spaces).
    pub tags: Vec<String>,
    /// `--source-file`.
    pub source_file: Option<String>,
    /// `--function`.
    pub function: Option<String>,
    /// `--line`.
    pub line: Option<i64>,
}

/// `up`: the `FLAG_UP` request.
///
/// Fails unless there are exactly four names, when both `--manual` and `--automatic` are given,
/// when the priority is outside 0–100, the line below 1, or a name or tag is invalid.
pub fn up(args: &UpArgs) -> Result<FlagRequest, FlagError> {
    let [unit, section, name, message] = args.names.as_slice() else {
        return Err(usage("names", "up expects 4 parameters: <unit> <section> <flag> <message>"));
    };
    if args.manual && args.automatic {
        return Err(usage("manual", "only one of --manual or --automatic (the default) is allowed"));
    }
    let mut r = Raise::new(FlagKey::new(unit, section, name)?, message.clone()).manual_down(args.manual);
    if let Some(p) = args.priority {
        if !(0..=i64::from(MAX_PRIORITY)).contains(&p) {
            return Err(FlagError::BadPriority(p));
        }
        r.priority = p as u8;
    }
    for t in args.tags.iter().flat_map(|t| split_tags(t)) {
        r.tags.insert(t.to_string());
    }
    if let Some(f) = &args.source_file {
        r.source_file.clone_from(f);
    }
    if let Some(f) = &args.function {
        r.function.clone_from(f);
    }
    if let Some(l) = args.line {
        r.line = u32::try_from(l).ok().filter(|l| *l >= 1).ok_or_else(|| usage("line", "--line must be 1 or more"))?;
    }
    Ok(FlagRequest::Up(r.checked()?))
}

/// `down`: `FLAG_DOWN`, or `FLAG_CLEAR` with `--manual`.
///
/// Fails unless there are 3 or 4 names (a 4th, the message, is ignored) or a name is invalid.
pub fn down(names: &[String], manual: bool) -> Result<FlagRequest, FlagError> {
    let (3 | 4) = names.len() else {
        return Err(usage("names", "down expects 3 or 4 parameters: <unit> <section> <flag> [<message>]"));
    };
    let key = FlagKey::new(&names[0], &names[1], &names[2])?;
    Ok(if manual { FlagRequest::Clear(key) } else { FlagRequest::Down(key) })
}

/// `raised`: `FLAG_STATUS` about every flag, or about one.
///
/// Fails unless there are 0 or 3 names, or a name is invalid.
pub fn raised(names: &[String]) -> Result<FlagRequest, FlagError> {
    match names {
        [] => Ok(FlagRequest::Status(None)),
        [unit, section, name] => Ok(FlagRequest::Status(Some(FlagKey::new(unit, section, name)?))),
        _ => Err(usage("names", "raised expects no parameter, or <unit> <section> <flag>")),
    }
}

/// `count`: `FLAG_STATUS` about every flag.
pub fn count() -> FlagRequest {
    FlagRequest::Status(None)
}

/// The exit code for a successful reply: [`EXIT_RAISED`] for a status saying a flag is raised,
/// [`EXIT_OK`] otherwise.
pub fn exit_code(reply: &FlagReply) -> u8 {
    match reply {
        FlagReply::Status { raised: true, .. } => EXIT_RAISED,
        _ => EXIT_OK,
    }
}

/// `list --format json`.
pub fn render_json(flags: &[Flag]) -> String {
    serde_json::json!({ "count": flags.len(), "flags": flags }).to_string()
}

/// `list` as text: the reference's table (unit, section, name, count, source file, function,
/// line, message, priority, manual, date, modified, hostname, version, tags; numbers aligned right,
/// dates as HTTP dates) and a "Found N raised flags" footer.
pub fn render_text(flags: &[Flag]) -> String {
    const HEADERS: [&str; 15] = [
        "unit",
        "section",
        "name",
        "count",
        "source_file",
        "function",
        "line",
        "message",
        "priority",
        "manual",
        "date",
        "modified",
        "hostname",
        "version",
        "tags",
    ];
    const RIGHT: [usize; 3] = [3, 6, 8];
    let rows: Vec<[String; 15]> = flags
        .iter()
        .map(|f| {
            [
                f.unit.clone(),
                f.section.clone(),
                f.name.clone(),
                f.count.to_string(),
                f.source_file.clone(),
                f.function.clone(),
                f.line.to_string(),
                f.message.replace(['\n', '\r'], " "),
                f.priority.to_string(),
                if f.manual_down { "yes" } else { "no" }.to_string(),
                http_date(f.date),
                http_date(f.modified),
                f.hostname.clone(),
                f.version.clone(),
                f.tags.iter().cloned().collect::<Vec<_>>().join(", "),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let w = widths[i];
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else if RIGHT.contains(&i) {
                let _ = write!(s, "{cell:>w$}  ");
            } else {
                let _ = write!(s, "{cell:<w$}  ");
            }
        }
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(&mut out, &HEADERS.map(String::from));
    line(&mut out, &HEADERS.map(|h| "-".repeat(h.len())));
    for row in &rows {
        line(&mut out, row);
    }
    let n = flags.len();
    let _ = write!(out, "----------------------\nFound {n} raised flag{}\n", if n == 1 { "" } else { "s" });
    out
}

/// `count`: the number alone.
pub fn render_count(count: usize) -> String {
    count.to_string()
}

/// A Unix-ms time as an HTTP date (`Fri, 24 Aug 2018 12:29:23 GMT`), as the reference lists
/// flags.
pub fn http_date(ms: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Days since 1970-01-01 to a proleptic Gregorian date (eras of 400 years, March-based years).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    )
}

fn usage(param: &'static str, expected: &'static str) -> FlagError {
    FlagError::BadParam { command: "nodus flags".into(), param, value: String::new(), expected }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn up_needs_four_names_and_checks_options() {
        let args = UpArgs {
            names: names(&["backup", "nightly", "failed", "disk full"]),
            priority: Some(60),
            manual: true,
            tags: vec!["disk,backup".into(), "night".into()],
            line: Some(3),
            ..Default::default()
        };
        let FlagRequest::Up(r) = up(&args).unwrap() else { panic!() };
        assert_eq!((r.priority, r.manual_down, r.line, r.tags.len()), (60, true, 3, 3));
        let bad = [
            (UpArgs { names: names(&["a", "b", "c"]), ..Default::default() }, "up expects 4 parameters"),
            (UpArgs { manual: true, automatic: true, ..args.clone() }, "only one of --manual or --automatic"),
            (UpArgs { priority: Some(101), ..args.clone() }, "out of range"),
            (UpArgs { priority: Some(-1), ..args.clone() }, "out of range"),
            (UpArgs { line: Some(0), ..args.clone() }, "--line must be 1 or more"),
            (UpArgs { tags: vec!["a_b".into()], ..args.clone() }, "invalid flag tag"),
        ];
        for (a, want) in bad {
            let e = up(&a).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn down_takes_three_or_four_names_and_manual_means_clear() {
        let k = FlagKey::new("a", "b", "c").unwrap();
        assert_eq!(down(&names(&["a", "b", "c"]), false), Ok(FlagRequest::Down(k.clone())));
        assert_eq!(down(&names(&["a", "b", "c", "ignored message"]), true), Ok(FlagRequest::Clear(k)));
        assert!(down(&names(&["a", "b"]), false).unwrap_err().to_string().contains("3 or 4 parameters"));
    }

    #[test]
    fn count_and_raised_exit_one_when_a_flag_is_raised() {
        assert_eq!(count(), FlagRequest::Status(None));
        assert_eq!(raised(&[]), Ok(FlagRequest::Status(None)));
        assert!(raised(&names(&["a"])).is_err());
        assert_eq!(exit_code(&FlagReply::Status { key: None, count: 0, raised: false }), EXIT_OK);
        assert_eq!(exit_code(&FlagReply::Status { key: None, count: 2, raised: true }), EXIT_RAISED);
        let k = FlagKey::new("a", "b", "c").unwrap();
        assert_eq!(exit_code(&FlagReply::IsDown { key: k, lowered: true }), EXIT_OK);
        assert_eq!(render_count(7), "7");
    }

    #[test]
    fn text_list_is_an_aligned_table_with_a_footer() {
        let mut set = super::super::FlagSet::new(10, "host-a", "0.1.0");
        set.raise(Raise::new(FlagKey::new("nodus", "links", "unreachable").unwrap(), "b is\nunreachable").tag("x"), 0)
            .unwrap();
        let flags: Vec<Flag> = set.list().into_iter().cloned().collect();
        let text = render_text(&flags);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("unit   section  name         count  source_file"), "{text}");
        assert!(lines[2].contains("b is unreachable"), "newlines flattened: {text}");
        assert!(lines[2].contains("Thu, 01 Jan 1970 00:00:00 GMT"), "{text}");
        assert_eq!(lines.last(), Some(&"Found 1 raised flag"));
        assert!(render_text(&[]).ends_with("Found 0 raised flags\n"));
        let json: serde_json::Value = serde_json::from_str(&render_json(&flags)).unwrap();
        assert_eq!(json["count"], 1);
        assert_eq!(json["flags"][0]["name"], "unreachable");
        assert_eq!(json["flags"][0]["manual_down"], false);
    }

    #[test]
    fn http_dates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_535_113_763_000), "Fri, 24 Aug 2018 12:29:23 GMT");
        assert_eq!(http_date(951_782_400_000), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(-1_000), "Wed, 31 Dec 1969 23:59:59 GMT");
    }
}
