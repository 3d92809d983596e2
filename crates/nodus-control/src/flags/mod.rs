//! Flags, field for field as communicatord's: a program (or the node itself) raises a flag when
//! something needs an operator's attention and lowers it when the condition clears.
//!
//! A flag is named by `unit`/`section`/`name` (each `[a-z][a-z0-9]*(-[a-z0-9]+)*`, upper case
//! folded to lower case, no `_` because it separates the parts of the file name) and carries a
//! `message`, a `priority` (0–100, default 5), `manual_down`, `tags` (named like the parts), the
//! source file, function and line that raised it, the date it was first raised, the date it was
//! last raised (`modified`), the `hostname` and `version` that wrote it and a raise `count`.
//!
//! Semantics (the reference's `flag::save()` unless noted):
//! - Raising an existing flag replaces its message and priority, replaces its tags, source file,
//!   function and line when given, keeps `date`, sets `modified`, `hostname` and `version`, and
//!   adds one to `count`. A new flag starts at `count = 1` with `date = modified = now`.
//! - Lowering deletes the flag; lowering a flag that is not raised succeeds (it "works every
//!   time").
//! - `manual_down` means only an operator takes the flag down. The reference leaves that to
//!   discipline; nodus enforces it: an automatic lowering (`FLAG_DOWN`) of a manual-down flag is
//!   refused, only a manual one (`FLAG_CLEAR`, admin) lowers it, and re-raising a manual-down
//!   flag without `manual_down` keeps it manual-down.
//! - At most `limit` flags are kept (the reference's `FLAGS_LIMIT`, 100). Past it a new flag is
//!   refused and the "too many flags" flag (`nodus/flag/too-many-flags`, priority 97, tags `flag`
//!   and `too-many`) is raised in its place; like the reference's it is not saved, and it is
//!   lowered as soon as there is room again.
//!
//! [`FlagSet`] is the pure core; [`store`] persists it in a directory (one file per flag);
//! [`wire`] maps the `FLAG_*` messages; [`tool`] describes the `flags` tool's behaviour.

pub mod file;
pub mod store;
pub mod tool;
pub mod wire;

pub use store::{Flags, FlagsConfig, LoadProblem};
pub use wire::{FlagReply, FlagRequest};

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Default priority of a flag.
pub const DEFAULT_PRIORITY: u8 = 5;
/// Highest priority.
pub const MAX_PRIORITY: u8 = 100;
/// Default number of flags kept (the reference's `FLAGS_LIMIT`).
pub const DEFAULT_FLAGS_LIMIT: usize = 100;
/// Longest unit, section, name or tag, in bytes (so a flag's file name stays well under 255).
pub const MAX_NAME_BYTES: usize = 64;
/// Most tags on one flag.
pub const MAX_TAGS: usize = 32;
/// Longest message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Longest source file or function name, in bytes.
pub const MAX_SOURCE_BYTES: usize = 1024;
/// Unit of the flags the node raises itself.
pub const NODE_UNIT: &str = "nodus";
/// Priority of the "too many flags" flag (the reference's).
pub const TOO_MANY_PRIORITY: u8 = 97;

/// Checks a unit, section, name or tag the way the reference does, and folds it to lower case.
///
/// Fails when it is empty, longer than [`MAX_NAME_BYTES`], starts with a digit or a dash, ends
/// with a dash, has two dashes in a row, or has a character other than letters, digits and dashes.
pub fn check_name(what: &'static str, name: &str) -> Result<String, FlagError> {
    let bad = |reason: &'static str| FlagError::BadName { what, name: clip(name), reason };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(bad("it is longer than 64 bytes"));
    }
    let mut out = String::with_capacity(name.len());
    let mut last = '\0';
    for (i, c) in name.chars().enumerate() {
        let c = c.to_ascii_lowercase();
        match c {
            '-' if i == 0 => return Err(bad("it starts with a dash")),
            '-' if last == '-' => return Err(bad("it has two dashes in a row")),
            '0'..='9' if i == 0 => return Err(bad("it starts with a digit")),
            'a'..='z' | '0'..='9' | '-' => {}
            _ => return Err(bad("it has a character other than letters, digits and dashes")),
        }
        out.push(c);
        last = c;
    }
    if last == '-' {
        return Err(bad("it ends with a dash"));
    }
    Ok(out)
}

/// The identity of a flag: `unit`/`section`/`name`, checked and in lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlagKey {
    unit: String,
    section: String,
    name: String,
}

impl FlagKey {
    /// A key from its three parts.
    ///
    /// Fails with [`FlagError::BadName`] naming the first part that breaks [`check_name`].
    pub fn new(unit: &str, section: &str, name: &str) -> Result<Self, FlagError> {
        Ok(FlagKey {
            unit: check_name("unit", unit)?,
            section: check_name("section", section)?,
            name: check_name("name", name)?,
        })
    }

    /// The unit (the project raising the flag).
    pub fn unit(&self) -> &str {
        &self.unit
    }

    /// The section (the part of the project).
    pub fn section(&self) -> &str {
        &self.section
    }

    /// The flag's own name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file the flag is kept in: `<unit>_<section>_<name>.flag`.
    pub fn file_name(&self) -> String {
        format!("{}_{}_{}.flag", self.unit, self.section, self.name)
    }

    /// The key of the "too many flags" flag.
    pub fn too_many() -> Self {
        FlagKey { unit: NODE_UNIT.into(), section: "flag".into(), name: "too-many-flags".into() }
    }
}

impl fmt::Display for FlagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.unit, self.section, self.name)
    }
}

/// One raised flag, with every field of the reference (times are Unix ms).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flag {
    /// The project raising it.
    pub unit: String,
    /// The part of the project.
    pub section: String,
    /// The flag's name.
    pub name: String,
    /// What is wrong and what to do.
    pub message: String,
    /// 0–100; high priorities alert people.
    pub priority: u8,
    /// True when only an operator may take it down.
    pub manual_down: bool,
    /// Tags grouping it with other flags.
    pub tags: BTreeSet<String>,
    /// Source file that raised it.
    pub source_file: String,
    /// Function that raised it.
    pub function: String,
    /// Line that raised it (0 = unknown).
    pub line: u32,
    /// When it was first raised.
    pub date: i64,
    /// When it was last raised.
    pub modified: i64,
    /// The host that raised it.
    pub hostname: String,
    /// The nodus version that wrote it.
    pub version: String,
    /// How many times it was raised.
    pub count: u64,
}

impl Flag {
    /// Its key (the parts were checked when the flag was built or loaded).
    pub fn key(&self) -> FlagKey {
        FlagKey { unit: self.unit.clone(), section: self.section.clone(), name: self.name.clone() }
    }
}

/// A request to raise a flag, with the reference's defaults (priority 5, automatic, no tags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raise {
    /// Which flag.
    pub key: FlagKey,
    /// What is wrong and what to do.
    pub message: String,
    /// 0–100.
    pub priority: u8,
    /// Only an operator may take it down.
    pub manual_down: bool,
    /// Tags (checked like names; replace the flag's tags when not empty).
    pub tags: BTreeSet<String>,
    /// Source file (kept from the last raise when empty).
    pub source_file: String,
    /// Function (kept from the last raise when empty).
    pub function: String,
    /// Line (kept from the last raise when 0).
    pub line: u32,
}

impl Raise {
    /// Raise `key` with `message` and the defaults.
    pub fn new(key: FlagKey, message: impl Into<String>) -> Self {
        Raise {
            key,
            message: message.into(),
            priority: DEFAULT_PRIORITY,
            manual_down: false,
            tags: BTreeSet::new(),
            source_file: String::new(),
            function: String::new(),
            line: 0,
        }
    }

    /// Builder: the priority (checked when raised).
    pub fn priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Builder: only an operator may take it down.
    pub fn manual_down(mut self, manual: bool) -> Self {
        self.manual_down = manual;
        self
    }

    /// Builder: add a tag (checked when raised).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.insert(tag.into());
        self
    }

    /// Builder: where in the code it is raised.
    pub fn source(mut self, file: impl Into<String>, function: impl Into<String>, line: u32) -> Self {
        self.source_file = file.into();
        self.function = function.into();
        self.line = line;
        self
    }

    /// The raise with its tags checked and folded to lower case.
    ///
    /// Fails when the priority is above 100, a tag is not a valid name, there are too many tags,
    /// or the message, source file or function is too long.
    pub fn checked(mut self) -> Result<Self, FlagError> {
        if self.priority > MAX_PRIORITY {
            return Err(FlagError::BadPriority(i64::from(self.priority)));
        }
        if self.tags.len() > MAX_TAGS {
            return Err(FlagError::TooManyTags { max: MAX_TAGS });
        }
        self.tags = self.tags.iter().map(|t| check_name("tag", t)).collect::<Result<_, _>>()?;
        check_len("message", &self.message, MAX_MESSAGE_BYTES)?;
        check_len("source_file", &self.source_file, MAX_SOURCE_BYTES)?;
        check_len("function", &self.function, MAX_SOURCE_BYTES)?;
        Ok(self)
    }
}

/// Who lowers a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lowering {
    /// The program that raised it, because the condition cleared (`FLAG_DOWN`).
    Automatic,
    /// An operator (`FLAG_CLEAR`, `nodus flags down --manual`): lowers any flag.
    Manual,
}

/// The outcome of a raise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raised {
    /// The flag as it now is.
    pub flag: Flag,
    /// True when it was not raised before.
    pub new: bool,
}

/// Why a flag operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    /// A unit, section, name or tag breaks the naming rule.
    #[error(
        "invalid flag {what} {name:?}: {reason} (use [a-z][a-z0-9-]*, no double or trailing dash, at most 64 bytes)"
    )]
    BadName {
        /// Which part.
        what: &'static str,
        /// The value (clipped).
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A text field is too long.
    #[error("flag {field} is longer than {max} bytes")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its bound.
        max: usize,
    },
    /// Too many tags.
    #[error("a flag has at most {max} tags")]
    TooManyTags {
        /// The bound.
        max: usize,
    },
    /// The priority is outside 0–100.
    #[error("flag priority {0} is out of range: use 0 to 100 (default 5)")]
    BadPriority(i64),
    /// A required parameter of a `FLAG_*` message is missing.
    #[error("{command} needs {param}=<{what}>")]
    Missing {
        /// The command.
        command: String,
        /// The parameter.
        param: &'static str,
        /// What it holds.
        what: &'static str,
    },
    /// A parameter of a `FLAG_*` message (or a tool argument) cannot be used.
    #[error("{command}: {param}={value:?} is invalid: {expected}")]
    BadParam {
        /// The command.
        command: String,
        /// The parameter.
        param: &'static str,
        /// The value (clipped).
        value: String,
        /// What is expected.
        expected: &'static str,
    },
    /// The flag is the node's own "too many flags" flag, which only the node raises.
    #[error("flag {0} is reserved to the node")]
    Reserved(FlagKey),
    /// An automatic lowering of a manual-down flag.
    #[error("flag {0} is manual-down: only an operator lowers it (nodus flags down --manual {unit} {section} {name}, or FLAG_CLEAR)", unit = .0.unit, section = .0.section, name = .0.name)]
    ManualDown(FlagKey),
    /// The flag limit is reached: the new flag was refused.
    #[error("too many flags: at most {limit} are kept; lower some (nodus flags list) before raising new ones")]
    TooMany {
        /// The limit.
        limit: usize,
    },
    /// The flag directory could not be written or read.
    #[error("flag storage failed on {path}: {error}")]
    Storage {
        /// The file or directory.
        path: String,
        /// The system's error.
        error: String,
    },
    /// The node refused a request (a reply read by a client).
    #[error("the node refused: {code}: {message}")]
    Refused {
        /// `INVALID`, or the `code` of an `ERROR`.
        code: String,
        /// Its message.
        message: String,
    },
}

impl FlagError {
    /// True when the request itself is malformed (answered `INVALID`), false when it was
    /// understood and refused (answered `ERROR code=<code>`).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            FlagError::BadName { .. }
                | FlagError::TooLong { .. }
                | FlagError::TooManyTags { .. }
                | FlagError::BadPriority(_)
                | FlagError::Missing { .. }
                | FlagError::BadParam { .. }
        )
    }

    /// The `code` of the `ERROR` carrying this refusal.
    pub fn code(&self) -> &str {
        match self {
            FlagError::Reserved(_) => "reserved",
            FlagError::ManualDown(_) => "manual_down",
            FlagError::TooMany { .. } => "too_many_flags",
            FlagError::Storage { .. } => "storage",
            FlagError::Refused { code, .. } => code,
            _ => "invalid",
        }
    }
}

/// The flags of one node, in memory: the pure core of [`Flags`] (no I/O; `now` is an argument).
#[derive(Debug, Clone)]
pub struct FlagSet {
    flags: BTreeMap<FlagKey, Flag>,
    limit: usize,
    too_many: Option<Flag>,
    hostname: String,
    version: String,
}

impl FlagSet {
    /// An empty set keeping at most `limit` flags, stamping raises with `hostname` and `version`.
    pub fn new(limit: usize, hostname: impl Into<String>, version: impl Into<String>) -> Self {
        FlagSet { flags: BTreeMap::new(), limit, too_many: None, hostname: hostname.into(), version: version.into() }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Raises a flag (see the module's semantics).
    ///
    /// Fails when the raise is invalid, names the reserved "too many flags" flag, or is a new
    /// flag past the limit (the "too many flags" flag is then raised).
    pub fn raise(&mut self, raise: Raise, now: i64) -> Result<Raised, FlagError> {
        let r = raise.checked()?;
        if r.key == FlagKey::too_many() {
            return Err(FlagError::Reserved(r.key));
        }
        if let Some(f) = self.flags.get_mut(&r.key) {
            f.message = r.message;
            f.priority = r.priority;
            f.manual_down |= r.manual_down;
            if !r.tags.is_empty() {
                f.tags = r.tags;
            }
            if !r.source_file.is_empty() {
                f.source_file = r.source_file;
            }
            if !r.function.is_empty() {
                f.function = r.function;
            }
            if r.line != 0 {
                f.line = r.line;
            }
            f.modified = now;
            f.hostname.clone_from(&self.hostname);
            f.version.clone_from(&self.version);
            f.count = f.count.saturating_add(1);
            return Ok(Raised { flag: f.clone(), new: false });
        }
        if self.flags.len() >= self.limit {
            self.raise_too_many(now, None);
            return Err(FlagError::TooMany { limit: self.limit });
        }
        let flag = Flag {
            unit: r.key.unit.clone(),
            section: r.key.section.clone(),
            name: r.key.name.clone(),
            message: r.message,
            priority: r.priority,
            manual_down: r.manual_down,
            tags: r.tags,
            source_file: r.source_file,
            function: r.function,
            line: r.line,
            date: now,
            modified: now,
            hostname: self.hostname.clone(),
            version: self.version.clone(),
            count: 1,
        };
        self.flags.insert(r.key, flag.clone());
        Ok(Raised { flag, new: true })
    }

    /// Lowers a flag; `Ok(None)` when it was not raised.
    ///
    /// Fails with [`FlagError::ManualDown`] when an automatic lowering meets a manual-down flag.
    /// Lowering the "too many flags" flag clears it until the next refused raise.
    pub fn lower(&mut self, key: &FlagKey, how: Lowering) -> Result<Option<Flag>, FlagError> {
        if *key == FlagKey::too_many() {
            return Ok(self.too_many.take());
        }
        match self.flags.get(key) {
            None => return Ok(None),
            Some(f) if f.manual_down && how == Lowering::Automatic => return Err(FlagError::ManualDown(key.clone())),
            Some(_) => {}
        }
        let flag = self.flags.remove(key);
        if self.flags.len() < self.limit {
            self.too_many = None;
        }
        Ok(flag)
    }

    /// The flag `key`, if raised.
    pub fn get(&self, key: &FlagKey) -> Option<&Flag> {
        if *key == FlagKey::too_many() {
            return self.too_many.as_ref();
        }
        self.flags.get(key)
    }

    /// Every raised flag in key order, the "too many flags" flag last.
    pub fn list(&self) -> Vec<&Flag> {
        self.flags.values().chain(self.too_many.as_ref()).collect()
    }

    /// Number of raised flags, the "too many flags" flag included (what `flags count` prints).
    pub fn count(&self) -> usize {
        self.flags.len() + usize::from(self.too_many.is_some())
    }

    /// True when any flag is raised.
    pub fn raised(&self) -> bool {
        self.count() > 0
    }

    /// Adds a flag read back from storage.
    ///
    /// Fails (giving the flag back) when the limit is reached, in which case the "too many
    /// flags" flag is raised saying where the others are.
    pub fn load(&mut self, flag: Flag, now: i64, dir: &str) -> Result<(), Box<Flag>> {
        let key = flag.key();
        if key == FlagKey::too_many() || (!self.flags.contains_key(&key) && self.flags.len() >= self.limit) {
            self.raise_too_many(now, Some(dir));
            return Err(Box::new(flag));
        }
        self.flags.insert(key, flag);
        Ok(())
    }

    /// Puts `key` back as it was before a change whose persistence failed.
    pub(crate) fn restore(&mut self, key: FlagKey, before: Option<Flag>) {
        match before {
            Some(f) => {
                self.flags.insert(key, f);
            }
            None => {
                self.flags.remove(&key);
            }
        }
    }

    fn raise_too_many(&mut self, now: i64, dir: Option<&str>) {
        let limit = self.limit;
        let mut message = format!(
            "too many flags were raised: only the first {limit} are kept and new ones are refused; \
             lower some (nodus flags list, nodus flags down)"
        );
        if let Some(dir) = dir {
            message.push_str(&format!("; the others are still in {dir}"));
        }
        let f = self.too_many.get_or_insert_with(|| {
            let key = FlagKey::too_many();
            Flag {
                unit: key.unit,
                section: key.section,
                name: key.name,
                message: String::new(),
                priority: TOO_MANY_PRIORITY,
                manual_down: false,
                tags: ["flag", "too-many"].into_iter().map(String::from).collect(),
                source_file: file!().to_string(),
                function: "FlagSet::raise".to_string(),
                line: line!(),
                date: now,
                modified: now,
                hostname: self.hostname.clone(),
                version: self.version.clone(),
                count: 0,
            }
        });
        f.message = message;
        f.modified = now;
        f.count = f.count.saturating_add(1);
    }
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), FlagError> {
    if value.len() > max {
        return Err(FlagError::TooLong { field, max });
    }
    Ok(())
}

/// A value shortened for an error message.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> FlagKey {
        FlagKey::new("unit", "section", n).unwrap()
    }

    fn set(limit: usize) -> FlagSet {
        FlagSet::new(limit, "host-a", "1.2.3")
    }

    #[test]
    fn names_follow_the_reference_rules() {
        assert_eq!(check_name("unit", "Core-Plugins").unwrap(), "core-plugins");
        assert_eq!(check_name("name", "clamav-missing2").unwrap(), "clamav-missing2");
        assert_eq!(check_name("name", "a").unwrap(), "a");
        let refused = [
            ("", "empty"),
            ("-a", "starts with a dash"),
            ("9a", "starts with a digit"),
            ("a--b", "two dashes in a row"),
            ("a-", "ends with a dash"),
            ("a_b", "other than letters, digits and dashes"),
            ("a b", "other than letters, digits and dashes"),
            ("é", "other than letters, digits and dashes"),
        ];
        for (name, why) in refused {
            let e = check_name("name", name).unwrap_err().to_string();
            assert!(e.contains(why), "{name:?}: {e}");
        }
        assert!(check_name("tag", &"a".repeat(65)).is_err());
        assert!(check_name("tag", &"a".repeat(64)).is_ok());
    }

    #[test]
    fn raise_then_raise_again_keeps_date_and_counts() {
        let mut s = set(10);
        let r = s.raise(Raise::new(key("disk"), "disk full").tag("Disk").source("a.rs", "f", 10), 1_000).unwrap();
        assert!(r.new);
        assert_eq!((r.flag.count, r.flag.date, r.flag.modified), (1, 1_000, 1_000));
        assert_eq!(r.flag.tags, ["disk".to_string()].into());
        assert_eq!((r.flag.hostname.as_str(), r.flag.version.as_str()), ("host-a", "1.2.3"));
        let r = s.raise(Raise::new(key("disk"), "disk still full").priority(60), 2_000).unwrap();
        assert!(!r.new);
        assert_eq!((r.flag.count, r.flag.date, r.flag.modified), (2, 1_000, 2_000));
        assert_eq!((r.flag.message.as_str(), r.flag.priority), ("disk still full", 60));
        assert_eq!(r.flag.tags, ["disk".to_string()].into(), "tags kept when none are given");
        assert_eq!((r.flag.source_file.as_str(), r.flag.line), ("a.rs", 10), "source kept when none is given");
    }

    #[test]
    fn manual_down_flags_are_lowered_only_manually() {
        let mut s = set(10);
        s.raise(Raise::new(key("cert"), "certificate expired").manual_down(true), 1).unwrap();
        assert_eq!(s.lower(&key("cert"), Lowering::Automatic), Err(FlagError::ManualDown(key("cert"))));
        assert!(s.raised());
        // Re-raising without manual_down does not make it automatic.
        s.raise(Raise::new(key("cert"), "still expired"), 2).unwrap();
        assert!(s.lower(&key("cert"), Lowering::Automatic).is_err());
        assert!(s.lower(&key("cert"), Lowering::Manual).unwrap().is_some());
        assert!(!s.raised());
        // Lowering what is not raised works every time.
        assert_eq!(s.lower(&key("cert"), Lowering::Automatic), Ok(None));
    }

    #[test]
    fn past_the_limit_new_flags_are_refused_and_too_many_is_raised() {
        let mut s = set(2);
        s.raise(Raise::new(key("a"), "m"), 1).unwrap();
        s.raise(Raise::new(key("b"), "m"), 1).unwrap();
        assert_eq!(s.raise(Raise::new(key("c"), "m"), 5), Err(FlagError::TooMany { limit: 2 }));
        assert_eq!(s.raise(Raise::new(key("d"), "m"), 6), Err(FlagError::TooMany { limit: 2 }));
        // Existing flags can still be raised again.
        assert!(s.raise(Raise::new(key("a"), "again"), 7).is_ok());
        assert_eq!(s.count(), 3, "two flags and the too-many flag");
        let tm = s.get(&FlagKey::too_many()).unwrap();
        assert_eq!((tm.priority, tm.count, tm.date, tm.modified), (97, 2, 5, 6));
        assert_eq!(tm.tags, ["flag".to_string(), "too-many".to_string()].into());
        assert_eq!(s.list().last().unwrap().name, "too-many-flags");
        assert_eq!(s.raise(Raise::new(FlagKey::too_many(), "x"), 1), Err(FlagError::Reserved(FlagKey::too_many())));
        // Room again: the too-many flag goes down by itself.
        s.lower(&key("b"), Lowering::Automatic).unwrap();
        assert_eq!(s.count(), 1);
        assert!(s.get(&FlagKey::too_many()).is_none());
    }

    #[test]
    fn raises_are_checked() {
        let mut s = set(10);
        assert_eq!(s.raise(Raise::new(key("a"), "m").priority(101), 1), Err(FlagError::BadPriority(101)));
        assert!(matches!(
            s.raise(Raise::new(key("a"), "m").tag("no_underscore"), 1),
            Err(FlagError::BadName { what: "tag", .. })
        ));
        let long = "m".repeat(MAX_MESSAGE_BYTES + 1);
        assert_eq!(s.raise(Raise::new(key("a"), long), 1), Err(FlagError::TooLong { field: "message", max: 4096 }));
        let mut many = Raise::new(key("a"), "m");
        for i in 0..=MAX_TAGS {
            many = many.tag(format!("t{i}"));
        }
        assert_eq!(s.raise(many, 1), Err(FlagError::TooManyTags { max: 32 }));
        assert!(!s.raised(), "nothing refused was kept");
    }
}
