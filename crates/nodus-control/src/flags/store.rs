//! Flags kept in a directory (`<data_dir>/flags`), one file per flag named
//! `<unit>_<section>_<name>.flag`, like the reference. The only module of the crate that does
//! I/O.
//!
//! Writes are atomic: the content goes to a hidden temporary file in the same directory, is
//! synced, renamed over the flag's file, and the directory is synced, so a crash leaves either
//! the old flag or the new one, never half of one. Opening the directory reads every flag back;
//! a file that cannot be read or parsed is reported (and left in place for an operator to look
//! at), never fatal; files past the limit are reported and the "too many flags" flag is raised.

use super::{file, FlagError, FlagKey, FlagReply, FlagRequest, FlagSet, Lowering, Raised};
use super::{Flag, Raise, DEFAULT_FLAGS_LIMIT};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Suffix of a flag file.
pub const FLAG_SUFFIX: &str = ".flag";
/// Suffix of a temporary file being written.
const TMP_SUFFIX: &str = ".tmp";

/// How a node keeps its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagsConfig {
    /// Most flags kept (past it: "too many flags").
    pub limit: usize,
    /// Written in every raised flag's `hostname`.
    pub hostname: String,
    /// Written in every raised flag's `version`.
    pub version: String,
}

impl FlagsConfig {
    /// The defaults for a host: the reference's limit and this crate's version.
    pub fn new(hostname: impl Into<String>) -> Self {
        FlagsConfig { limit: DEFAULT_FLAGS_LIMIT, hostname: hostname.into(), version: env!("CARGO_PKG_VERSION").into() }
    }
}

/// A file in the flag directory that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProblem {
    /// The file.
    pub path: PathBuf,
    /// Why it was not loaded.
    pub reason: String,
}

/// A node's flags: the [`FlagSet`] core kept in step with its directory.
#[derive(Debug)]
pub struct Flags {
    set: FlagSet,
    dir: PathBuf,
}

impl Flags {
    /// Opens (creating it if needed) the flag directory and loads every flag in it; `now` stands
    /// for missing dates. Returns the files that could not be loaded alongside.
    ///
    /// Fails only when the directory cannot be created or listed.
    pub fn open(
        dir: impl Into<PathBuf>,
        config: FlagsConfig,
        now: i64,
    ) -> Result<(Flags, Vec<LoadProblem>), FlagError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| storage(&dir, &e))?;
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| storage(&dir, &e))? {
            let entry = entry.map_err(|e| storage(&dir, &e))?;
            names.push(entry.file_name());
        }
        names.sort();
        let mut set = FlagSet::new(config.limit, config.hostname, config.version);
        let mut problems = Vec::new();
        let shown = dir.display().to_string();
        for name in names {
            let path = dir.join(&name);
            let Some(name) = name.to_str() else {
                problems.push(LoadProblem { path, reason: "the file name is not UTF-8".into() });
                continue;
            };
            if name.starts_with('.') && name.ends_with(TMP_SUFFIX) {
                let reason = match fs::remove_file(&path) {
                    Ok(()) => "a write interrupted by a crash left this temporary file; removed".to_string(),
                    Err(e) => format!("a write interrupted by a crash left this temporary file; cannot remove it: {e}"),
                };
                problems.push(LoadProblem { path, reason });
                continue;
            }
            if !name.ends_with(FLAG_SUFFIX) {
                continue;
            }
            let flag = match read(&path).and_then(|text| file::decode(&text, now)) {
                Ok(f) => f,
                Err(reason) => {
                    problems.push(LoadProblem { path, reason });
                    continue;
                }
            };
            if flag.key().file_name() != name {
                let reason = format!("it holds flag {} whose file would be {}", flag.key(), flag.key().file_name());
                problems.push(LoadProblem { path, reason });
                continue;
            }
            if set.load(flag, now, &shown).is_err() {
                let reason = format!("not loaded: past the limit of {} flags", set.limit());
                problems.push(LoadProblem { path, reason });
            }
        }
        Ok((Flags { set, dir }, problems))
    }

    /// The directory the flags live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The in-memory view.
    pub fn set(&self) -> &FlagSet {
        &self.set
    }

    /// Raises a flag and saves it.
    ///
    /// Fails as [`FlagSet::raise`] does, or with [`FlagError::Storage`] when the file cannot be
    /// written (the flag is then as it was before).
    pub fn raise(&mut self, raise: Raise, now: i64) -> Result<Raised, FlagError> {
        let key = raise.key.clone();
        let before = self.set.get(&key).cloned();
        let raised = self.set.raise(raise, now)?;
        if let Err(e) = write_atomic(&self.dir, &key.file_name(), file::encode(&raised.flag).as_bytes()) {
            self.set.restore(key.clone(), before);
            return Err(storage(&self.dir.join(key.file_name()), &e));
        }
        Ok(raised)
    }

    /// Lowers a flag and deletes its file; `Ok(None)` when it was not raised.
    ///
    /// Fails as [`FlagSet::lower`] does, or with [`FlagError::Storage`] when the file cannot be
    /// deleted (the flag then stays raised).
    pub fn lower(&mut self, key: &FlagKey, how: Lowering) -> Result<Option<Flag>, FlagError> {
        let before = self.set.get(key).cloned();
        let lowered = self.set.lower(key, how)?;
        if lowered.is_some() && *key != FlagKey::too_many() {
            if let Err(e) = remove(&self.dir, &key.file_name()) {
                self.set.restore(key.clone(), before);
                return Err(storage(&self.dir.join(key.file_name()), &e));
            }
        }
        Ok(lowered)
    }

    /// Answers one `FLAG_*` request.
    ///
    /// Fails as the operation it asks for does.
    pub fn handle(&mut self, request: FlagRequest, now: i64) -> Result<FlagReply, FlagError> {
        Ok(match request {
            FlagRequest::Up(r) => {
                let raised = self.raise(r, now)?;
                FlagReply::IsUp { key: raised.flag.key(), count: raised.flag.count, new: raised.new }
            }
            FlagRequest::Down(key) => {
                let lowered = self.lower(&key, Lowering::Automatic)?.is_some();
                FlagReply::IsDown { key, lowered }
            }
            FlagRequest::Clear(key) => {
                let lowered = self.lower(&key, Lowering::Manual)?.is_some();
                FlagReply::IsDown { key, lowered }
            }
            FlagRequest::List => FlagReply::List(self.set.list().into_iter().cloned().collect()),
            FlagRequest::Status(None) => {
                FlagReply::Status { key: None, count: self.set.count(), raised: self.set.raised() }
            }
            FlagRequest::Status(Some(key)) => {
                let raised = self.set.get(&key).is_some();
                FlagReply::Status { count: self.set.count(), raised, key: Some(key) }
            }
        })
    }
}

fn storage(path: &Path, e: &io::Error) -> FlagError {
    FlagError::Storage { path: path.display().to_string(), error: e.to_string() }
}

/// Reads a flag file, refusing one over [`file::MAX_FILE_BYTES`] before reading it.
fn read(path: &Path) -> Result<String, String> {
    let len = fs::metadata(path).map_err(|e| format!("cannot read it: {e}"))?.len();
    if len > file::MAX_FILE_BYTES as u64 {
        return Err(format!("it is {len} bytes, more than the {} a flag file may have", file::MAX_FILE_BYTES));
    }
    let bytes = fs::read(path).map_err(|e| format!("cannot read it: {e}"))?;
    String::from_utf8(bytes).map_err(|_| "it is not UTF-8 text".to_string())
}

/// Replaces `dir/name` with `content` atomically (temporary file, sync, rename, sync the
/// directory).
fn write_atomic(dir: &Path, name: &str, content: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}{TMP_SUFFIX}"));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(content)?;
        f.sync_all()?;
        fs::rename(&tmp, dir.join(name))?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Deletes `dir/name` (a missing file is fine) and syncs the directory.
fn remove(dir: &Path, name: &str) -> io::Result<()> {
    match fs::remove_file(dir.join(name)) {
        Ok(()) => fs::File::open(dir)?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
