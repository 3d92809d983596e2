//! The on-disk store of deployed apps: `<data_dir>/apps/<name>/v<N>/` holds each version's files,
//! `current` names the version in use, `state` whether the operator left the app started or
//! stopped, `population` the workers `nodus app scale` asked for. Everything here is blocking
//! file-system work: the apps service runs it on tokio's blocking pool.
//!
//! A deployment is built in a hidden staging directory and renamed into place only once it is
//! complete and valid, so a failed deployment leaves nothing behind; errors name the path the
//! user gave, never the staging directory.

use anyhow::{bail, Context};
use nodus_engine::manifest::{Format, Manifest};
use nodus_engine::profile::Profile;
use nodus_engine::AppSpec;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Versions kept per app (the current one and the one before it).
const KEEP_VERSIONS: usize = 2;
/// Most files in one deployment.
const MAX_DEPLOY_FILES: usize = 10_000;
/// Bytes copied between two progress updates.
const COPY_BUFFER: usize = 256 * 1024;

/// Why the store refused a request about an app, apart from file-system failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such app here.
    #[error("app {0:?} is not deployed on this node; deploy it with `nodus app deploy {0} PATH`")]
    NotDeployed(String),
    /// The name cannot be an app's.
    #[error("invalid app name {0:?}: use 1 to 64 characters from A-Z a-z 0-9 _ . - (not starting with .)")]
    InvalidName(String),
}

/// Whether an app should run after a node restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wanted {
    /// Started by the operator.
    Started,
    /// Stopped by the operator.
    Stopped,
}

/// What a deployment is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Stage {
    /// Checking the source and measuring it.
    #[default]
    Preparing,
    /// Copying a directory or an executable (`done`/`total` in bytes).
    Copying,
    /// Unpacking an archive (`done`/`total` in bytes of the archive read).
    Unpacking,
    /// Files in place; the engine is starting the new version.
    Starting,
}

impl Stage {
    /// The word used on the wire (`DEPLOY_STATUS stage=...`).
    pub fn word(self) -> &'static str {
        match self {
            Stage::Preparing => "preparing",
            Stage::Copying => "copying",
            Stage::Unpacking => "unpacking",
            Stage::Starting => "starting",
        }
    }
}

/// How far one deployment has got: written by the copy, read by `DEPLOY_STATUS`.
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<(Stage, u64, u64)>,
}

impl Progress {
    /// The stage, bytes done and bytes in all.
    pub fn get(&self) -> (Stage, u64, u64) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enters `stage` with `total` bytes to go through.
    pub fn begin(&self, stage: Stage, total: u64) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (stage, 0, total);
    }

    fn advance(&self, bytes: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = s.1.saturating_add(bytes);
    }
}

/// A version just installed by [`AppStore::deploy`]; [`AppStore::rollback`] undoes it.
#[derive(Debug, Clone)]
pub struct Installed {
    /// What to run.
    pub spec: AppSpec,
    /// Its version (`v<N>`).
    pub version: String,
    /// The version that was current before, if any.
    previous: Option<String>,
}

/// The apps deployed on this node, as directories under `<data_dir>/apps`.
#[derive(Debug, Clone)]
pub struct AppStore {
    root: PathBuf,
    max_bytes: u64,
}

impl AppStore {
    /// The store under `data_dir`, made absolute against the current directory: an app's
    /// directory is where its workers run, so it must not depend on where they are.
    pub fn new(data_dir: &Path, max_bytes: u64) -> AppStore {
        let root = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf()).join("apps");
        AppStore { root, max_bytes }
    }

    fn app_dir(&self, name: &str) -> Result<PathBuf, StoreError> {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
            && !name.starts_with('.');
        if !ok {
            return Err(StoreError::InvalidName(name.to_string()));
        }
        Ok(self.root.join(name))
    }

    /// Names of the deployed apps, sorted.
    pub fn list(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("current").exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    /// Whether `name` is deployed.
    pub fn is_deployed(&self, name: &str) -> bool {
        self.app_dir(name).is_ok_and(|d| d.join("current").exists())
    }

    /// Stores a new version of `name` from `source` and makes it current, ready to start.
    ///
    /// `source` is an executable file (it becomes the app, run with no arguments), a directory
    /// holding `manifest.json` or `manifest.toml` and the app's files, or such a directory packed
    /// as a `.tar`, `.tar.gz` or `.tgz` archive (at its top level, or in its one top-level
    /// folder). The profile comes from `profile`, else the app's `profile.toml`/`profile.json`,
    /// else the defaults. `progress` follows the copy.
    ///
    /// Fails when the name, manifest or profile is invalid, the executable is missing or not
    /// executable, the source is too large, or the files cannot be copied; then nothing of the
    /// attempt is left on disk.
    pub fn deploy(
        &self,
        name: &str,
        source: &Path,
        profile: Option<&Path>,
        progress: &Progress,
    ) -> anyhow::Result<Installed> {
        let dir = self.app_dir(name)?;
        let meta = std::fs::metadata(source).with_context(|| format!("cannot read {}", source.display()))?;
        let previous = current_version(&dir);
        let version = next_version(&dir);
        let staging = dir.join(format!(".{version}.staging"));
        let unpacked = dir.join(format!(".{version}.unpack"));
        let built =
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display())).and_then(|()| {
                let _ = std::fs::remove_dir_all(&staging);
                let _ = std::fs::remove_dir_all(&unpacked);
                self.build(&staging, &unpacked, source, &meta, profile, progress)
            });
        let _ = std::fs::remove_dir_all(&unpacked);
        let (manifest, profile) = match built {
            Ok(v) => v,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                if previous.is_none() {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
        };
        let target = dir.join(&version);
        let install = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .and_then(|()| std::fs::rename(&staging, &target))
            .with_context(|| format!("cannot install {}", target.display()))
            .and_then(|()| write_atomic(&dir.join("current"), version.as_bytes()))
            .and_then(|()| self.set_wanted(name, Wanted::Started));
        let installed =
            Installed { spec: AppSpec { name: name.to_string(), dir: target, manifest, profile }, version, previous };
        if let Err(e) = install {
            let _ = std::fs::remove_dir_all(&staging);
            self.rollback(&installed);
            return Err(e);
        }
        prune(&dir);
        Ok(installed)
    }
}

impl AppStore {
    /// Fills `staging` from `source`; returns the manifest and profile it ends up with.
    fn build(
        &self,
        staging: &Path,
        unpacked: &Path,
        source: &Path,
        meta: &std::fs::Metadata,
        profile: Option<&Path>,
        progress: &Progress,
    ) -> anyhow::Result<(Manifest, Profile)> {
        let manifest = if meta.is_dir() {
            let total = measure(source, self.max_bytes)?;
            progress.begin(Stage::Copying, total);
            create_dir(staging)?;
            copy_tree(source, staging, &mut (self.max_bytes, MAX_DEPLOY_FILES), progress)?;
            read_manifest(staging, source)?
        } else if let Some(gzip) = archive_kind(source) {
            progress.begin(Stage::Unpacking, meta.len());
            create_dir(unpacked)?;
            unpack(source, gzip, unpacked, (self.max_bytes, MAX_DEPLOY_FILES), progress)?;
            let root = app_root(unpacked).with_context(|| {
                format!(
                    "{} has no manifest.json or manifest.toml, at its top level or in its one top-level folder",
                    source.display()
                )
            })?;
            std::fs::rename(&root, staging).with_context(|| format!("cannot unpack {}", source.display()))?;
            read_manifest(staging, source)?
        } else {
            if meta.len() > self.max_bytes {
                bail!(
                    "{} is {} bytes; the limit is {} (apps.max_deploy_bytes)",
                    source.display(),
                    meta.len(),
                    self.max_bytes
                );
            }
            if meta.permissions().mode() & 0o111 == 0 {
                bail!(
                    "{} is not executable (mode {:04o}) and is not a directory or a .tar/.tar.gz archive; make it executable (chmod +x) or deploy its app directory",
                    source.display(),
                    meta.permissions().mode() & 0o7777
                );
            }
            let file = source.file_name().context("the executable has no file name")?;
            progress.begin(Stage::Copying, meta.len());
            create_dir(staging)?;
            copy_file(source, &staging.join(file), progress)?;
            let manifest = Manifest::new(format!("./{}", file.to_string_lossy()));
            write_manifest(&staging.join("manifest.json"), &manifest)?;
            manifest
        };
        check_executable(&manifest, staging, source)?;
        let profile = match profile {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
                let parsed =
                    Profile::parse(&text, Format::from_path(p)).with_context(|| format!("invalid {}", p.display()))?;
                let ext = if Format::from_path(p) == Format::Json { "json" } else { "toml" };
                let _ = std::fs::remove_file(staging.join("profile.json"));
                let _ = std::fs::remove_file(staging.join("profile.toml"));
                std::fs::write(staging.join(format!("profile.{ext}")), text)?;
                parsed
            }
            None => read_profile(staging, source)?,
        };
        std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o755))?;
        Ok((manifest, profile))
    }

    /// Undoes [`AppStore::deploy`] (the engine could not start the new version): the previous
    /// version is current again, or the app is gone when there was none.
    pub fn rollback(&self, installed: &Installed) {
        let Some(dir) = installed.spec.dir.parent() else { return };
        match &installed.previous {
            Some(previous) => {
                if let Err(e) = write_atomic(&dir.join("current"), previous.as_bytes()) {
                    tracing::warn!(app = %installed.spec.name, error = %e, "cannot restore the previous version");
                    return;
                }
                let _ = std::fs::remove_dir_all(&installed.spec.dir);
            }
            None => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// The current version of `name`.
    ///
    /// Fails with [`StoreError::NotDeployed`] when the app is not deployed, and when its files
    /// are damaged.
    pub fn load(&self, name: &str) -> anyhow::Result<(AppSpec, String)> {
        let dir = self.app_dir(name)?;
        let version = current_version(&dir).ok_or_else(|| StoreError::NotDeployed(name.to_string()))?;
        let target = dir.join(&version);
        let manifest = read_manifest(&target, &target)?;
        let profile = read_profile(&target, &target)?;
        Ok((AppSpec { name: name.to_string(), dir: target, manifest, profile }, version))
    }

    /// Whether the operator last started or stopped `name`.
    pub fn wanted(&self, name: &str) -> Wanted {
        match self.app_dir(name).ok().and_then(|d| std::fs::read_to_string(d.join("state")).ok()).as_deref() {
            Some("stopped") => Wanted::Stopped,
            _ => Wanted::Started,
        }
    }

    /// Records whether `name` should run after a restart.
    ///
    /// Fails when the state file cannot be written.
    pub fn set_wanted(&self, name: &str, wanted: Wanted) -> anyhow::Result<()> {
        let word = if wanted == Wanted::Started { "started" } else { "stopped" };
        write_atomic(&self.app_dir(name)?.join("state"), word.as_bytes()).context("cannot record the app's state")
    }

    /// The workers `name` keeps running when idle, as last set by `nodus app scale` (0 if never).
    pub fn population(&self, name: &str) -> usize {
        let file = self.app_dir(name).ok().and_then(|d| std::fs::read_to_string(d.join("population")).ok());
        file.and_then(|s| s.trim().parse().ok()).unwrap_or(0)
    }

    /// Records the population to apply whenever `name` starts.
    ///
    /// Fails when the file cannot be written.
    pub fn set_population(&self, name: &str, workers: usize) -> anyhow::Result<()> {
        write_atomic(&self.app_dir(name)?.join("population"), workers.to_string().as_bytes())
            .context("cannot record the app's population")
    }

    /// Deletes every version of `name`.
    ///
    /// Fails with [`StoreError::NotDeployed`] when the app is not deployed.
    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        let dir = self.app_dir(name)?;
        if !dir.join("current").exists() {
            return Err(StoreError::NotDeployed(name.to_string()).into());
        }
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))
    }
}

fn versions(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_prefix('v')?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

fn current_version(dir: &Path) -> Option<String> {
    let v = std::fs::read_to_string(dir.join("current")).ok()?;
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

fn next_version(dir: &Path) -> String {
    format!("v{}", versions(dir).last().map_or(1, |v| v + 1))
}

fn prune(dir: &Path) {
    let versions = versions(dir);
    for v in &versions[..versions.len().saturating_sub(KEEP_VERSIONS)] {
        let _ = std::fs::remove_dir_all(dir.join(format!("v{v}")));
    }
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a crash never leaves half
/// a file.
fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The manifest written for an app deployed as a bare executable.
#[derive(serde::Serialize)]
struct ManifestFile<'a> {
    executable: &'a str,
}

fn write_manifest(path: &Path, m: &Manifest) -> anyhow::Result<()> {
    let mut json = serde_json::to_string_pretty(&ManifestFile { executable: &m.executable })?;
    json.push('\n');
    std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))
}

/// The app's manifest in `dir`; errors name `shown` (the path the user gave).
fn read_manifest(dir: &Path, shown: &Path) -> anyhow::Result<Manifest> {
    for (file, format) in [("manifest.json", Format::Json), ("manifest.toml", Format::Toml)] {
        let path = dir.join(file);
        if path.exists() {
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("cannot read {file} in {}", shown.display()))?;
            return Manifest::parse(&text, format).with_context(|| format!("invalid {file} in {}", shown.display()));
        }
    }
    bail!("{} has no manifest.json or manifest.toml", shown.display())
}

/// The app's profile in `dir`, else the defaults; errors name `shown`.
fn read_profile(dir: &Path, shown: &Path) -> anyhow::Result<Profile> {
    for (file, format) in [("profile.toml", Format::Toml), ("profile.json", Format::Json)] {
        let path = dir.join(file);
        if path.exists() {
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("cannot read {file} in {}", shown.display()))?;
            return Profile::parse(&text, format).with_context(|| format!("invalid {file} in {}", shown.display()));
        }
    }
    Ok(Profile::default())
}

/// Refuses a manifest whose executable is missing, not a file, or not executable.
fn check_executable(manifest: &Manifest, dir: &Path, shown: &Path) -> anyhow::Result<()> {
    let exe = &manifest.executable;
    let path = manifest.executable_path(dir);
    let inside = !Path::new(exe).is_absolute();
    let place = if inside { format!(" in {}", shown.display()) } else { String::new() };
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("the manifest's executable {exe:?} does not exist{place}; give its path relative to the app directory, or an absolute one")
        }
        Err(e) => bail!("the manifest's executable {exe:?}{place} cannot be used: {e}"),
    };
    if !meta.is_file() {
        bail!("the manifest's executable {exe:?}{place} is not a file");
    }
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        bail!(
            "the manifest's executable {exe:?}{place} is not executable (mode {:04o}); make it executable (chmod +x) and deploy again",
            mode & 0o7777
        );
    }
    Ok(())
}

/// The bytes in a directory tree, refusing links and anything past the byte or file budget.
fn measure(dir: &Path, max_bytes: u64) -> anyhow::Result<u64> {
    let mut stack = vec![dir.to_path_buf()];
    let (mut bytes, mut files) = (0u64, 0usize);
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                bytes = bytes.saturating_add(entry.metadata()?.len());
                files += 1;
                if bytes > max_bytes || files > MAX_DEPLOY_FILES {
                    bail!(
                        "{} is larger than apps.max_deploy_bytes ({max_bytes}) or has more than {MAX_DEPLOY_FILES} files",
                        dir.display()
                    );
                }
            } else {
                bail!("{} is neither a file nor a directory; deployments cannot contain links", entry.path().display());
            }
        }
    }
    Ok(bytes)
}

/// Copies one file with its permission bits, reporting progress as it goes.
fn copy_file(from: &Path, to: &Path, progress: &Progress) -> anyhow::Result<()> {
    let cannot = || format!("cannot copy {}", from.display());
    let mut src = std::fs::File::open(from).with_context(cannot)?;
    let mode = src.metadata().with_context(cannot)?.permissions().mode() & 0o777;
    let mut dst = std::fs::File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = src.read(&mut buf).with_context(cannot)?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).with_context(cannot)?;
        progress.advance(n as u64);
    }
    dst.set_permissions(std::fs::Permissions::from_mode(mode)).with_context(cannot)?;
    Ok(())
}

/// Copies a directory tree (files and directories; links are refused), within a byte and file
/// budget.
fn copy_tree(from: &Path, to: &Path, budget: &mut (u64, usize), progress: &Progress) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("cannot read {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            create_dir(&dest)?;
            copy_tree(&entry.path(), &dest, budget, progress)?;
            let mode = entry.metadata()?.permissions().mode() & 0o777;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
        } else if kind.is_file() {
            let len = entry.metadata()?.len();
            if budget.1 == 0 || len > budget.0 {
                bail!("the deployment is larger than apps.max_deploy_bytes or has more than {MAX_DEPLOY_FILES} files");
            }
            budget.0 -= len;
            budget.1 -= 1;
            copy_file(&entry.path(), &dest, progress)?;
        } else {
            bail!("{} is neither a file nor a directory; deployments cannot contain links", entry.path().display());
        }
    }
    Ok(())
}

/// `Some(gzipped)` when `path` names a tar archive.
fn archive_kind(path: &Path) -> Option<bool> {
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(true)
    } else if name.ends_with(".tar") {
        Some(false)
    } else {
        None
    }
}

/// A reader that reports the bytes read to a [`Progress`].
struct Counting<'a, R> {
    inner: R,
    progress: &'a Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress.advance(n as u64);
        Ok(n)
    }
}

/// Unpacks a tar archive into `to`: regular files and directories only, every path inside `to`,
/// within the byte and file budget.
fn unpack(archive: &Path, gzip: bool, to: &Path, mut budget: (u64, usize), progress: &Progress) -> anyhow::Result<()> {
    let file = std::fs::File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    let file = Counting { inner: file, progress };
    let reader: Box<dyn Read> = if gzip { Box::new(flate2::read::GzDecoder::new(file)) } else { Box::new(file) };
    let mut tar = tar::Archive::new(reader);
    let entries = tar.entries().with_context(|| format!("{} is not a tar archive", archive.display()))?;
    for entry in entries {
        let mut entry = entry.with_context(|| format!("{} is damaged or not a tar archive", archive.display()))?;
        let kind = entry.header().entry_type();
        let path = entry.path().context("an archive entry has an invalid path")?.into_owned();
        if !(kind.is_file() || kind.is_dir()) {
            bail!(
                "{} holds {:?}, which is neither a file nor a directory; deployments cannot contain links",
                archive.display(),
                path
            );
        }
        let size = entry.header().size().unwrap_or(u64::MAX);
        if budget.1 == 0 || size > budget.0 {
            bail!(
                "{} is larger than apps.max_deploy_bytes or has more than {MAX_DEPLOY_FILES} files",
                archive.display()
            );
        }
        budget.0 -= size;
        budget.1 -= 1;
        // unpack_in refuses paths that would land outside `to` (absolute or with `..`).
        let inside =
            entry.unpack_in(to).with_context(|| format!("cannot unpack {path:?} from {}", archive.display()))?;
        if !inside {
            bail!("{} holds {path:?}, which points outside the app directory", archive.display());
        }
    }
    Ok(())
}

fn has_manifest(dir: &Path) -> bool {
    dir.join("manifest.json").exists() || dir.join("manifest.toml").exists()
}

/// Where the app is in an unpacked archive: its top level, or its one top-level folder (as
/// `tar czf app.tar.gz app/` makes it).
fn app_root(unpacked: &Path) -> Option<PathBuf> {
    if has_manifest(unpacked) {
        return Some(unpacked.to_path_buf());
    }
    let mut entries = std::fs::read_dir(unpacked).ok()?.filter_map(|e| e.ok());
    let only = entries.next()?;
    if entries.next().is_some() || !only.file_type().ok()?.is_dir() {
        return None;
    }
    has_manifest(&only.path()).then(|| only.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn executable(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn deploy(store: &AppStore, name: &str, source: &Path) -> anyhow::Result<Installed> {
        store.deploy(name, source, None, &Progress::default())
    }

    /// A tar archive at `dir/name` holding `files` (mode 0755), names written raw so that unsafe
    /// ones reach the archive as they are.
    fn pack(dir: &Path, name: &str, gzip: bool, files: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).unwrap();
        let writer: Box<dyn std::io::Write> = if gzip {
            Box::new(flate2::write::GzEncoder::new(file, flate2::Compression::fast()))
        } else {
            Box::new(file)
        };
        let mut b = tar::Builder::new(writer);
        for (n, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.as_old_mut().name[..n.len()].copy_from_slice(n.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().flush().unwrap();
        path
    }

    #[test]
    fn deploy_versions_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 1 << 20);
        let exe = dir.path().join("worker.sh");
        executable(&exe, "#!/bin/sh\n");
        let first = deploy(&store, "echo", &exe).unwrap();
        assert_eq!((first.version.as_str(), first.spec.manifest.executable.as_str()), ("v1", "./worker.sh"));
        assert!(first.spec.dir.join("worker.sh").exists());
        for _ in 0..3 {
            deploy(&store, "echo", &exe).unwrap();
        }
        let (_, current) = store.load("echo").unwrap();
        assert_eq!(current, "v4");
        assert!(!dir.path().join("apps/echo/v2").exists(), "only two versions are kept");
        assert_eq!(store.list(), ["echo"]);
        store.set_wanted("echo", Wanted::Stopped).unwrap();
        assert_eq!(store.wanted("echo"), Wanted::Stopped);
        store.remove("echo").unwrap();
        assert!(store.list().is_empty());
        let e = store.load("echo").unwrap_err();
        assert_eq!(e.downcast_ref::<StoreError>(), Some(&StoreError::NotDeployed("echo".into())));
    }

    #[test]
    fn an_executable_with_control_characters_in_its_name_survives_a_reload() {
        // The manifest written for a bare executable was once Rust's `{:?}`, not JSON: a control
        // character made the app unloadable after a restart.
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 1 << 20);
        for name in ["tab\there", "bell\u{7}", "quote\"and\\slash", "ünï"] {
            let exe = dir.path().join(name);
            executable(&exe, "#!/bin/sh\n");
            let installed = deploy(&store, "odd", &exe).unwrap();
            let (spec, _) = store.load("odd").unwrap();
            assert_eq!(spec.manifest.executable, format!("./{name}"));
            assert_eq!(spec.manifest, installed.spec.manifest);
            let text = std::fs::read_to_string(spec.dir.join("manifest.json")).unwrap();
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{text}");
        }
    }

    #[test]
    fn archives_deploy_at_the_top_or_in_one_folder_and_unsafe_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 1 << 20);
        let manifest: &[u8] = b"{\"executable\": \"./bin/run\"}";
        let run: &[u8] = b"#!/bin/sh\n";
        let good = pack(dir.path(), "app.tar.gz", true, &[("manifest.json", manifest), ("bin/run", run)]);
        let installed = deploy(&store, "packed", &good).unwrap();
        assert!(installed.spec.dir.join("bin/run").exists());
        let plain = pack(dir.path(), "app.tar", false, &[("manifest.json", manifest), ("bin/run", run)]);
        assert!(deploy(&store, "plain", &plain).is_ok());
        // `tar czf app.tar.gz app/`: everything in one top-level folder.
        let folder = pack(dir.path(), "folder.tgz", true, &[("app/manifest.json", manifest), ("app/bin/run", run)]);
        let installed = deploy(&store, "folder", &folder).unwrap();
        assert!(installed.spec.dir.join("manifest.json").exists() && installed.spec.dir.join("bin/run").exists());
        let two = pack(dir.path(), "two.tgz", true, &[("a/manifest.json", manifest), ("b/x", run)]);
        let e = deploy(&store, "two", &two).unwrap_err().to_string();
        assert!(e.contains("two.tgz has no manifest.json"), "{e}");
        let evil = pack(dir.path(), "evil.tar", false, &[("manifest.json", manifest), ("../escape", b"x")]);
        assert!(deploy(&store, "evil", &evil).is_err());
        assert!(!dir.path().join("apps/evil").exists() && !dir.path().join("apps/escape").exists());
        let garbage = dir.path().join("junk.tgz");
        std::fs::write(&garbage, b"not gzip at all").unwrap();
        let e = format!("{:#}", deploy(&store, "junk", &garbage).unwrap_err());
        assert!(e.contains("junk.tgz"), "{e}");
        assert_eq!(store.list(), ["folder", "packed", "plain"]);
    }

    #[test]
    fn archive_entries_cannot_reach_outside_the_app_by_absolute_paths_or_links() {
        // What a worker node deploys comes from its manager: an archive must not write
        // anywhere but into the new version's directory.
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 1 << 20);
        let manifest: &[u8] = b"{\"executable\": \"./run\"}";
        let run: &[u8] = b"#!/bin/sh\n";
        let outside = dir.path().join("outside");
        let absolute = outside.to_str().unwrap();
        let archive =
            pack(dir.path(), "abs.tar", false, &[("manifest.json", manifest), ("run", run), (absolute, b"x")]);
        if let Ok(installed) = deploy(&store, "abs", &archive) {
            assert!(installed.spec.dir.join(absolute.trim_start_matches('/')).exists(), "kept inside the app");
        }
        assert!(!outside.exists(), "an absolute path wrote outside the app");
        for (kind, target) in [(tar::EntryType::Symlink, "/etc"), (tar::EntryType::Link, "../../outside")] {
            let path = dir.path().join("link.tar");
            let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
            for (n, data) in [("manifest.json", manifest), ("run", run)] {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o755);
                b.append_data(&mut h, n, data).unwrap();
            }
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_size(0);
            b.append_link(&mut h, "escape", target).unwrap();
            b.into_inner().unwrap().flush().unwrap();
            let e = format!("{:#}", deploy(&store, "linked", &path).unwrap_err());
            assert!(e.contains("cannot contain links"), "{kind:?}: {e}");
            assert!(!store.is_deployed("linked") && !dir.path().join("apps/linked").exists(), "{kind:?}");
        }
        assert!(!outside.exists());
    }

    #[test]
    fn bad_deployments_are_refused_name_the_source_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 1 << 20);
        let app = dir.path().join("src");
        std::fs::create_dir_all(&app).unwrap();
        let shown = app.display().to_string();
        let failures = |store: &AppStore, name: &str, source: &Path| {
            let e = format!("{:#}", deploy(store, name, source).unwrap_err());
            assert!(!e.contains("staging") && !e.contains("/apps/"), "names the staging directory: {e}");
            e
        };
        assert!(failures(&store, "x", &app).contains(&format!("{shown} has no manifest")));
        std::fs::write(app.join("manifest.json"), "{\"executable\": \"./run\", \"bogus\": 1}").unwrap();
        let e = failures(&store, "x", &app);
        assert!(e.contains(&format!("invalid manifest.json in {shown}")) && e.contains("bogus"), "{e}");
        std::fs::write(app.join("manifest.json"), "{\"executable\": \"./run\"}").unwrap();
        assert!(failures(&store, "x", &app).contains("does not exist in"));
        std::fs::write(app.join("run"), "#!/bin/sh\n").unwrap();
        let e = failures(&store, "x", &app);
        assert!(e.contains("\"./run\"") && e.contains("is not executable (mode 0644)"), "{e}");
        let plain = dir.path().join("plain.sh");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        assert!(failures(&store, "x", &plain).contains("plain.sh is not executable"));
        let small = AppStore::new(dir.path(), 4);
        std::fs::set_permissions(app.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(failures(&small, "x", &app).contains("max_deploy_bytes"));
        assert!(deploy(&store, "../evil", &app).is_err());
        assert!(store.list().is_empty());
        assert!(!dir.path().join("apps/x").exists(), "a failed first deployment leaves no app directory");
        // A failed new version of a deployed app keeps the old one current.
        let v1 = deploy(&store, "x", &app).unwrap();
        std::fs::set_permissions(app.join("run"), std::fs::Permissions::from_mode(0o644)).unwrap();
        failures(&store, "x", &app);
        let (_, current) = store.load("x").unwrap();
        assert_eq!(current, v1.version);
        let entries: Vec<_> =
            std::fs::read_dir(dir.path().join("apps/x")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(entries.len(), 3, "v1, current, state: {entries:?}");
    }

    #[test]
    fn rollback_restores_the_previous_version_or_removes_the_app() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 1 << 20);
        let exe = dir.path().join("w");
        executable(&exe, "#!/bin/sh\n");
        let first = deploy(&store, "r", &exe).unwrap();
        let second = deploy(&store, "r", &exe).unwrap();
        store.rollback(&second);
        assert_eq!(store.load("r").unwrap().1, first.version);
        assert!(!second.spec.dir.exists());
        store.rollback(&first);
        assert!(store.list().is_empty() && !dir.path().join("apps/r").exists());
    }

    #[test]
    fn progress_counts_every_byte_copied_or_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = AppStore::new(dir.path(), 1 << 30);
        let app = dir.path().join("src");
        std::fs::create_dir_all(app.join("data")).unwrap();
        std::fs::write(app.join("manifest.json"), "{\"executable\": \"./run\"}").unwrap();
        executable(&app.join("run"), "#!/bin/sh\n");
        std::fs::write(app.join("data/blob"), vec![7u8; 3 * COPY_BUFFER + 5]).unwrap();
        let progress = Progress::default();
        store.deploy("big", &app, None, &progress).unwrap();
        let (stage, done, total) = progress.get();
        assert_eq!(stage, Stage::Copying);
        assert_eq!((done, total), (total, measure(&app, u64::MAX).unwrap()));
        assert!(total > 3 * COPY_BUFFER as u64);
        let archive = pack(
            dir.path(),
            "a.tar",
            false,
            &[("manifest.json", b"{\"executable\": \"./run\"}"), ("run", b"#!/bin/sh\n")],
        );
        let progress = Progress::default();
        store.deploy("packed", &archive, None, &progress).unwrap();
        let (stage, done, total) = progress.get();
        assert_eq!((stage, total), (Stage::Unpacking, std::fs::metadata(&archive).unwrap().len()));
        assert!(done > 0 && done <= total, "{done} of {total}");
    }
}
